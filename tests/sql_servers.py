"""Real MariaDB and PostgreSQL servers for the SQL tests, each in a temp dir on a free port.

Started once per test session on 127.0.0.1 and stopped after. As root (CI), mariadbd runs with
``--user=root`` and PostgreSQL, which refuses root, runs as the ``postgres`` system user (or
``nobody``) through ``runuser``. The test user's password has URL-special characters on purpose.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

#: Every character here needs escaping in a URL, a shell or an SQL literal.
PASSWORD = "p@ss:w/rd?#%&'\" \\;="
USER = "retrainer_test"


class ServerMissing(RuntimeError):
    """The server's binary is not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find(names: list[str], patterns: list[str] = ()) -> str | None:
    for name in names:
        found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                            if os.path.exists(p)), None)
        if found:
            return found
    for pattern in patterns:
        hits = sorted(glob.glob(pattern), key=lambda p: [int(x) for x in Path(p).parts[-3]
                                                          .split(".") if x.isdigit()])
        if hits:
            return hits[-1]
    return None


def _wait(ready: Callable[[], Any], proc: subprocess.Popen, log: Path, what: str,
          timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            return ready()
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    proc.kill()
    raise RuntimeError(f"{what} did not start (exit {proc.poll()}, last error {last}):\n{tail}")


class Server:
    """A running server: ``new_database()`` gives a fresh, empty database URL for one test."""

    kind = ""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix=f"retrainer-{self.kind}-"))
        self.proc: subprocess.Popen | None = None
        self.count = 0

    def url(self, database: str, password: str = PASSWORD) -> str:
        from sqlalchemy.engine import URL

        drivers = {"mariadb": "mysql+pymysql", "postgresql": "postgresql+psycopg"}
        return URL.create(drivers[self.kind], USER, password, "127.0.0.1", self.port,
                          database).render_as_string(hide_password=False)

    def new_database(self) -> str:
        self.count += 1
        name = f"t{self.count}"
        self.create_database(name)
        return self.url(name)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


class MariaDB(Server):
    kind = "mariadb"

    def start(self) -> "MariaDB":
        mariadbd = _find(["mariadbd", "mysqld"])
        install = _find(["mariadb-install-db", "mysql_install_db"])
        if not mariadbd or not install:
            raise ServerMissing("mariadbd is not installed (Debian package mariadb-server)")
        data, self.sock, log = self.root / "data", self.root / "mysqld.sock", self.root / "error.log"
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run([install, "--no-defaults", f"--datadir={data}", "--skip-test-db",
                        "--auth-root-authentication-method=normal", *as_root],
                       check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(
            [mariadbd, "--no-defaults", f"--datadir={data}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.sock}", f"--log-error={log}",
             f"--pid-file={self.root / 'mysqld.pid'}", "--skip-name-resolve", "--skip-log-bin",
             "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M",
             "--max-allowed-packet=64M", "--innodb-flush-log-at-trx-commit=2", *as_root],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self._admin, self.proc, log, "MariaDB").close()
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute("CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", (USER, PASSWORD))
            cur.execute(f"GRANT ALL ON *.* TO {USER}@'127.0.0.1'")
        return self

    def _admin(self) -> Any:
        import pymysql

        return pymysql.connect(unix_socket=str(self.sock), user="root", autocommit=True)

    def create_database(self, name: str) -> None:
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")


class PostgreSQL(Server):
    kind = "postgresql"

    def start(self) -> "PostgreSQL":
        patterns = ["/usr/lib/postgresql/*/bin/postgres"]
        postgres = _find([], patterns) or _find(["postgres"])
        initdb = _find([], ["/usr/lib/postgresql/*/bin/initdb"]) or _find(["initdb"])
        if not postgres or not initdb:
            raise ServerMissing("postgres is not installed (Debian package postgresql)")
        run_as: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
            if user is None:
                raise ServerMissing("no unprivileged user to run postgres as")
            pw = pwd.getpwnam(user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            run_as = ["runuser", "-u", user, "--"]
        data, log = self.root / "data", self.root / "postgres.log"
        subprocess.run([*run_as, initdb, "-D", str(data), "-U", "postgres", "-E", "UTF8",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(
            [*run_as, postgres, "-D", str(data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
             "-c", "synchronous_commit=off", "-c", "logging_collector=off"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        _wait(self._admin, self.proc, log, "PostgreSQL").close()
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(USER), sql.Literal(PASSWORD)))
        return self

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(host=str(self.root), port=self.port, user="postgres",
                               dbname="postgres", autocommit=True)

    def create_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE {name} OWNER "{USER}"')


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


SERVERS = {"mariadb": MariaDB, "postgresql": PostgreSQL}
