"""Settings, read once from the environment and a .env file, and passed down.

Nothing here runs at import time: `load_settings()` builds the object, and a bad
value raises `ConfigError` with one line that names the variable, which main.py
prints before exiting with status 2. `inspect_settings()` is what `main.py config`
shows: every setting's effective value (secrets masked), where it came from, and
every problem at once.

Where values come from, the later winning: the defaults below; the .env file (by
default `.env` in the current directory, or DB_WRITER_ENV_FILE, or `--env-file`); the
environment; overrides passed by a caller (tests). Names are case-insensitive.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import quote, urlsplit

import schema
from errors import ConfigError

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


ENV_FILE_VARIABLE = "DB_WRITER_ENV_FILE"
# Names that share our prefixes but are not settings (the tests' and tools' own).
_NOT_OURS = ("TEST_", "DBW_", "STANDALONE_", "BENCH_", "DB_WRITER_ENV_FILE")
_OUR_PREFIXES = (
    "REDIS_",
    "DB_",
    "DATABASE_",
    "BATCH_",
    "CONSUMER_",
    "STREAM_",
    "DEAD_LETTER_",
    "TIMESCALE_",
    "LOG_",
    "METRICS_",
    "LEDGER_",
    "MAX_",
    "CLAIM_",
    "SHUTDOWN_",
    "PROCESSING_",
    "ENABLE_",
    "TABLE_",
    "DEVICE_",
    "SENSOR_",
)
# Set together, the first makes the others meaningless.
_OVERRIDES = {
    "redis_url": ("redis_host", "redis_port", "redis_db", "redis_password"),
    "database_url": ("db_host", "db_port", "db_name", "db_user", "db_password"),
}


class Secret:
    """A setting that never shows in repr, str or a log line; `get_secret_value()` reads it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********" if self._value else ""

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _setting(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
) -> Any:
    """A field with bounds, checked by `_validated` after the value has its type."""
    bounds = {"ge": ge, "gt": gt, "le": le, "min_length": min_length, "max_length": max_length}
    return field(default=default, metadata={k: v for k, v in bounds.items() if v is not None})


