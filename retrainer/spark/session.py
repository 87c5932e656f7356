"""Starting Spark for retrainer: quiet, on this Python, with clear errors when it cannot start.

Spark is optional (``pip install retrainer[spark]``) and needs Java. Before a JVM is launched the
three usual failures are checked and reported in one line each: pyspark missing, Java missing,
master unreachable (a ``spark://`` master is probed with a plain TCP connect, so a wrong address
fails in seconds instead of after Spark's minute of retries). The JVM's console output (log4j,
progress bars) goes to a log file whose tail is shown when something goes wrong.

When a SparkSession is already running in this process (``spark-submit``, a notebook, the test
suite), it is used as it is and never stopped by retrainer.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import RetrainerError

log = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"
#: Seconds to wait for a standalone master to accept a TCP connection.
CONNECT_TIMEOUT = 5.0

#: Settings every Spark session retrainer starts gets (``conf`` overrides them).
QUIET_CONF = {
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.python.worker.reuse": "true",
}

#: Many small images must not become one task each: a file "costs" little to open, and files are
#: packed into partitions of at most this many bytes (then at least PARTITIONS_PER_CORE per core).
FILE_CONF = {
    "spark.sql.files.openCostInBytes": str(64 * 1024),
    "spark.sql.files.maxPartitionBytes": str(64 * 1024 * 1024),
    # Rows per Arrow batch handed to a Python worker: images are large rows.
    "spark.sql.execution.arrow.maxRecordsPerBatch": "256",
    # A chunk's files (which the driver has just hashed) are listed by the driver itself: a
    # listing job costs seconds, the driver's stat calls a fraction of one.
    "spark.sql.sources.parallelPartitionDiscovery.threshold": "20000",
}
PARTITIONS_PER_CORE = 4

_LOG4J = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n
logger.utils.name = org.apache.spark.util.Utils
logger.utils.level = error
logger.native.name = org.apache.hadoop.util.NativeCodeLoader
logger.native.level = error
"""


class SparkError(RetrainerError):
    """Spark is missing, cannot start, or a Spark job failed."""


def import_pyspark() -> Any:
    """The pyspark module, or a clear error saying how to install it."""
    try:
        import pyspark
    except ImportError:
        raise SparkError("the spark engine needs pyspark, which is not installed.",
                         "Install it with: pip install 'retrainer[spark]'") from None
    return pyspark


def find_java() -> str:
    """The java executable Spark will use ($JAVA_HOME/bin/java, else java on PATH)."""
    home = os.environ.get("JAVA_HOME")
    if home:
        java = Path(home) / "bin" / "java"
        if java.is_file() and os.access(java, os.X_OK):
            return str(java)
        raise SparkError(f"JAVA_HOME is '{home}' but it has no bin/java.",
                         "Point JAVA_HOME at a Java 17+ install, or unset it to use java on PATH.")
    java = shutil.which("java")
    if not java:
        raise SparkError("Spark needs Java (17 or newer), and no java was found on PATH.",
                         "Install it (Debian/Ubuntu: apt-get install openjdk-17-jre-headless) "
                         "or set JAVA_HOME.")
    return java


def check_master(master: str) -> None:
    """Fail fast on a master that cannot work: unreachable spark:// hosts, Spark Connect."""
    if master.startswith("sc://"):
        raise SparkError(f"Spark Connect masters ({master}) are not supported.",
                         "Use a spark://HOST:PORT master, local[N], or run under spark-submit.")
    if not master.startswith("spark://"):
        return
    for hostport in master[len("spark://"):].split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise SparkError(f"bad Spark master '{master}'.", "Expected spark://HOST:PORT.")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            last = f"cannot reach the Spark master at {host}:{port} ({reason})."
    raise SparkError(last, "Check the address and that the master is running "
                           "(its web UI shows the spark:// URL to use).")


def local_cores(master: str) -> int | None:
    """The number of cores a local[N] master uses (None for a cluster)."""
    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master)
    if not m:
        return None
    n = m.group(1)
    if n is None:
        return 1
    return (os.cpu_count() or 1) if n == "*" else int(n)


