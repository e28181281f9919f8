"""Microseconds per entry for Layout.to_row, the writer's hot path.

Run: uv run python bench/bench_schema.py
"""

import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schema import Layout

STREAM = b"mqtt_stream:esp32-kitchen-01:temperature"
ENTRY_ID = b"1700000000123-0"
FIELDS_LAYOUT = Layout(device_field="device_id", sensor_field="metric")
NAME_LAYOUT = Layout(prefix="mqtt_stream:")
ISO = b"2024-05-01T12:34:56.789123+00:00"
METADATA = b'{"unit":"C","battery":87,"rssi":-61,"fw":"1.4.2"}'

CASES = {
    "ISO timestamp, no metadata": {b"value": b"23.5", b"timestamp": ISO},
    "ISO timestamp, metadata": {b"value": b"23.5", b"timestamp": ISO, b"metadata": METADATA},
    "ISO timestamp, metadata + 2 extra fields": {
        b"value": b"23.5",
        b"timestamp": ISO,
        b"metadata": METADATA,
        b"unit": b"C",
        b"room": b"kitchen",
    },
    "epoch ms timestamp": {b"value": b"23.5", b"timestamp": b"1714566896789"},
    "epoch s timestamp (fractional)": {b"value": b"23.5", b"timestamp": b"1714566896.789"},
    "missing timestamp (entry id)": {b"value": b"23.5"},
    "str input, ISO, metadata": {"value": "23.5", "timestamp": ISO.decode(), "metadata": METADATA.decode()},
}


def _best_us(call) -> float:
    """Best of 7 runs: the least disturbed by whatever else shares the machine."""
    timer = timeit.Timer(call)
    loops, _ = timer.autorange()
    return min(timer.repeat(repeat=7, number=loops)) / loops * 1e6


def main() -> None:
    print(f"{'case':<42} {'µs/entry':>9}")
    for name, fields in CASES.items():
        stream = STREAM.decode() if name.startswith("str") else STREAM
        _report(name, NAME_LAYOUT.to_row, stream, fields)
    # The upstream's later producer: one shared stream, identity in fields (a MAC address).
    shared = {b"device_id": b"a4:cf:12:00:00:01", b"metric": b"temperature", b"value": b"23.5", b"timestamp": ISO[:26]}
    _report("identity in fields (mqtt:ingestion)", FIELDS_LAYOUT.to_row, b"mqtt:ingestion", shared)
    # A yardstick for comparing machines: what the metadata alone costs json.loads.
    print(f"{'(yardstick: json.loads of the metadata)':<42} {_best_us(lambda: json.loads(METADATA)):>9.2f}")


def _report(name: str, to_row, stream, fields) -> None:
    to_row(stream, ENTRY_ID, fields)  # warm the stream-name cache, fail loudly on a bad case
    print(f"{name:<42} {_best_us(lambda: to_row(stream, ENTRY_ID, fields)):>9.2f}")


if __name__ == "__main__":
    main()
