"""One live process per CONSUMER_NAME, and what each live worker says about itself.

Two processes reading as the same consumer would share one pending list and ack
each other's entries without noticing. A worker therefore holds a Redis key with
a TTL and refreshes it from a heartbeat thread. A worker restarted after a crash
on the same host takes the key over at once when the recorded PID is dead;
otherwise it waits out the TTL, then refuses to start.

The same heartbeat refreshes the worker's record (a hash with the same TTL): host,
pid, start, last heartbeat, last commit and its counters. `health` and `status` read
these records: what a worker says about itself, not what the command's own process
knows (nothing), and a worker that stopped answering disappears with its TTL.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from errors import StartupError
from redis_client import translated

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def lock_key(group: str, consumer: str) -> str:
    return f"db_writer:lock:{group}:{consumer}"


def record_key(group: str, consumer: str) -> str:
    return f"db_writer:worker:{group}:{consumer}"


def workers(client: redis.Redis, group: str) -> list[dict]:
    """The records of the live workers of a group (every node of a cluster), by name."""
    found = []
    for key in sorted(client.scan_iter(match=f"db_writer:worker:{group}:*", count=1000)):
        record = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
        if record:
            found.append(_parsed(record))
    return found


def worker(client: redis.Redis, group: str, consumer: str) -> dict | None:
    """The record of one live worker, or None."""
    record = {_text(k): _text(v) for k, v in client.hgetall(record_key(group, consumer)).items()}
    return _parsed(record) if record else None


def _parsed(record: dict[str, str]) -> dict:
    now = time.time()
    out: dict = {"consumer": record.get("consumer"), "host": record.get("host"), "pid": int(record.get("pid") or 0)}
    for name in ("started_at", "heartbeat_at", "last_commit_at"):
        value = float(record[name]) if record.get(name) else None
        out[name] = value
        out[name.replace("_at", "_age_s")] = None if value is None else round(now - value, 1)
    out["stats"] = json.loads(record.get("stats") or "{}")
    out["version"] = record.get("version")
    return out


def holder(client: redis.Redis, group: str, consumer: str) -> str | None:
    """`host|pid|token` of the live worker holding this name, or None."""
    return _text(client.get(lock_key(group, consumer))) or None


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


class ConsumerLock:
    def __init__(
        self, client: redis.Redis, group: str, consumer: str, ttl_s: float, describe: Callable[[], dict] | None = None
    ) -> None:
        """`describe()` gives the fields of the worker's record, refreshed with each heartbeat."""
        self._redis = client
        self.key = lock_key(group, consumer)
        self._record = record_key(group, consumer)
        self._describe = describe
        self._started_at = time.time()
        self._consumer = consumer
        self._ttl_ms = int(ttl_s * 1000)
        self._token = f"{socket.gethostname()}|{os.getpid()}|{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()  # set when another process holds our name
        # structlog loads here, not at import: `health` and `status` read records with
        # workers() and worker() and start faster without it.
        import structlog

        self._log = structlog.get_logger("consumer_lock")

    def acquire(self) -> None:
        """Take the name, waiting out a crashed holder's TTL; Redis errors are translated."""
        with translated("take the consumer name"):
            self._acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="consumer-lock", daemon=True)
        self._thread.start()

    def _acquire(self) -> None:
        deadline = time.monotonic() + self._ttl_ms / 1000 + 1
        while True:
            if self._redis.set(self.key, self._token, nx=True, px=self._ttl_ms):
                break
            holder = _text(self._redis.get(self.key))
            if _is_dead_local_process(holder):
                self._log.info("taking over the name of a crashed worker", consumer=self._consumer, previous=holder)
                self._redis.set(self.key, self._token, px=self._ttl_ms)
                break
            if time.monotonic() > deadline:
                host, pid, _ = ([*holder.split("|"), "?", "?", "?"])[:3]
                raise StartupError(
                    f"CONSUMER_NAME {self._consumer!r} is in use by a live worker (host {host}, pid {pid}); "
                    "give each worker its own CONSUMER_NAME"
                )
            time.sleep(0.5)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._redis.delete(self._record)
            self._redis.eval(_RELEASE, 1, self.key, self._token)
        except redis.RedisError:
            pass  # the TTL frees the name anyway

    def _heartbeat(self) -> None:
        interval = self._ttl_ms / 3000
        while True:
            try:
                held = self._redis.eval(_REFRESH, 1, self.key, self._token, self._ttl_ms)
                if held:
                    self._write_record()
            except redis.RedisError:
                held = True  # Redis down: the main loop sees it too; keep trying
            if not held:
                self._log.error("another process took this consumer name", consumer=self._consumer)
                self.lost.set()
                return
            if self._stop.wait(interval):
                return

    def _write_record(self) -> None:
        host, pid, _ = self._token.split("|")
        fields: dict[Any, Any] = {
            "consumer": self._consumer,
            "host": host,
            "pid": pid,
            "started_at": f"{self._started_at:.3f}",
            "heartbeat_at": f"{time.time():.3f}",
        }
        if self._describe is not None:
            fields |= {name: value for name, value in self._describe().items() if value is not None}
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self._record, mapping=fields)
        pipe.pexpire(self._record, self._ttl_ms)
        pipe.execute()


def _is_dead_local_process(holder: str) -> bool:
    host, _, pid = holder.partition("|")
    pid = pid.partition("|")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) == os.getpid()
