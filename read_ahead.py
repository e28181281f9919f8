"""Read the next batch while the current one is written.

A thread calls `read` ahead of the caller. At most `depth` batches exist at once
(the one being written counts), so when PostgreSQL slows down the reads stop too:
the worker never reads unboundedly ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadAhead(Generic[T]):
    def __init__(
        self,
        read: Callable[[], T],
        stop: threading.Event,
        join_within: Callable[[], float | None] = lambda: None,
        depth: int = 2,
    ) -> None:
        """`join_within()` bounds the wait for the reader at exit (the stop deadline): a read
        still running then is abandoned; what it read stays pending and is redelivered."""
        self._read = read
        self._stop = stop
        self._join_within = join_within
        self._slots = threading.Semaphore(depth)
        self._ready: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)

    def __enter__(self) -> ReadAhead[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._slots.release()  # a reader waiting for a slot must see the stop
        self._thread.join(self._join_within())

    def __iter__(self) -> Iterator[T]:
        """Batches in the order read. After a stop, those already read still come (they are
        in flight: delivered to this consumer), then the iteration ends."""
        while True:
            kind, item = self._ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            try:
                yield item
            finally:
                self._slots.release()

    def _run(self) -> None:
        try:
            while True:
                self._slots.acquire()
                if self._stop.is_set():
                    break
                self._ready.put(("batch", self._read()))
        except BaseException as exc:  # handed to the caller's thread, which acts on it
            self._ready.put(("error", exc))
        self._ready.put(("end", None))