@dataclass(frozen=True)
class Settings:
    """Every setting, with the original README's names and defaults.

    Field `batch_size` is read from BATCH_SIZE, and so on (names are case-insensitive).
    Build it with `load_settings()`: the constructor itself checks nothing. A plain
    dataclass, not pydantic: importing pydantic cost an operator command 0.1-0.2 s here.
    """

    # Redis: REDIS_URL (redis:// or rediss:// for TLS) wins over the parts. REDIS_MODE picks
    # the topology: one server, a cluster (REDIS_URL names a startup node) or a primary
    # that Sentinel manages (REDIS_SENTINELS, REDIS_SENTINEL_MASTER).
    redis_mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    redis_sentinels: str | None = None
    redis_sentinel_master: str | None = None
    redis_sentinel_password: Secret | None = None
    redis_url: Secret | None = None
    redis_host: str = "localhost"
    redis_port: int = _setting(6379, ge=1, le=65535)
    redis_db: int = _setting(0, ge=0)
    redis_password: Secret | None = None
    redis_socket_timeout_sec: float = _setting(10.0, gt=0)  # a command unanswered this long: the connection is dead

    # PostgreSQL: DATABASE_URL wins over the DB_* parts.
    database_url: Secret | None = None
    db_host: str = "localhost"
    db_port: int = _setting(5432, ge=1, le=65535)
    db_name: str | None = None
    db_user: str = "postgres"
    db_password: Secret | None = None
    db_pool_min_size: int = _setting(1, ge=1)
    db_pool_max_size: int = _setting(4, ge=1, le=100)
    db_connect_timeout_s: float = _setting(5.0, gt=0)
    # Every database call is bounded: a half-open connection (packets dropped, nothing
    # closed) is detected by TCP keepalives while waiting for an answer and by
    # tcp_user_timeout while data is unacknowledged; the server cancels a statement
    # that runs too long, and a lock wait, and a transaction left idle by a frozen worker.
    db_statement_timeout_sec: float = _setting(60.0, ge=0)
    db_lock_timeout_sec: float = _setting(1.0, ge=0)
    db_idle_in_transaction_timeout_sec: float = _setting(10.0, ge=0)
    db_tcp_user_timeout_sec: float = _setting(10.0, ge=0)
    db_keepalives_idle_sec: int = _setting(5, ge=1)
    db_keepalives_interval_sec: int = _setting(2, ge=1)
    db_keepalives_count: int = _setting(3, ge=1)

    # Consumers
    consumer_group_name: str = _setting("db_writer", min_length=1)
    consumer_name: str = _setting("worker-01", min_length=1, max_length=200)
    batch_size: int = _setting(1000, ge=1, le=100_000)
    batch_timeout_sec: float = _setting(5.0, gt=0, le=300)
    batch_linger_ms: float = _setting(100.0, ge=0, le=60_000)
    processing_interval_sec: float = _setting(0.0, ge=0, le=60)
    max_retries: int = _setting(5, ge=1, le=1000)
    claim_idle_ms: int = _setting(60_000, ge=1000)
    stream_rescan_sec: float = _setting(10.0, gt=0)
    consumer_lock_ttl_sec: float = _setting(10.0, ge=2)

    # Streams, and where a reading's identity comes from (see schema.Layout)
    device_id_field: str | None = None
    sensor_type_field: str | None = None
    stream_pattern: str = _setting("mqtt_stream:*", min_length=1)
    dead_letter_stream: str = _setting("mqtt_stream:failed", min_length=1)
    dead_letter_maxlen: int = _setting(100_000, ge=100)
    dead_letter_retention: str | None = "90 days"

    # The ledger (db_writer_progress, db_writer_streams) and the sensor registry
    ledger_retention: str | None = "30 days"

    # Database schema
    table_name: str = "sensor_readings"
    enable_timescale: bool = False
    timescale_chunk_interval: str = "1 day"
    timescale_compress_after: str | None = None
    timescale_retention: str | None = None

    # Running
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    shutdown_timeout_sec: float = _setting(30.0, gt=0)
    max_outage_sec: float = _setting(900.0, ge=0)
    metrics_port: int | None = _setting(None, ge=1, le=65535)
    metrics_host: str = "0.0.0.0"  # all interfaces; 127.0.0.1 to keep the endpoint on the machine
    gap_factor: float = _setting(3.0, gt=1)  # a gap: no reading for this many times a sensor's usual interval

    @classmethod
    def names(cls) -> list[str]:
        """Every setting's field name, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    # Derived values: the rest of the code asks these, never the raw parts.

    @property
    def redis_dsn(self) -> str:
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        auth = f":{quote(self.redis_password.get_secret_value(), safe='')}@" if self.redis_password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [
            (h.strip(), int(p))
            for h, _, p in (a.strip().rpartition(":") for a in (self.redis_sentinels or "").split(","))
        ]

    @property
    def postgres_dsn(self) -> str:
        """A libpq URL for psycopg (no SQLAlchemy driver suffix)."""
        if self.database_url is not None:
            return self.database_url.get_secret_value().replace("postgresql+psycopg://", "postgresql://", 1)
        auth = quote(self.db_user, safe="")
        if self.db_password is not None:
            auth += ":" + quote(self.db_password.get_secret_value(), safe="")
        return f"postgresql://{auth}@{self.db_host}:{self.db_port}/{quote(self.db_name or '', safe='')}"

    @property
    def sqlalchemy_url(self) -> str:
        return "postgresql+psycopg://" + self.postgres_dsn.split("://", 1)[1]

    @property
    def block_ms(self) -> int:
        return int(self.batch_timeout_sec * 1000)

    @property
    def postgres_connect_kwargs(self) -> dict[str, object]:
        """libpq options that bound a connection's network waits (see the settings above),
        and which worker it is (application_name); an option DATABASE_URL sets itself wins."""
        from psycopg.conninfo import conninfo_to_dict

        kwargs: dict[str, object] = {
            "application_name": f"db-writer {self.consumer_name}"[:63],  # which worker, in pg_stat_activity
            "connect_timeout": max(1, round(self.db_connect_timeout_s)),
            "keepalives": 1,
            "keepalives_idle": self.db_keepalives_idle_sec,
            "keepalives_interval": self.db_keepalives_interval_sec,
            "keepalives_count": self.db_keepalives_count,
        }
        if self.db_tcp_user_timeout_sec:
            kwargs["tcp_user_timeout"] = round(self.db_tcp_user_timeout_sec * 1000)
        given = conninfo_to_dict(self.postgres_dsn)
        return {name: value for name, value in kwargs.items() if name not in given}


# Never shown or echoed in an error: the settings typed Secret.
_SECRET_FIELDS = frozenset(name for name, kind in get_type_hints(Settings).items() if Secret in (kind, *get_args(kind)))


# -- validation ------------------------------------------------------------------------------
# Each value is first given its field's type (from text, as .env and the environment hold
# it), then its bounds and its field's checks below run, in field order: a check sees the
# fields before it that were valid. The whole-settings checks run once every field is valid.

_CHECKS: dict[str, list[Callable[[Any, dict[str, Any]], Any]]] = {}
# Choices are case-insensitive: the text is folded before it is matched.
_FOLD: dict[str, Callable[[str], str]] = {"log_level": str.upper, "log_format": str.lower, "redis_mode": str.lower}


def _check(*names: str) -> Callable[[Callable[[Any, dict[str, Any]], Any]], Callable[[Any, dict[str, Any]], Any]]:
    def register(fn: Callable[[Any, dict[str, Any]], Any]) -> Callable[[Any, dict[str, Any]], Any]:
        for name in names:
            _CHECKS.setdefault(name, []).append(fn)
        return fn

    return register


@_check("table_name")
def _plain_identifier(value: str, _: dict[str, Any]) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError("must be a plain SQL identifier (letters, digits, _; at most 63 characters)")
    return value


@_check(
    "timescale_chunk_interval",
    "timescale_compress_after",
    "timescale_retention",
    "ledger_retention",
    "dead_letter_retention",
)
def _interval(value: str | None, _: dict[str, Any]) -> str | None:
    if value is None or not value.strip():
        return None
    if not re.fullmatch(r"\d+\s*(second|minute|hour|day|week|month|year)s?", value.strip()):
        raise ValueError("must look like '1 day', '6 hours' or '2 weeks'")
    return value.strip()


@_check("redis_sentinels")
def _sentinel_addresses(value: str | None, _: dict[str, Any]) -> str | None:
    if value is None or not value.strip():
        return None
    for address in value.split(","):
        host, _sep, port = address.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port[,host:port...] (bad address {address.strip()!r})")
    return value


@_check("device_id_field", "sensor_type_field")
def _identity_field(value: str | None, _: dict[str, Any]) -> str | None:
    if value is None or not value.strip():
        return None
    if value in {"value", "timestamp", "metadata"}:
        raise ValueError(f"{value!r} is a reading's own field; name the field that carries the identity")
    return value


@_check("sensor_type_field")
def _both_identity_fields(value: str | None, data: dict[str, Any]) -> str | None:
    device = data.get("device_id_field")
    if (device is None) != (value is None):
        raise ValueError("DEVICE_ID_FIELD and SENSOR_TYPE_FIELD are set together, or neither is")
    if value is not None and value == device:
        raise ValueError("must differ from DEVICE_ID_FIELD")
    return value


@_check("stream_pattern")
def _splittable(value: str, data: dict[str, Any]) -> str:
    if data.get("device_id_field") is None and "sensor_type_field" in data:
        schema.stream_prefix(value)  # the identity is in the stream name: the pattern must say where
    return value


@_check("redis_url")
def _redis_scheme(value: Secret | None, _: dict[str, Any]) -> Secret | None:
    if value is not None and urlsplit(value.get_secret_value()).scheme not in {"redis", "rediss", "unix"}:
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return value


@_check("database_url")
def _postgres_scheme(value: Secret | None, _: dict[str, Any]) -> Secret | None:
    if value is None:
        return value
    parts = urlsplit(value.get_secret_value())
    if parts.scheme not in {"postgresql", "postgres", "postgresql+psycopg"}:
        raise ValueError("must be a postgresql:// URL")
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise ValueError("must name a database (postgresql://user@host:5432/DBNAME)")
    return value


def _whole(s: Settings) -> None:
    """Checks across settings, once each field is valid on its own."""
    if s.redis_mode == "sentinel" and not (s.redis_sentinels and s.redis_sentinel_master):
        raise ValueError("REDIS_MODE=sentinel needs REDIS_SENTINELS (host:port,...) and REDIS_SENTINEL_MASTER")
    if s.redis_mode == "cluster" and s.redis_db:
        raise ValueError("REDIS_MODE=cluster: a Redis Cluster has database 0 only (REDIS_DB)")
    if s.database_url is None and not s.db_name:
        raise ValueError("DATABASE_URL (or DB_NAME with DB_HOST/DB_PORT/DB_USER/DB_PASSWORD) must be set")
    if s.db_pool_min_size > s.db_pool_max_size:
        raise ValueError("DB_POOL_MIN_SIZE must not exceed DB_POOL_MAX_SIZE")


@dataclass(frozen=True)
class Problem:
    """One bad setting: which (None for a check across settings), why, and the value given."""

    name: str | None
    message: str
    given: Any = None


class Invalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems[0].message)
        self.problems = problems


_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}


def _typed(kind: Any, value: Any) -> Any:
    """`value` (text from .env or the environment, or a typed override) as `kind`."""
    if isinstance(kind, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and not value.strip()):
            return None  # an optional setting left blank is unset
        (kind,) = [k for k in get_args(kind) if k is not type(None)]
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        if value not in choices:
            quoted = [repr(c) for c in choices]
            raise ValueError(f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}")
        return value
    if kind is Secret:
        return value if isinstance(value, Secret) else Secret(_text(value))
    if kind is str:
        return _text(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ValueError("Input should be a valid boolean (true/false, 1/0, yes/no, on/off)")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise ValueError("Input should be a valid integer")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("Input should be a valid number") from None
    raise TypeError(f"no conversion to {kind!r}")  # a field of a type this module does not know


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("Input should be a valid string")
    return value


def _bounded(value: Any, bounds: dict[str, Any]) -> None:
    if value is None:
        return
    if "ge" in bounds and value < bounds["ge"]:
        raise ValueError(f"Input should be greater than or equal to {bounds['ge']}")
    if "gt" in bounds and value <= bounds["gt"]:
        raise ValueError(f"Input should be greater than {bounds['gt']}")
    if "le" in bounds and value > bounds["le"]:
        raise ValueError(f"Input should be less than or equal to {bounds['le']}")
    if "min_length" in bounds and len(value) < bounds["min_length"]:
        raise ValueError(f"String should have at least {bounds['min_length']} character(s)")
    if "max_length" in bounds and len(value) > bounds["max_length"]:
        raise ValueError(f"String should have at most {bounds['max_length']} characters")


def _validated(values: dict[str, Any]) -> Settings:
    """Settings from raw values, or Invalid with every problem found."""
    hints = get_type_hints(Settings)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    problems = [Problem(name, "not a setting", value) for name, value in values.items() if name not in fields]
    data: dict[str, Any] = {}
    for name, spec in fields.items():
        given = values.get(name, spec.default)
        if name in _FOLD and isinstance(given, str):
            given = _FOLD[name](given.strip())
        try:
            value = _typed(hints[name], given)
            _bounded(value, dict(spec.metadata))
            for check in _CHECKS.get(name, ()):
                value = check(value, data)
        except (ValueError, ConfigError) as exc:
            problems.append(Problem(name, str(exc), given))
            continue
        data[name] = value
    if problems:
        raise Invalid(problems)
    settings = Settings(**data)
    try:
        _whole(settings)
    except ValueError as exc:
        raise Invalid([Problem(None, str(exc))]) from None
    return settings


def mask_url(url: str) -> str:
    """The URL with its password replaced, for logs and messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


