"""The root command: lazy subcommands, verbosity, and one place that turns errors into exits.

Subcommands are imported only when named, so ``retrainer --help`` never imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import threading
import traceback
from typing import Any

import click

from ..errors import RetrainerError

#: name -> "module:attribute" of each subcommand.
COMMANDS = {
    "train": "retrainer.cli.train:train",
    "label": "retrainer.cli.label:label",
    "evaluate": "retrainer.cli.evaluate:evaluate",
    "backbones": "retrainer.cli.backbones:backbones",
    "db": "retrainer.cli.db:db",
    "serve": "retrainer.cli.serve:serve",
    "bottlenecks": "retrainer.cli.bottlenecks:bottlenecks",
    "audit": "retrainer.cli.audit:audit",
    "export": "retrainer.cli.export:export",
}

#: ``name=VALUE`` in a library message: a parameter, said as the running command's flag.
_PARAM = re.compile(r"(?<![\w-])([a-z][a-z0-9_]*)=(True\b)?")


def as_flags(text: str, options: dict[str, click.Option]) -> str:
    """Library messages name parameters (``weights=FILE``, ``overwrite=True``); on the command
    line they read as the command's flags (``--weights FILE``, ``--overwrite``)."""
    def flag(match: re.Match[str]) -> str:
        option = options.get(match[1])
        longs = [o for o in option.opts if o.startswith("--")] if option else []
        if not longs:
            return match[0]
        return longs[0] if option.is_flag else f"{longs[0]} "  # type: ignore[union-attr]

    return _PARAM.sub(flag, text)


EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what shells report for a reader that quit early
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, ``docker stop``): the command unwinds as on Ctrl-C, so
    what it computed is kept (bottlenecks flushed), what it was writing is removed (a staged
    model, the export helper) and the old model stays as it was."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Any:
    """While a command runs, SIGTERM raises :class:`Terminated` (once: a second one ends the
    process at once). Left alone where the embedding program handles SIGTERM itself, or off
    the main thread; commands that handle it (serve) install their own handler."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def _flags(self, ctx: click.Context) -> dict[str, click.Option]:
        """The options of the command that ran (and of its subcommands), by parameter name."""
        found: dict[str, click.Option] = {}
        stack: list[click.Command | None] = [ctx.command]
        if ctx.invoked_subcommand:
            stack.append(self.get_command(ctx, ctx.invoked_subcommand))
        while stack:
            command = stack.pop()
            if command is None:
                continue
            for param in command.params:
                if isinstance(param, click.Option) and param.name:
                    found.setdefault(param.name, param)
            if isinstance(command, click.Group) and command is not ctx.command:
                stack += [command.get_command(ctx, n) for n in command.list_commands(ctx)]
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        return with_global_options(getattr(importlib.import_module(module), attr))

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        options = args[: args.index("--")] if "--" in args else args
        ctx.meta[JSON_ERRORS] = "--json" in options
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(name, list(COMMANDS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            ctx.fail(f"No such command '{name}'.{hint}")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        with _sigterm_unwinds():
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RetrainerError as exc:
            if _debug(ctx):
                traceback.print_exc()
            flags = self._flags(ctx)
            message = as_flags(exc.message, flags)
            hint = as_flags(exc.hint, flags) if exc.hint else None
            click.echo(f"Error: {message}", err=True)
            if hint:
                click.echo(hint, err=True)
            _json_error(ctx, message, hint, exc.exit_code)
            ctx.exit(exc.exit_code)
        except Terminated:
            click.echo("Terminated.", err=True)
            ctx.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (``retrainer label ... | head``): stop quietly, as a process
            # killed by SIGPIPE would, and keep the exit-time flush from failing again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(EXIT_BROKEN_PIPE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _debug(ctx):
                raise
            message = f"unexpected {type(exc).__name__}: {exc}"
            hint = "Run again with --debug for the traceback, and please report it."
            click.echo(f"Error: {message}", err=True)
            click.echo(hint, err=True)
            _json_error(ctx, message, hint, 1)
            ctx.exit(1)


#: ``ctx.meta`` key: the command line asks for --json, so a failure is a JSON document too.
JSON_ERRORS = "retrainer.json_errors"


def _json_error(ctx: click.Context, message: str, hint: str | None, exit_code: int) -> None:
    """With --json, stdout gets ``{"error": {...}}`` (one more row for JSON Lines commands), so a
    script parsing stdout reads why the command failed instead of nothing."""
    if ctx.meta.get(JSON_ERRORS):
        from .common import echo_json

        echo_json({"error": {"message": message, "hint": hint, "exit_code": exit_code}})


def _late_flag(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A global flag given after the subcommand (``retrainer train ... -q``), as pip takes them."""
    if not value:
        return value
    root = ctx.find_root()
    if not isinstance(root.obj, dict):
        root.obj = {}
    obj = root.obj
    if param.name == "verbose":
        obj["verbose"] = obj.get("verbose", 0) + value
    else:
        obj[param.name] = True
    configure_output(obj.get("verbose", 0), obj.get("quiet", False))
    return value


