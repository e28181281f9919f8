"""ReadAhead: bounded read-ahead (backpressure), order, errors, stop. Pure threading, no servers."""

from __future__ import annotations

import threading
import time

import pytest

from read_ahead import ReadAhead


def test_never_more_than_depth_batches_exist():
    stop, started = threading.Event(), []

    def read() -> int:
        started.append(time.monotonic())
        return len(started)

    seen = []
    with ReadAhead(read, stop, depth=2) as batches:
        for batch in batches:
            time.sleep(0.05)  # a slow database
            assert len(started) <= len(seen) + 2  # the one in hand and one ahead, no more
            seen.append(batch)
            if len(seen) == 5:
                stop.set()
    assert seen[:5] == [1, 2, 3, 4, 5]
    assert seen == list(range(1, len(seen) + 1))  # batches read before the stop still come, in order


def test_a_read_error_reaches_the_caller():
    def read() -> int:
        raise RuntimeError("redis exploded")

    with pytest.raises(RuntimeError, match="redis exploded"), ReadAhead(read, threading.Event()) as batches:
        for _ in batches:
            pass
