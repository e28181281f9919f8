"""Simulated sensors, to see db-writer move readings: `./run-standalone.sh --demo` starts it.

A few devices publish temperature and humidity readings to
`mqtt_stream:{device_id}:{sensor_type}` in the format the service reads (value,
ISO 8601 timestamp, metadata JSON). Now and then one reading is bad on purpose
(not a number, NaN, a garbled timestamp), to show the dead-letter stream
(`mqtt_stream:failed`) and the db_writer_dead_letters table at work.

    uv run demo_producer.py [--devices 5] [--interval 2] [--bad-every 40] [--count N]

Redis comes from REDIS_URL (or REDIS_HOST / REDIS_PORT / REDIS_DB / REDIS_PASSWORD),
as for the service. SIGINT or SIGTERM stops it after the round in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import redis

PLACES = ["kitchen", "garage", "attic", "cellar", "greenhouse", "office", "bedroom", "porch"]
SENSORS = {  # sensor type -> (typical value, spread, lower bound, upper bound, unit)
    "temperature": (21.0, 4.0, -40.0, 85.0, "celsius"),
    "humidity": (50.0, 15.0, 0.0, 100.0, "percent"),
}
BAD_READINGS = [  # (what is wrong, fields) -- each becomes a dead letter, never a row
    ("value is not a number", {"value": "ERR"}),
    ("value is NaN", {"value": "NaN"}),
    ("timestamp is garbled", {"timestamp": "yesterday at noon"}),
]
STREAM_MAXLEN = 100_000  # approximate cap per stream, so a demo left running does not fill memory


def redis_url() -> str:
    if url := os.environ.get("REDIS_URL"):
        return url
    password = os.environ.get("REDIS_PASSWORD")
    auth = f":{quote(password, safe='')}@" if password else ""
    host = os.environ.get("REDIS_HOST", "localhost")
    return f"redis://{auth}{host}:{os.environ.get('REDIS_PORT', '6379')}/{os.environ.get('REDIS_DB', '0')}"


def masked(url: str) -> str:
    return url.split("://", 1)[0] + "://" + url.split("@", 1)[1] if "@" in url else url


class Device:
    def __init__(self, index: int, rng: random.Random) -> None:
        place = PLACES[index] if index < len(PLACES) else f"room{index + 1}"
        self.device_id = f"esp32-{place}"
        self.firmware = f"1.{rng.randint(2, 5)}.{rng.randint(0, 9)}"
        self.rssi = rng.randint(-80, -45)
        self.level = {
            name: typical + rng.uniform(-spread, spread) / 2 for name, (typical, spread, *_rest) in SENSORS.items()
        }

    def read(self, sensor: str, rng: random.Random) -> float:
        """A random walk that drifts back to the typical value, kept within the sensor's range."""
        typical, spread, low, high, _unit = SENSORS[sensor]
        level = self.level[sensor]
        level += rng.gauss(0, spread / 20) + (typical - level) * 0.05
        self.level[sensor] = min(high, max(low, level))
        return round(self.level[sensor], 2)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5, help="simulated devices (default 5)")
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="seconds between rounds; each device sends every sensor once a round (default 2)",
    )
    parser.add_argument(
        "--bad-every", type=int, default=40, help="every Nth reading is bad on purpose; 0 for none (default 40)"
    )
    parser.add_argument("--count", type=int, default=0, help="stop after this many rounds (default: run until stopped)")
    parser.add_argument("--prefix", default="mqtt_stream:", help="stream name prefix (default mqtt_stream:)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable values")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.interval <= 0 or args.bad_every < 0:
        parser.error("--devices must be >= 1, --interval > 0 and --bad-every >= 0")

    stop = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    rng = random.Random(args.seed)
    devices = [Device(i, rng) for i in range(args.devices)]
    url = redis_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    streams = len(devices) * len(SENSORS)
    print(
        f"publishing {len(devices)} devices x {', '.join(SENSORS)} every {args.interval:g} s "
        f"({streams / args.interval:.1f} readings/s) to {args.prefix}{{device_id}}:{{sensor_type}} "
        f"on {masked(url)}",
        flush=True,
    )
    if args.bad_every:
        print(
            f"every {args.bad_every}th reading is bad on purpose: it goes to the dead-letter stream, not the table",
            flush=True,
        )

    sent = bad = rounds = seq = 0
    down_since: str | None = None
    while not stop.is_set() and (not args.count or rounds < args.count):
        pipe = client.pipeline(transaction=False)
        notes = []
        for device in devices:
            for sensor, (*_values, unit) in SENSORS.items():
                fields: dict[Any, Any] = {
                    "value": f"{device.read(sensor, rng):.2f}",
                    "timestamp": now_iso(),
                    "metadata": json.dumps(
                        {"unit": unit, "firmware": device.firmware, "rssi": device.rssi + rng.randint(-3, 3)}
                    ),
                }
                stream = f"{args.prefix}{device.device_id}:{sensor}"
                seq += 1
                if args.bad_every and seq % args.bad_every == 0:
                    what, broken = rng.choice(BAD_READINGS)
                    fields.update(broken)
                    notes.append(
                        f"sent a bad reading on purpose to {stream} ({what}: "
                        f"{', '.join(f'{k}={v!r}' for k, v in broken.items())})"
                    )
                pipe.xadd(stream, fields, maxlen=STREAM_MAXLEN, approximate=True)
        try:
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if down_since is None:
                down_since = now_iso()
                print(f"redis unavailable ({exc}); retrying every second", file=sys.stderr, flush=True)
            stop.wait(1.0)
            continue
        if down_since is not None:
            print(f"redis reachable again (down since {down_since})", flush=True)
            down_since = None
        sent += streams
        bad += len(notes)
        rounds += 1
        for note in notes:
            print(note, flush=True)
        stop.wait(args.interval)

    client.close()
    print(f"stopped: published {sent} readings ({bad} bad on purpose) in {rounds} rounds", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
