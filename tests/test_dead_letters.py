"""Dead-letter records: seed fields, verbatim originals, bounded size (pure; no servers)."""

from __future__ import annotations

import json

import dead_letters
from schema import Layout

LAYOUT = Layout(prefix="mqtt_stream:")


def test_record_has_the_original_readme_fields_and_a_trace():
    letter = dead_letters.make(
        LAYOUT,
        b"mqtt_stream:esp32:temperature",
        b"1634567890123-0",
        {b"value": b"abc", b"timestamp": b"2023-10-18T14:30:00Z"},
        "parse",
        "not a number",
        2,
    )
    fields = dead_letters.stream_fields(letter, "db_writer", "worker-01")
    assert fields["original_stream"] == "mqtt_stream:esp32:temperature"
    assert (fields["original_id"], fields["device_id"], fields["sensor_type"]) == (
        "1634567890123-0",
        "esp32",
        "temperature",
    )
    assert (fields["value"], fields["error"], fields["step"], fields["delivery_count"]) == (
        "abc",
        "not a number",
        "parse",
        "2",
    )
    assert float(fields["failed_at"]) > 1.6e9 and fields["consumer"] == "worker-01"
    assert json.loads(fields["fields"]) == {"value": "abc", "timestamp": "2023-10-18T14:30:00Z"}


def test_any_bytes_round_trip_for_replay():
    original = {
        b"value": b"\xff\xfe",
        b"nul": b"a\x00b",
        b"\xc3(": b"x",
        b"base64:tricky": b"1",
        "ü".encode(): "ß".encode(),
    }
    encoded = dead_letters.encode_fields(original)
    json.dumps(encoded)  # JSON-safe, so it fits jsonb and the stream
    assert "\\u0000" not in json.dumps(encoded)
    assert dead_letters.is_complete(encoded)
    assert dead_letters.decode_fields(encoded) == original


def test_huge_entries_are_cut_and_marked():
    encoded = dead_letters.encode_fields(
        {b"metadata": b"x" * 10_000_000, **{f"f{i}".encode(): b"1" for i in range(10_000)}}
    )
    assert len(json.dumps(encoded)) < 200_000
    assert encoded["metadata"]["truncated_from"] == 10_000_000
    assert encoded[dead_letters.OMITTED] == {"omitted_fields": 10_001 - dead_letters.KEPT_FIELDS}
    assert not dead_letters.is_complete(encoded)


def test_unparseable_stream_names_still_make_a_record():
    letter = dead_letters.make(LAYOUT, b"\xff\xfe", b"1-0", {b"value": b"1"}, "parse", "bad stream", 1)
    assert letter.device_id == "" and letter.original_stream == "\\xff\\xfe"


def test_long_names_are_capped_by_bytes_for_the_indexed_columns():
    letter = dead_letters.make(
        LAYOUT, b"mqtt_stream:" + b"\xff" * 5000, b"1-0", {b"value": "é".encode() * 5000}, "parse", "x" * 10_000, 1
    )
    assert len(letter.original_stream.encode()) <= 1000 and letter.original_stream.endswith("bytes]")
    assert len(letter.value.encode()) <= 1000 and len(letter.error.encode()) <= 2000


def test_errors_are_classified_by_sqlstate():
    import psycopg
    from psycopg_pool import PoolTimeout

    from db_writer import classify

    errors = psycopg.errors
    transient = [
        psycopg.OperationalError("connection lost"),
        PoolTimeout("no connection"),
        errors.AdminShutdown(),
        errors.SerializationFailure(),
        errors.DeadlockDetected(),
        errors.TooManyConnections(),
        errors.ReadOnlySqlTransaction(),
        errors.LockNotAvailable(),
        errors.IdleInTransactionSessionTimeout(),
        errors.QueryCanceled(),
    ]
    rows = [
        errors.ProgramLimitExceeded(),
        errors.UniqueViolation(),
        errors.CheckViolation(),
        errors.RaiseException(),
        errors.NumericValueOutOfRange(),
        errors.TriggeredActionException(),
    ]
    refused = [
        errors.UndefinedTable(),
        errors.InsufficientPrivilege(),
        errors.UndefinedColumn(),
        errors.FeatureNotSupported(),
    ]
    assert [classify(e) for e in transient] == ["transient"] * len(transient)
    assert [classify(e) for e in rows] == ["rows"] * len(rows)  # ProgramLimitExceeded: about the row
    assert [classify(e) for e in refused] == ["refused"] * len(refused)  # says nothing about the rows
