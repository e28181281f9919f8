"""The benchmark's workload, in the seed's message format.

Streams are `mqtt_stream:{device_id}:{sensor_type}` (4 sensors per device); each
entry has `value` ("23.51"), `timestamp` (ISO 8601 with microseconds and Z) and,
on every 10th entry, `metadata` (a small JSON object).
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

SENSORS = ("temperature", "humidity", "pressure", "co2")
T0 = datetime(2024, 1, 1, tzinfo=UTC)
METADATA = '{"unit":"C","battery":%d,"rssi":-61,"fw":"1.4.2"}'


def stream_names(count: int) -> list[bytes]:
    """count streams: devices dev0000, dev0001, ... with 4 sensors each."""
    return [f"mqtt_stream:dev{k // 4:04d}:{SENSORS[k % 4]}".encode() for k in range(count)]


def iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entries(total: int, streams: int, seed: int = 12) -> list[tuple[bytes, dict]]:
    """(stream, fields), round-robin over the streams as sensors reporting at one rate
    arrive; timestamps are unique per stream (entry j of a stream is at T0 + j s)."""
    rng = random.Random(seed)
    names = stream_names(streams)
    out = []
    for i in range(total):
        ts = T0 + timedelta(seconds=i // streams, microseconds=rng.randrange(1_000_000))
        fields = {b"value": f"{rng.uniform(-20, 40):.2f}".encode(), b"timestamp": iso(ts).encode()}
        if i % 10 == 0:
            fields[b"metadata"] = (METADATA % rng.randrange(101)).encode()
        out.append((names[i % streams], fields))
    return out


def publish(client, items: list[tuple[bytes, dict]], chunk: int = 5000) -> None:
    """XADD everything, pipelined (done before any timing starts: a backlog to drain)."""
    for start in range(0, len(items), chunk):
        pipe = client.pipeline(transaction=False)
        for stream, fields in items[start : start + chunk]:
            pipe.xadd(stream, fields)
        pipe.execute()


def produce(client, names: list[bytes], rate: float, seconds: float) -> tuple[int, float]:
    """XADD at a steady `rate` entries/s for `seconds`, round-robin over `names`, each
    timestamp taken when its entry is published. Returns (entries sent, seconds taken)."""
    rng = random.Random(7)
    start = time.perf_counter()
    sent = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed * rate) - sent
        if due > 0:
            pipe = client.pipeline(transaction=False)
            for k in range(sent, sent + due):
                now = iso(datetime.now(UTC))
                pipe.xadd(names[k % len(names)], {"value": f"{rng.uniform(-20, 40):.2f}", "timestamp": now})
            pipe.execute()
            sent += due
        time.sleep(0.002)
    return sent, time.perf_counter() - start