def with_global_options(cmd: click.Command) -> click.Command:
    """Let ``cmd`` (and a group's subcommands) take -v, -q and --debug after its name too."""
    if getattr(cmd, "_global_options", False):
        return cmd
    taken = {opt for param in cmd.params for opt in getattr(param, "opts", [])}
    for opts, kw in ((["-v", "--verbose"], {"count": True}), (["-q", "--quiet"], {"is_flag": True}),
                     (["--debug"], {"is_flag": True})):
        if not taken & set(opts):
            cmd.params.append(click.Option(opts, hidden=True, expose_value=False,
                                           callback=_late_flag, **kw))
    cmd._global_options = True  # type: ignore[attr-defined]
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            with_global_options(sub)
    return cmd


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug"))


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear progress bars apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            msg = self.format(record)
            if record.levelno >= logging.WARNING:
                msg = f"{record.levelname.lower()}: {msg}"
            tqdm.write(msg, file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def configure_output(verbose: int, quiet: bool) -> None:
    """-q: warnings and errors only, no bars; -v: debug; -vv: TensorFlow's own logs too."""
    from .. import progress

    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    progress.enabled = False if quiet else None
    logger = logging.getLogger("retrainer")
    logger.handlers[:] = [_TqdmHandler()]
    logger.setLevel(level)
    logger.propagate = False
    global _tf_level_set
    if verbose < 2:
        if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
            _tf_level_set = True
        for name in ("tensorflow", "absl", "keras"):
            logging.getLogger(name).setLevel(logging.ERROR)
    elif _tf_level_set:  # -vv after the subcommand: undo what the first call set
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        _tf_level_set = False
        for name in ("tensorflow", "absl", "keras"):
            logging.getLogger(name).setLevel(logging.NOTSET)


_tf_level_set = False


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "auto_envvar_prefix": "RETRAINER"})
@click.version_option(package_name="retrainer")
@click.option("-v", "--verbose", count=True, help="More detail (-vv: TensorFlow's logs too).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """Retrain an image classifier on your own folder of labelled photos.

    \b
      retrainer train --image-dir photos/     # one sub-folder per class
      retrainer label photo.jpg               # top-5 labels with scores
    """
    ctx.obj = {"debug": debug, "verbose": verbose, "quiet": quiet}
    configure_output(verbose, quiet)


def main() -> None:
    if not any(a in ("-vv", "-vvv") for a in sys.argv[1:]) and sys.argv[1:].count("-v") + \
            sys.argv[1:].count("--verbose") < 2:
        from .quiet import filter_native_logs

        filter_native_logs()
    try:
        cli(prog_name="retrainer")
    except SystemExit as exc:
        if any(name in sys.modules for name in _SLOW_TO_UNLOAD):
            _exit_now(exc.code)
        raise


#: Native libraries whose unloading makes the interpreter's teardown slow (TensorFlow ~1 s).
_SLOW_TO_UNLOAD = ("tensorflow", "onnxruntime", "openvino", "ai_edge_litert")


def _exit_now(code: Any) -> None:
    """Leave without the interpreter's teardown, which takes ~1 s once TensorFlow is loaded
    (0.2 s with ONNX Runtime) and does nothing a finished command needs. Exit handlers still run (log flushing, the
    native-log filter); every file the command wrote is already closed."""
    from .._tf_internals import run_exit_handlers

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
