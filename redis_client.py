"""Every Redis client of the project is built here, and every Redis error is classified here.

A client's socket timeout outlasts the longest command it sends (a blocking read is cut
into pieces of at most BLOCK_SLICE_MS), so a silent connection is noticed within
REDIS_SOCKET_TIMEOUT_SEC and never waits forever.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from config import Settings
from errors import PermanentAtStart, TransientError

BLOCK_SLICE_MS = 1000  # a blocking read waits at most this long at a time, so a stop is seen within a second

# Replies that mean "not now": a server loading its data, out of memory, demoted to a
# replica, without a quorum of replicas, or a cluster in the middle of a change.
_TRANSIENT_REPLIES = (
    "OOM",
    "READONLY",
    "LOADING",
    "MASTERDOWN",
    "NOREPLICAS",
    "MISCONF",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
    "BUSY ",
)
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.SlotNotCoveredError,
)
_REFUSED_CREDENTIALS = (
    redis.AuthenticationError,
    redis.exceptions.AuthorizationError,
    redis.exceptions.NoPermissionError,
)


def connect(settings: Settings, *, timeout_s: float | None = None) -> redis.Redis:
    """A client for the settings' Redis, in its topology (REDIS_MODE): one server, a cluster
    (redis-py's RedisCluster routes each key to its slot's primary and follows MOVED/ASK),
    or the primary that Sentinel names (`Sentinel.master_for()` finds it again after a
    failover). `timeout_s` shortens the socket timeouts (operator commands, probes)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s or settings.redis_socket_timeout_sec + BLOCK_SLICE_MS / 1000,
        "socket_connect_timeout": timeout_s or settings.db_connect_timeout_s,
        "decode_responses": False,
        "retry": Retry(NoBackoff(), 1),  # one retry for a pooled connection that went stale; db-writer retries the rest
    }
    if settings.redis_mode == "cluster":
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(settings.redis_dsn, **options)  # type: ignore[return-value]
    if settings.redis_mode == "sentinel":
        from redis.sentinel import Sentinel

        parts = urlsplit(settings.redis_dsn)
        password = unquote(parts.password) if parts.password else None
        watchers = {
            "socket_timeout": options["socket_timeout"],
            "socket_connect_timeout": options["socket_connect_timeout"],
        }
        if settings.redis_sentinel_password is not None:
            watchers["password"] = settings.redis_sentinel_password.get_secret_value()
        sentinel = Sentinel(settings.sentinel_addresses, sentinel_kwargs=watchers, **options)
        db = int(parts.path.strip("/") or 0)
        return sentinel.master_for(
            settings.redis_sentinel_master, password=password, db=db, ssl=parts.scheme == "rediss"
        )
    return redis.Redis.from_url(settings.redis_dsn, health_check_interval=30, **options)


def pack(*args: bytes | str | int) -> list[bytes]:
    """A command in Redis's protocol, for `call_packed`. hiredis packs it in C; redis-py's
    own packer adds a pass in Python over every argument."""
    return [hiredis.pack_command(args)]  # type: ignore[arg-type]  # its stub says a 1-tuple


def call_packed(client: redis.Redis, command: list[bytes]) -> Any:
    """Send a packed command over a connection of the client's pool and read its reply (an
    error reply raised as redis-py raises it; no response callback applies). The hot path's
    reads and acks go this way: at a trickle a batch is two commands over hundreds of
    streams, and redis-py's work per call (packing every argument again, its hooks) cost
    the worker a tenth of its CPU. The pool replaces a connection the server closed while
    it was idle; one lost during the command is the caller's TransientError, retried.
    Not for a cluster client: it routes by key."""
    return read_reply(client, send_packed(client, command))


def send_packed(client: redis.Redis, command: list[bytes]) -> Any:
    """The first half of call_packed: -> the connection, out of the pool until read_reply."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(command)
    except (redis.ConnectionError, redis.TimeoutError):
        conn.disconnect()
        pool.release(conn)
        raise
    return conn


def read_reply(client: redis.Redis, conn: Any) -> Any:
    """The second half: the reply, and the connection back to the pool (dropped if it was lost)."""
    try:
        return conn.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        conn.disconnect()
        raise
    finally:
        client.connection_pool.release(conn)


def is_cluster(client: redis.Redis) -> bool:
    """A cluster client: keys of different slots never share a command, and nothing blocks."""
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def is_transient(exc: BaseException) -> bool:
    """True for errors that pass with time; an authentication error never does."""
    if isinstance(exc, _REFUSED_CREDENTIALS):
        return False
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


@contextmanager
def translated(doing: str) -> Iterator[None]:
    """Turns a lost, busy or read-only Redis into TransientError, naming what was being done;
    a refused password into PermanentAtStart (it will not pass by waiting)."""
    try:
        yield
    except (redis.RedisError, redis.exceptions.SlotNotCoveredError) as exc:
        if is_transient(exc):
            raise TransientError(f"redis unavailable ({doing}): {exc}") from exc
        if isinstance(exc, _REFUSED_CREDENTIALS):
            raise PermanentAtStart(f"Redis refused the credentials ({doing}): {exc}") from exc
        raise


def hash_tag(key: str) -> str:
    """The part of a key that Redis Cluster hashes: the first non-empty {...}, else the key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key
