"""The reader against a real Redis: BATCH_SIZE bounds a batch across streams, the COUNT
per stream adapts to the backlog, and no stream waits for the others to drain."""

from __future__ import annotations

import itertools
from collections import Counter

import config
import redis_reader


def make_reader(redis_client, redis_url: str, batch_size: int) -> redis_reader.StreamReader:
    settings = config.load_settings(
        redis_url=redis_url,
        database_url="postgresql://x@localhost/x",
        batch_size=batch_size,
        batch_timeout_sec=0.1,
        batch_linger_ms=0,
    )
    reader = redis_reader.StreamReader(redis_client, settings)
    reader.refresh_streams()
    return reader


def fill(redis_client, streams: int, per_stream: int, prefix: str = "s") -> None:
    pipe = redis_client.pipeline(transaction=False)
    for s in range(streams):
        for i in range(per_stream):
            pipe.xadd(f"mqtt_stream:{prefix}{s:04d}:t", {"value": str(i), "timestamp": str(i)})
    pipe.execute()


def drain(reader: redis_reader.StreamReader) -> list[redis_reader.Batch]:
    batches = []
    while batch := reader.read_new():
        batches.append(batch)
        reader.ack(batch.keys())
    return batches


def test_every_entry_is_read_once_and_no_batch_exceeds_batch_size(redis_client, redis_url):
    fill(redis_client, streams=300, per_stream=7)
    batches = drain(make_reader(redis_client, redis_url, batch_size=64))
    assert max(len(b.entries) for b in batches) <= 64
    read = Counter((s, i) for b in batches for s, i, _ in b.entries)
    assert len(read) == 300 * 7 and set(read.values()) == {1}