def active_session() -> Any | None:
    pyspark_sql = sys.modules.get("pyspark.sql")
    if pyspark_sql is None:
        return None
    session = pyspark_sql.SparkSession.getActiveSession()
    if session is None:
        # The JVM keeps the active session per thread, and py4j may serve this Python thread
        # from a new JVM thread (seen after OpenVINO loads a model): the session is still there.
        session = getattr(pyspark_sql.SparkSession, "_instantiatedSession", None)
        if session is not None and getattr(session.sparkContext, "_jsc", None) is None:
            session = None  # stopped
    return session


@contextmanager
def spark_session(master: str | None = None, app_name: str = "retrainer",
                  conf: dict[str, str] | None = None) -> Iterator[Any]:
    """A SparkSession for the length of the block: the running one, or a new quiet one."""
    if master:
        check_master(master)
    import_pyspark()
    running = active_session()
    if running is not None:
        log.debug("using the running Spark session (master %s)", running.sparkContext.master)
        yield running
        return
    if under_spark_submit() and not master:
        session = submitted_session(app_name, conf)
        try:
            yield session
        finally:
            session.stop()
        return
    session, log_path = start_session(master or DEFAULT_MASTER, app_name, conf)
    try:
        yield session
    finally:
        session.stop()
        shutil.rmtree(log_path.parent, ignore_errors=True)


def under_spark_submit() -> bool:
    """True when spark-submit started this Python (its JVM, master and settings are given)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def submitted_session(app_name: str, conf: dict[str, str] | None = None) -> Any:
    """The session of a spark-submit run: its master and --conf, plus retrainer's defaults."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    for key, value in {**QUIET_CONF, **FILE_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    cores = session.sparkContext.defaultParallelism
    session.conf.set("spark.sql.files.minPartitionNum", str(PARTITIONS_PER_CORE * cores))
    log.info("running under spark-submit (master %s)", session.sparkContext.master)
    return session


def start_session(master: str, app_name: str = "retrainer",
                  conf: dict[str, str] | None = None) -> tuple[Any, Path]:
    """Launch a JVM and a SparkSession on ``master``; returns it and the JVM's log file.

    The caller stops the session and may remove the log file's folder.
    """
    check_master(master)
    import_pyspark()
    find_java()
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    # Workers run the driver's Python, so they see the same packages (and the same retrainer).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if local_cores(master) is not None:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    log_dir = Path(tempfile.mkdtemp(prefix="retrainer-spark-"))
    log4j = log_dir / "log4j2.properties"
    log4j.write_text(_LOG4J, encoding="utf-8")
    log_path = log_dir / "spark.log"
    settings = {**QUIET_CONF, **FILE_CONF, "spark.master": master, "spark.app.name": app_name,
                "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{log4j}"}
    if local_cores(master) is not None:
        settings["spark.ui.enabled"] = "false"
    settings.update(conf or {})
    spark_conf = SparkConf(loadDefaults=False).setAll(list(settings.items()))
    log.info("starting Spark (master %s); its log: %s", master, log_path)
    with open(log_path, "ab") as sink:
        try:
            if SparkContext._gateway is None:  # one JVM per process, reused after a stop
                SparkContext._gateway = launch_gateway(spark_conf, {"stderr": sink,
                                                                     "stdout": sink})
                SparkContext._jvm = SparkContext._gateway.jvm
            context = SparkContext(conf=spark_conf)
        except Exception as exc:  # noqa: BLE001 - PySparkRuntimeError, py4j and JVM errors
            raise SparkError(f"Spark could not start on master {master}: {_first_line(exc)}.",
                             _log_tail(log_path)) from None
    context.setLogLevel("WARN")
    session = SparkSession(context)
    cores = context.defaultParallelism
    session.conf.set("spark.sql.files.minPartitionNum", str(PARTITIONS_PER_CORE * cores))
    log.debug("Spark %s started: %d cores", session.version, cores)
    return session, log_path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        tail = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:]
    except OSError:
        tail = []
    return "Spark's log ends with:\n  " + "\n  ".join(tail) if tail else f"See {path}."


def job_failed(exc: BaseException) -> SparkError:
    """A failed Spark job (py4j and Spark raise many kinds) as one line and what to do."""
    return SparkError(f"the Spark job failed: {_first_line(exc)}",
                      "Run again with --debug for Spark's full error.")
