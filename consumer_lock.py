"""One live process per CONSUMER_NAME.

Two processes reading as the same consumer would share one pending list and ack
each other's entries without noticing. A worker therefore holds a Redis key with
a TTL and refreshes it from a heartbeat thread. A worker restarted after a crash
on the same host takes the key over at once when the recorded PID is dead;
otherwise it waits out the TTL, then refuses to start.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import redis
import structlog

from errors import StartupError
from redis_client import translated

log = structlog.get_logger("consumer_lock")

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


def holder(client: redis.Redis, group: str, consumer: str) -> str | None:
    """`host|pid|token` of the live worker holding this name, or None."""
    return _text(client.get(lock_key(group, consumer))) or None


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


class ConsumerLock:
    def __init__(self, client: redis.Redis, group: str, consumer: str, ttl_s: float) -> None:
        self._redis = client
        self.key = lock_key(group, consumer)
        self._consumer = consumer
        self._ttl_ms = int(ttl_s * 1000)
        self._token = f"{socket.gethostname()}|{os.getpid()}|{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()  # set when another process holds our name

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
                log.info("taking over the name of a crashed worker", consumer=self._consumer, previous=holder)
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
            self._redis.eval(_RELEASE, 1, self.key, self._token)
        except redis.RedisError:
            pass  # the TTL frees the name anyway

    def _heartbeat(self) -> None:
        interval = self._ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                held = self._redis.eval(_REFRESH, 1, self.key, self._token, self._ttl_ms)
            except redis.RedisError:
                continue  # Redis down: the main loop sees it too; keep trying
            if not held:
                log.error("another process took this consumer name", consumer=self._consumer)
                self.lost.set()
                return


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