def test_over_a_deep_backlog_batches_touch_few_streams(redis_client, redis_url):
    """With COUNT 1 per stream, each batch of 100 would hold 100 streams (100 XACKs)."""
    fill(redis_client, streams=400, per_stream=50)
    batches = drain(make_reader(redis_client, redis_url, batch_size=100))
    streams_per_batch = sorted(len({s for s, _, _ in b.entries}) for b in batches)
    assert streams_per_batch[len(streams_per_batch) // 2] <= 4  # median
    assert sum(len(b.entries) for b in batches) == 400 * 50


def test_a_deep_stream_does_not_starve_the_others(redis_client, redis_url):
    fill(redis_client, streams=1, per_stream=5000, prefix="deep")
    fill(redis_client, streams=199, per_stream=1, prefix="shallow")
    reader = make_reader(redis_client, redis_url, batch_size=100)
    seen, batches = set(), 0
    while len(seen) < 199:
        batch = reader.read_new()
        assert batch, "nothing left to read, yet shallow streams were never read"
        reader.ack(batch.keys())
        seen |= {s for s, _, _ in batch.entries if b"shallow" in s}
        batches += 1
    assert batches <= 20  # the 5,000-entry stream alone is 50 batches


def test_one_deep_stream_among_many_small_ones_drains_in_big_batches(redis_client, redis_url):
    """The COUNT per stream is 1 with 1,000 streams in a window: a stream that fills it is
    topped up with the batch's room at once, instead of giving one entry per batch."""
    fill(redis_client, streams=1, per_stream=10_000, prefix="deep")
    fill(redis_client, streams=1000, per_stream=1, prefix="idle")
    batches = drain(make_reader(redis_client, redis_url, batch_size=1000))
    assert sum(len(b.entries) for b in batches) == 11_000
    assert len(batches) <= 15  # 10,000 one-entry batches before
    assert all(len(b.entries) <= 1000 for b in batches)


def counting_reads(monkeypatch) -> list:
    """XREADGROUP commands the readers send (packed, through redis_reader.call_packed)."""
    calls: list = []
    original = redis_reader.call_packed

    def counted(client, command):
        if command[0][:40].find(b"XREADGROUP") > 0:
            calls.append(1)
        return original(client, command)

    monkeypatch.setattr(redis_reader, "call_packed", counted)
    return calls


def empty_but(redis_client, streams: int, keep: set[int]) -> None:
    """`streams` streams that exist (with their group to come) but hold entries only in `keep`."""
    fill(redis_client, streams=streams, per_stream=1)
    for n in set(range(streams)) - keep:
        stream = f"mqtt_stream:s{n:04d}:t"
        redis_client.xdel(stream, *[entry_id for entry_id, _ in redis_client.xrange(stream)])


def test_when_the_backlog_thins_out_a_turn_over_the_streams_takes_few_reads(redis_client, redis_url, monkeypatch):
    """A COUNT grown over a deep backlog means windows of two streams. Once the streams are
    thin (other workers drained them), each empty window doubles the next one's width: with a
    fixed width, finding the 3 entries left among 400 streams took 127 reads."""
    empty_but(redis_client, 400, keep={50, 150, 350})
    reader = make_reader(redis_client, redis_url, batch_size=1000)
    reader._count = 500  # as a deep backlog left it
    calls = counting_reads(monkeypatch)
    assert len(reader.read_new().entries) == 3
    assert len(calls) <= 20, len(calls)


def test_a_batch_within_five_percent_of_batch_size_is_full(redis_client, redis_url, monkeypatch):
    """Its last few entries would be read over windows as narrow as they are few: 5 entries
    short of 1,000, two streams a read, 200 reads over streams that had nothing left."""
    empty_but(redis_client, 400, keep=set(range(0, 400, 40)))
    fill(redis_client, streams=1, per_stream=985, prefix="deep")
    reader = make_reader(redis_client, redis_url, batch_size=1000)
    reader._count = 2  # as a trickle over 400 streams leaves it (a new reader starts high)
    calls = counting_reads(monkeypatch)
    assert len(reader.read_new().entries) == 995
    assert len(calls) <= 4, len(calls)


def test_eight_workers_on_one_backlog(redis_client, redis_url, monkeypatch):
    """Eight consumers taking turns on 400 streams: every stream a batch touches costs an ack
    key and a registry row, so a batch should touch few. Windows others drained come back
    empty; if an empty window halved COUNT (as it once did), the next windows took a few
    entries from many streams: 1,770 streams touched in 203 reads. Leaving COUNT as it is
    there, and letting a round start the next at the COUNT it found entries with: 1,131
    touched in 301 reads. With w0 to w7 starting where their numbers spread them (ring_start)
    rather than where a hash of the name put them (seven of eight within 80 streams), they
    meet less: 540 touched, in 238 reads. COUNT starting at 1 and doubling had touched 7,542."""
    fill(redis_client, streams=400, per_stream=100)
    calls = counting_reads(monkeypatch)
    readers = []
    for k in range(8):
        settings = config.load_settings(
            redis_url=redis_url,
            database_url="postgresql://x@localhost/x",
            batch_size=1000,
            batch_linger_ms=0,
            batch_timeout_sec=0.1,
            consumer_name=f"w{k}",
        )
        readers.append(redis_reader.StreamReader(redis_client, settings))
        readers[-1].refresh_streams()
    read, touched, active = 0, 0, list(readers)
    while active:
        for reader in list(active):
            batch = reader.read_new()
            if not batch:
                active.remove(reader)
            read += len(batch.entries)
            touched += len({stream for stream, _, _ in batch.entries})
            reader.ack(batch.keys())
    assert read == 400 * 100
    assert touched <= 700, touched  # 540 here
    assert len(calls) <= 280, len(calls)  # 238 here


def test_numbered_workers_start_evenly_spread_over_the_streams():
    """A StatefulSet's pods (db-writer-0, -1, ...) or compose's replicas: any run of consecutive
    numbers leaves near-equal gaps between the starts. Other names still start apart."""
    for count in (2, 3, 4, 8, 16):
        for first in (0, 1, 7):
            starts = sorted(redis_reader.ring_start(f"db-writer-{k}") for k in range(first, first + count))
            gaps = [b - a for a, b in itertools.pairwise(starts)] + [1 + starts[0] - starts[-1]]
            assert max(gaps) < 1.6 / count and min(gaps) > 0.5 / count, (count, first, gaps)
    others = [redis_reader.ring_start(name) for name in ("alpha", "beta", "host-a-1", "host-b-1", "x-" + "9" * 30)]
    assert all(0 <= start < 1 for start in others) and len(set(others)) == len(others)


def test_a_trickle_costs_one_read_per_batch(redis_client, redis_url, monkeypatch):
    """Once the reader has seen that streams are thin: its first turn starts at COUNT =
    BATCH_SIZE (a backlog's best) and narrows it, window by window."""
    fill(redis_client, streams=400, per_stream=1)
    reader = make_reader(redis_client, redis_url, batch_size=1000)
    calls = counting_reads(monkeypatch)
    batch = reader.read_new()
    assert len(batch.entries) == 400 and len(calls) <= 12, len(calls)  # log2(1000) + 2
    reader.ack(batch.keys())
    fill(redis_client, streams=400, per_stream=1)
    calls.clear()
    batch = reader.read_new()
    assert len(batch.entries) == 400 and len(calls) == 1


def test_at_a_steady_trickle_with_the_linger_each_batch_is_one_read(redis_client, redis_url, monkeypatch):
    """Right after a batch that was not full the linger comes first, then one read: a read
    at once would find only what arrived during the write, and the read after the linger
    the rest (two reads over every stream per batch, twice the worker's read cost)."""
    import threading
    import time

    import redis

    fill(redis_client, streams=200, per_stream=1)
    settings = config.load_settings(
        redis_url=redis_url, database_url="postgresql://x@localhost/x", batch_size=1000, batch_linger_ms=100
    )
    reader = redis_reader.StreamReader(redis_client, settings)
    reader.refresh_streams()
    calls = counting_reads(monkeypatch)
    stop = threading.Event()

    def produce() -> None:  # 1,000 entries/s over the 200 streams
        client, sent, started = redis.Redis.from_url(redis_url), 0, time.monotonic()
        while not stop.wait(0.005):
            due = int((time.monotonic() - started) * 1000) - sent
            pipe = client.pipeline(transaction=False)
            for n in range(sent, sent + due):
                pipe.xadd(f"mqtt_stream:s{n % 200:04d}:t", {"value": "1", "timestamp": "1"})
            pipe.execute()
            sent += due

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        reader.read_new()
        calls.clear()
        sizes = []
        for _ in range(20):
            batch = reader.read_new()
            sizes.append(len(batch))
            reader.ack(batch.keys())
            time.sleep(0.01)  # the write
    finally:
        stop.set()
        producer.join()
    assert min(sizes) > 50, sizes  # about 100 entries each: the linger still gathers them
    assert len(calls) <= 22, (len(calls), sizes)  # one read a batch (two before: 40)


def test_an_ack_sent_without_waiting_is_confirmed_at_the_next_and_sent_again_if_lost(redis_url):
    """ack(wait=False) only sends: the keys come back from the call that read its reply (the
    next ack, or confirm_acks). An ack whose connection was lost before Redis carried it out,
    or whose script was flushed meanwhile (a restarted Redis), is sent again, waited for:
    nothing stays pending."""
    import redis

    client = redis.Redis.from_url(redis_url, client_name="acker-under-test")
    admin = redis.Redis.from_url(redis_url)
    fill(admin, streams=3, per_stream=4)
    reader = make_reader(client, redis_url, batch_size=3)
    batches = [reader.read_new() for _ in range(4)]
    assert [len(b.entries) for b in batches] == [3, 3, 3, 3]

    def pending() -> int:
        return sum(admin.xpending(f"mqtt_stream:s{s:04d}:t", "db_writer")["pending"] for s in range(3))

    assert reader.ack(batches[0].keys(), wait=False) == []  # sent, not confirmed
    assert reader.ack(batches[1].keys(), wait=False) == batches[0].keys()
    assert reader.confirm_acks() == batches[1].keys()
    assert reader.confirm_acks() == []
    assert pending() == 6

    admin.client_pause(5000, all=False)  # writes wait: the XACK is sent, not carried out
    try:
        assert reader.ack(batches[2].keys(), wait=False) == []
        for info in admin.client_list():  # ... and its connection is lost before the reply
            if info["name"] == "acker-under-test" and info["cmd"] == "evalsha":
                admin.client_kill_filter(_id=info["id"])
                break
        else:
            raise AssertionError("the ack is not waiting in Redis")
    finally:
        admin.client_unpause()
    assert pending() == 6
    assert reader.confirm_acks() == batches[2].keys()
    assert pending() == 3

    admin.script_flush()
    assert reader.ack(batches[3].keys(), wait=False) == []
    assert pending() == 3  # the reply (NOSCRIPT) is not read yet
    assert reader.confirm_acks() == batches[3].keys()
    assert pending() == 0


def test_reads_and_acks_survive_a_killed_connection_and_flushed_scripts(redis_url):
    """Reads and acks go out packed on a connection of the pool (redis_client.call_packed):
    a connection the server closed is replaced, and an ack after SCRIPT FLUSH (a restarted
    Redis) loads its script again."""
    import redis

    client = redis.Redis.from_url(redis_url, client_name="reader-under-test")
    admin = redis.Redis.from_url(redis_url)
    fill(admin, streams=3, per_stream=2)
    reader = make_reader(client, redis_url, batch_size=2)
    first = reader.read_new()
    assert len(first.entries) == 2
    for info in admin.client_list():
        if info["name"] == "reader-under-test":
            admin.client_kill_filter(_id=info["id"])
    rest = reader.read_new()
    assert len(rest.entries) == 2 and not set(rest.keys()) & set(first.keys())
    admin.script_flush()
    reader.ack(first.keys() + rest.keys())
    pending = sum(admin.xpending(f"mqtt_stream:s{s:04d}:t", "db_writer")["pending"] for s in range(3))
    assert pending == 0
    assert len(drain(reader)) == 1  # the two entries not read yet, one batch; nothing else came back
