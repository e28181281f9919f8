"""db-writer: Redis Streams -> PostgreSQL/TimescaleDB. The command line: `main.py [run]`
runs one worker; the other commands are in cli.py.

Each command imports what it needs and no more: a health probe or `status` does not
load the worker's modules. `from main import DatabaseWriterService` still works.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from config import Settings, load_settings
from errors import ConfigError, StartupError, TransientError


def __getattr__(name: str) -> Any:
    """`from main import DatabaseWriterService` (the original interface), loaded on demand."""
    if name in ("DatabaseWriterService", "Stats"):
        import service

        return getattr(service, name)
    raise AttributeError(name)


class _Parser(argparse.ArgumentParser):
    """A wrong argument is one line, like every other error."""

    def error(self, message: str) -> Any:
        self.exit(2, f"db-writer: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """--version, read only when asked: importlib.metadata costs every command 30 ms here."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from version import version

        print(f"db-writer {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    import cli

    parser = _Parser(
        prog="main.py",
        description="db-writer: Redis Streams -> PostgreSQL/TimescaleDB. "
        "Settings come from the environment and the .env file (see `main.py config`).",
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument(
        "--env-file", metavar="PATH", help="read settings from this file instead of ./.env (or $DB_WRITER_ENV_FILE)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "run",
        help="run one worker (the default): read, write, acknowledge, until SIGTERM",
        description="Run one worker under CONSUMER_NAME until SIGTERM or Ctrl-C (a second one "
        "stops it at once). Exit 0 on a requested stop, 1 if an outage outlasts MAX_OUTAGE_SEC "
        "or it cannot start, 2 for a setting to fix.",
    )
    cli.add_commands(commands)
    return parser


def _defer_redis_asyncio() -> None:
    """redis-py imports its asyncio client from its package __init__: 30-50 ms of the 0.3-0.4 s
    that `health` takes here, for a client that no command and no worker uses. Its module is put
    in place unexecuted, with its real spec and path, and runs its code when something first
    asks it for a name (a module __getattr__, PEP 562). importlib's LazyLoader would not
    do: the import system reads a module's __spec__ on every import of it, which loads it."""
    import importlib.machinery
    import importlib.util

    if "redis" in sys.modules:
        return
    package = importlib.util.find_spec("redis")
    if package is None or not package.submodule_search_locations:
        return
    spec = importlib.machinery.PathFinder.find_spec("redis.asyncio", list(package.submodule_search_locations))
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def load(name: str) -> Any:
        del module.__getattr__
        loader.exec_module(module)
        return getattr(module, name)

    module.__getattr__ = load  # type: ignore[method-assign]
    sys.modules["redis.asyncio"] = module


def main(argv: list[str] | None = None) -> int:
    _defer_redis_asyncio()
    args = build_parser().parse_args(argv)
    if args.command == "config":  # it reports bad settings itself: it must not stop at the first
        import cli

        return cli.config_command(args.env_file, args.json)
    try:
        settings = load_settings(args.env_file)
    except ConfigError as exc:
        print(f"db-writer: {exc}", file=sys.stderr)
        return 2
    if args.command not in (None, "run"):
        import cli

        return cli.dispatch(args, settings)
    return run_worker(settings, args.env_file)


def console() -> None:
    """The `db-writer` console script."""
    sys.exit(main(sys.argv[1:]))


def run_worker(settings: Settings, env_file: str | None = None) -> int:
    import structlog

    from config import inspect_settings
    from log import configure_logging
    from service import DatabaseWriterService, install_signal_handlers

    configure_logging(
        settings.log_level, settings.log_format, consumer=settings.consumer_name, group=settings.consumer_group_name
    )
    log = structlog.get_logger("db_writer")
    for warning in inspect_settings(env_file).warnings:
        log.warning("check the settings", warning=warning)
    metrics = None
    if settings.metrics_port:
        from metrics import Metrics

        metrics = Metrics()
    service = DatabaseWriterService(settings, metrics)
    if metrics is not None and settings.metrics_port:
        from metrics import serve as serve_metrics

        try:
            serve_metrics(settings.metrics_port, service, metrics, settings.metrics_host)
        except OSError as exc:
            print(
                f"db-writer: METRICS_PORT {settings.metrics_port} on {settings.metrics_host}: {exc.strerror}"
                " (another process listens there? choose another port)",
                file=sys.stderr,
            )
            return 2
    install_signal_handlers(service)
    try:
        service.run()
    except StartupError as exc:
        log.error("cannot start", reason=str(exc))
        print(f"db-writer: {exc}", file=sys.stderr)
        return exc.exit_status
    except TransientError as exc:
        log.error("giving up", reason=service.stop_reason or str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