@dataclass
class Inspection:
    """What `main.py config` reports: each setting with its source, the problems, warnings."""

    env_file: Path
    values: dict[str, tuple[str, str]] = field(default_factory=dict)  # NAME -> (shown value, source)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    settings: Settings | None = None


def env_file_path(explicit: str | Path | None = None) -> Path:
    """The one .env every entry point reads: --env-file, else DB_WRITER_ENV_FILE, else ./.env."""
    return Path(explicit or os.environ.get(ENV_FILE_VARIABLE) or ".env")


def load_settings(env_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from the .env file and the environment; overrides (for tests) win."""
    values, _, _ = _gather(env_file_path(env_file), overrides)
    try:
        return _validated(values)
    except Invalid as exc:
        raise ConfigError(_describe(exc.problems[0])) from None


def inspect_settings(env_file: str | Path | None = None) -> Inspection:
    """Every setting's effective value and source, and every problem at once."""
    path = env_file_path(env_file)
    values, sources, unknown = _gather(path, {})
    report = Inspection(path)
    report.warnings = warnings(values, unknown)
    try:
        report.settings = _validated(values)
    except Invalid as exc:
        report.problems = [_describe(problem) for problem in exc.problems]
    for spec in dataclasses.fields(Settings):
        name = spec.name
        value = getattr(report.settings, name) if report.settings else values.get(name, spec.default)
        shown = "-" if value is None else ("***" if name in _SECRET_FIELDS and value else str(value))
        if name in _SECRET_FIELDS and isinstance(value, Secret | str) and "://" in str(_plain(value)):
            shown = mask_url(str(_plain(value)))
        report.values[name.upper()] = (shown, sources.get(name, "default"))
    return report


def warnings(values: dict[str, Any], unknown: list[str]) -> list[str]:
    """Likely mistakes that are not errors: a misspelt name, settings that cancel others."""
    import difflib

    out = []
    names = [n.upper() for n in Settings.names()]
    for name in unknown:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
        out.append(f"{name} is not a setting" + (f" (did you mean {close[0]}?)" if close else ""))
    for winner, losers in _OVERRIDES.items():
        if values.get(winner):
            ignored = [n.upper() for n in losers if n in values]
            if ignored:
                out.append(
                    f"{winner.upper()} is set, so {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored"
                )
    return out


def _gather(env_file: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """-> (values by field name, where each came from, unknown names in .env that look like ours)."""
    fields = set(Settings.names())
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    unknown: list[str] = []
    if env_file.is_file():
        from dotenv import dotenv_values

        for key, value in dotenv_values(env_file).items():
            name = key.lower()
            if name in fields:
                if value is not None:
                    values[name], sources[name] = value, str(env_file)
            elif key.upper().startswith(_OUR_PREFIXES) and not key.upper().startswith(_NOT_OURS):
                unknown.append(key.upper())
    for key, value in os.environ.items():
        name = key.lower()
        if name in fields:
            values[name], sources[name] = value, "environment"
    for name, value in overrides.items():
        values[name], sources[name] = value, "override"
    return values, sources, unknown


def _plain(value: object) -> object:
    return value.get_secret_value() if isinstance(value, Secret) else value


def _describe(problem: Problem) -> str:
    """A problem as `NAME: reason (got 'value')`, never echoing a secret."""
    message = problem.message
    if problem.name is None:
        return message if re.match(r"[A-Z][A-Z_]+[ =:]", message) else f"invalid configuration: {message}"
    given = problem.given
    hidden = problem.name in _SECRET_FIELDS or given is None or repr(given) in message
    shown = "" if hidden else f" (got {given!r})"
    return f"{problem.name.upper()}: {message}{shown}"
