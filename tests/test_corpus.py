"""Every hostile-corpus item through the default Layout.to_row: the expected row or dead letter, quickly.

Each item runs as Redis delivers it (bytes) and, when it is all UTF-8, again as str
(replays and tests pass str): both must give the same outcome.
"""

import json
import math
import time
from datetime import UTC, datetime

import pytest

from corpus import load_corpus
from schema import InvalidEntry, Layout

to_row = Layout(prefix="mqtt_stream:").to_row
ENTRY_ID = b"1700000000000-0"
ENTRY_TIME = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
CORPUS = list(load_corpus())


def _as_str(stream: bytes, fields: dict[bytes, bytes]):
    try:
        return stream.decode(), {k.decode(): v.decode() for k, v in fields.items()}
    except UnicodeDecodeError:
        return None


def _check(stream, fields, expected) -> None:
    started = time.perf_counter()
    try:
        row = to_row(stream, ENTRY_ID, fields)
    except InvalidEntry as exc:
        elapsed = time.perf_counter() - started
        assert "dead_letter" in expected, f"unexpected dead letter: {exc.step}: {exc}"
        assert (exc.step, str(exc)) == (expected["dead_letter"]["step"], exc.reason)
        assert expected["dead_letter"]["reason_contains"] in exc.reason
    else:
        elapsed = time.perf_counter() - started
        assert "row" in expected, f"expected a dead letter, got {row!r:.300}"
        want = expected["row"]
        timestamp, device_id, sensor_type, value, metadata = row
        want_time = ENTRY_TIME if want["timestamp"] is None else datetime.fromisoformat(want["timestamp"])
        assert timestamp == want_time and timestamp.tzinfo is UTC
        assert (device_id, sensor_type) == (want["device_id"], want["sensor_type"])
        assert value == want["value"] and math.copysign(1, value) == math.copysign(1, want["value"])
        if "metadata" in want:
            assert (None if metadata is None else json.loads(metadata)) == want["metadata"]
    assert elapsed < 0.1, f"took {elapsed:.3f} s: hostile input must be handled cheaply"


@pytest.mark.parametrize(("stream", "fields", "expected"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_corpus_item(stream, fields, expected):
    _check(stream, fields, expected)
    as_str = _as_str(stream, fields)
    if as_str is not None:
        _check(*as_str, expected)


def test_corpus_is_big_and_names_are_unique():
    names = [c[0] for c in CORPUS]
    assert len(names) >= 60 and len(set(names)) == len(names)
    assert {next(iter(c[3])) for c in CORPUS} == {"row", "dead_letter"}
