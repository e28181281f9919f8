"""schema.py: each rule with exact outputs, then the contract as hypothesis properties."""

import json
import math
import pickle
import re
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schema import COLUMN_TYPES, KEY_COLUMNS, MAX_NAME_LENGTH, InvalidEntry, Layout, Reading, stream_prefix

LAYOUT = Layout(prefix="mqtt_stream:")  # the default: identity in the stream name
to_row = LAYOUT.to_row
parse_stream_name = LAYOUT.stream_identity
STREAM = b"mqtt_stream:esp32:temp"
ENTRY_ID = b"1700000000123-0"
ENTRY_TIME = datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
NOON = datetime(2024, 1, 1, 12, tzinfo=UTC)


def dead_letter(fields, stream=STREAM, entry_id=ENTRY_ID) -> tuple[str, str]:
    with pytest.raises(InvalidEntry) as caught:
        to_row(stream, entry_id, fields)
    return caught.value.step, caught.value.reason


def with_value(value):
    return {b"value": value, b"timestamp": b"2024-01-01T12:00:00Z"}


def with_timestamp(timestamp):
    return {b"value": b"1.5", b"timestamp": timestamp}


def with_metadata(metadata, **extra):
    fields = {b"value": b"1.5", b"timestamp": b"2024-01-01T12:00:00Z", b"metadata": metadata}
    fields.update({k.encode(): v for k, v in extra.items()})
    return fields


# --- InvalidEntry ---------------------------------------------------------------------------


def test_invalid_entry_carries_step_and_reason():
    exc = InvalidEntry("parse", "value is empty")
    assert isinstance(exc, ValueError)
    assert (exc.step, exc.reason, str(exc)) == ("parse", "value is empty", "value is empty")
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.step, copy.reason, str(copy)) == ("parse", "value is empty", "value is empty")


# --- stream name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"mqtt_stream:esp32:temp", ("esp32", "temp")),
        ("mqtt_stream:esp32:temp", ("esp32", "temp")),
        (bytearray(b"mqtt_stream:esp32:temp"), ("esp32", "temp")),
        (b"mqtt_stream:esp32:temp:inner", ("esp32", "temp:inner")),
        ("mqtt_stream:Küche:température", ("Küche", "température")),
        ("mqtt_stream:" + "d" * MAX_NAME_LENGTH + ":" + "s" * MAX_NAME_LENGTH, ("d" * 100, "s" * 100)),
        ("mqtt_stream:" + "ü" * MAX_NAME_LENGTH + ":t", ("ü" * 100, "t")),
    ],
)
def test_parse_stream_name(stream, expected):
    assert parse_stream_name(stream) == expected


def test_parse_stream_name_with_another_prefix():
    assert Layout(prefix="sensors/").stream_identity(b"sensors/esp32:temp") == ("esp32", "temp")


@pytest.mark.parametrize(
    ("stream", "step", "reason"),
    [
        (b"esp32:temp", "parse", "stream name does not start with 'mqtt_stream:'"),
        (b"MQTT_STREAM:esp32:temp", "parse", "stream name does not start with 'mqtt_stream:'"),
        (b"mqtt_stream::temp", "parse", "stream name has an empty device_id"),
        (b"mqtt_stream:", "parse", "stream name has an empty device_id"),
        (b"mqtt_stream:esp32", "parse", "stream name has an empty sensor_type"),
        (b"mqtt_stream:esp32:", "parse", "stream name has an empty sensor_type"),
        ("mqtt_stream:" + "d" * 101 + ":temp", "validate", "device_id longer than 100 characters"),
        ("mqtt_stream:esp32:" + "s" * 101, "validate", "sensor_type longer than 100 characters"),
        ("mqtt_stream:esp32:" + "s" * 2000, "validate", "stream name longer than 1024 bytes"),
        (b"mqtt_stream:esp\xff:temp", "parse", "stream name is not valid UTF-8"),
        ("mqtt_stream:esp\ud800:temp", "parse", "stream name is not valid UTF-8"),
        ("mqtt_stream:esp\x0032:temp", "validate", "stream name contains a NUL character"),
        (None, "parse", "stream name must be bytes or str, not NoneType"),
        (42, "parse", "stream name must be bytes or str, not int"),
    ],
)
def test_bad_stream_names(stream, step, reason):
    with pytest.raises(InvalidEntry) as caught:
        parse_stream_name(stream)
    assert (caught.value.step, caught.value.reason) == (step, reason)
    assert dead_letter(with_value(b"1"), stream=stream) == (step, reason)


# --- layouts: where the identity comes from --------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("mqtt_stream:*", "mqtt_stream:"),
        ("telemetry:*", "telemetry:"),
        ("sensors/*", "sensors/"),
        ("ingest:{*", "ingest:"),
        ("a:b:*", "a:b:"),
        ("site-7:*:raw", "site-7:"),
    ],
)
def test_stream_prefix_is_the_pattern_up_to_its_first_wildcard(pattern, prefix):
    assert stream_prefix(pattern) == prefix


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("*:raw", "starts with a wildcard"),
        ("*", "starts with a wildcard"),
        ("mqtt:ingestion", "names one stream"),
        ("mqtt_stream:esp*", "inside a name segment"),
    ],
)
def test_patterns_that_cannot_be_split_are_refused_with_the_reason(pattern, why):
    with pytest.raises(ValueError, match=why):
        stream_prefix(pattern)


def test_another_prefix_is_the_default_layout_with_that_prefix():
    layout = Layout(prefix=stream_prefix("telemetry:*"))
    row = layout.to_row(b"telemetry:wtg01:wind_speed", b"1-0", with_value(b"12.5"))
    assert (row.device_id, row.sensor_type, row.value) == ("wtg01", "wind_speed", 12.5)
    assert dead_letter(with_value(b"1"), stream=b"telemetry:wtg01:wind_speed")[1].startswith("stream name does not")


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"mqtt_stream:{esp32}:temperature", ("esp32", "temperature")),
        (b"mqtt_stream:{a4:cf:12:00:00:01}:temperature", ("a4:cf:12:00:00:01", "temperature")),
        (b"mqtt_stream:esp32:{temperature}", ("esp32", "temperature")),
        (b"mqtt_stream:{esp32}:{t}", ("esp32", "t")),
        (b"mqtt_stream:{esp32:temperature", ("{esp32", "temperature")),  # no closing brace: no hash tag
        (b"mqtt_stream:esp{32}:t", ("esp{32}", "t")),  # braces inside a segment are part of it
    ],
)
def test_hash_tag_braces_around_a_segment_are_not_part_of_the_name(stream, expected):
    assert parse_stream_name(stream) == expected


def test_empty_hash_tag_is_an_empty_device_id():
    assert dead_letter(with_value(b"1"), stream=b"mqtt_stream:{}:t") == ("parse", "stream name has an empty device_id")


FIELDS = Layout(device_field="device_id", sensor_field="metric")  # the upstream's later producer


def upstream(device=b"a4:cf:12:00:00:01", metric=b"temperature", **extra) -> dict:
    """An entry as services/mqtt_ingestion/src/redis_writer.py writes it (naive utcnow().isoformat())."""
    fields = {b"device_id": device, b"metric": metric, b"value": b"21.5", b"timestamp": b"2024-05-01T12:34:56.789123"}
    fields.update({k.encode(): v for k, v in extra.items()})
    return {k: v for k, v in fields.items() if v is not None}


def test_identity_in_fields_takes_any_device_id_and_leaves_it_out_of_metadata():
    row = FIELDS.to_row(b"mqtt:ingestion", b"1-0", upstream(rssi=b"-61"))
    assert row == Reading(
        datetime(2024, 5, 1, 12, 34, 56, 789123, tzinfo=UTC), "a4:cf:12:00:00:01", "temperature", 21.5, '{"rssi":"-61"}'
    )
    assert FIELDS.to_row(b"ingest:{3}", b"1-0", upstream()).metadata is None  # shard streams: any name
    assert FIELDS.identity(b"anything", upstream(value=b"not a number")) == ("a4:cf:12:00:00:01", "temperature")


@pytest.mark.parametrize(
    ("fields", "step", "reason"),
    [
        (upstream(device=None), "parse", "device_id field 'device_id' is missing"),
        (upstream(metric=None), "parse", "sensor_type field 'metric' is missing"),
        (upstream(device=b""), "parse", "device_id field 'device_id' is empty"),
        (upstream(device=b"d" * 101), "validate", "device_id longer than 100 characters"),
        (upstream(metric=b"t\x00"), "validate", "sensor_type field 'metric' contains a NUL character"),
        (upstream(device=b"\xff"), "parse", "device_id field 'device_id' is not valid UTF-8"),
    ],
)
def test_identity_fields_that_are_missing_or_bad_name_the_field(fields, step, reason):
    with pytest.raises(InvalidEntry) as caught:
        FIELDS.to_row(b"mqtt:ingestion", b"1-0", fields)
    assert (caught.value.step, caught.value.reason) == (step, reason)


def test_a_layout_takes_a_prefix_or_both_fields():
    for kwargs in ({}, {"device_field": "d"}, {"prefix": "p:", "device_field": "d", "sensor_field": "s"}):
        with pytest.raises(ValueError):
            Layout(**kwargs)


def test_row_columns_are_one_fact():
    assert tuple(COLUMN_TYPES) == Reading._fields and set(KEY_COLUMNS) < set(COLUMN_TYPES)


# --- value ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"23.5", 23.5),
        ("23.5", 23.5),
        (b" 12.5 ", 12.5),
        (b"\t12.5\r\n", 12.5),
        (b"42", 42.0),
        (b"-7", -7.0),
        (b"+.5", 0.5),
        (b"5.", 5.0),
        (b"1.5E3", 1500.0),
        (b"1e-400", 0.0),
        (b"1.7976931348623157e308", 1.7976931348623157e308),
        (23.5, 23.5),
        (42, 42.0),
    ],
)
def test_value(value, expected):
    assert to_row(STREAM, ENTRY_ID, with_value(value)).value == expected


@pytest.mark.parametrize("value", [b"-0", b"-0.0", -0.0])
def test_negative_zero_keeps_its_sign(value):
    result = to_row(STREAM, ENTRY_ID, with_value(value)).value
    assert result == 0.0 and math.copysign(1, result) == -1


@pytest.mark.parametrize(
    ("value", "step", "reason"),
    [
        (b"", "parse", "value is empty"),
        (b" \t ", "parse", "value is empty"),
        (b"12,5", "parse", "value is not a decimal number: '12,5'"),
        (b"0x1A", "parse", "value is not a decimal number: '0x1A'"),
        (b"1_000", "parse", "value is not a decimal number: '1_000'"),
        ("١٢", "parse", "value is not a decimal number: '١٢'"),
        ("\u00a012.5", "parse", "value is not a decimal number: '\\xa012.5'"),
        (b"23.5C", "parse", "value is not a decimal number: '23.5C'"),
        (b"NaN", "validate", "value is not finite (NaN, Infinity or beyond a double): 'NaN'"),
        (b"-inf", "validate", "value is not finite (NaN, Infinity or beyond a double): '-inf'"),
        (b"Infinity", "validate", "value is not finite (NaN, Infinity or beyond a double): 'Infinity'"),
        (b"1e309", "validate", "value is not finite (NaN, Infinity or beyond a double): '1e309'"),
        (b"-1e309", "validate", "value is not finite (NaN, Infinity or beyond a double): '-1e309'"),
        (float("nan"), "validate", "value is not finite (NaN, Infinity or beyond a double): 'nan'"),
        (10**400, "validate", "value out of range"),
        (True, "parse", "value must be bytes or str, not bool"),
        (b"1" * 65, "validate", "value longer than 64 bytes"),
        (b"1" * 1_000_000, "validate", "value longer than 64 bytes"),
        (b"\xff23", "parse", "value is not valid UTF-8"),
        ("2\ud8003", "parse", "value is not valid UTF-8"),
    ],
)
def test_bad_values(value, step, reason):
    assert dead_letter(with_value(value)) == (step, reason)


@given(st.text(st.sampled_from("0123456789+-.eE_ \t\x1f\xa0naifINF١"), max_size=10))
def test_values_accepted_are_exactly_plain_decimals(text):
    stripped = text.strip(" \t\x1f")
    plain = re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", stripped)
    try:
        value = to_row(STREAM, ENTRY_ID, with_value(text)).value
    except InvalidEntry:
        assert not plain or not math.isfinite(float(stripped))
    else:
        assert plain and value == float(stripped)


def _outcome(fields):
    try:
        return to_row(STREAM, ENTRY_ID, fields)
    except InvalidEntry as exc:
        return exc.step, exc.reason


@given(st.text(st.sampled_from("0123456789+-.eE_ \t\x1f\xa0naifINF١"), max_size=70))
def test_values_as_bytes_and_as_text_are_judged_alike(text):
    """Bytes (what Redis delivers) take a fast path; text takes the careful one."""
    assert _outcome(with_value(text.encode())) == _outcome(with_value(text))


@given(
    st.one_of(
        st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat()),
        st.datetimes().map(lambda t: t.isoformat(sep=" ")),
        st.text(st.sampled_from("0123456789-:T.Z+ \t\xa0"), max_size=70),
    )
)
def test_timestamps_as_bytes_and_as_text_are_judged_alike(text):
    assert _outcome(with_timestamp(text.encode())) == _outcome(with_timestamp(text))


def test_missing_value():
    assert dead_letter({b"timestamp": b"2024-01-01T12:00:00Z"}) == ("parse", "value is missing")


# --- timestamp ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (b"2024-01-01T12:00:00Z", NOON),
        (b"2024-01-01T12:00:00", NOON),
        (b"2024-01-01T12:00:00-00:00", NOON),
        (b"2024-01-01T17:30:00+05:30", NOON),
        (b"2024-01-01T04:00:00-08:00", NOON),
        (b"2024-01-01 12:00:00+00:00", NOON),
        (b" 2024-01-01T12:00:00Z\n", NOON),
        (b"2024-01-01", datetime(2024, 1, 1, tzinfo=UTC)),
        (b"2024-01-01T12:00:00.123456789Z", NOON.replace(microsecond=123456)),
        (b"0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        (b"9999-12-31T23:59:59.999999Z", datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        (b"1704110400", NOON),
        (b"1704110400.25", NOON.replace(microsecond=250000)),
        (b"1704110400250", NOON.replace(microsecond=250000)),
        (b"-86400", datetime(1969, 12, 31, tzinfo=UTC)),
        (b"-1.5", datetime(1969, 12, 31, 23, 59, 58, 500000, tzinfo=UTC)),
        (b"99999999999", datetime(5138, 11, 16, 9, 46, 39, tzinfo=UTC)),  # just below 1e11: seconds
        (b"100000000000", datetime(1973, 3, 3, 9, 46, 40, tzinfo=UTC)),  # 1e11 and up: milliseconds
        (b"-100000000000", datetime(1966, 10, 31, 14, 13, 20, tzinfo=UTC)),
        (1704110400, NOON),
        (1704110400.25, NOON.replace(microsecond=250000)),
        (1704110400250, NOON.replace(microsecond=250000)),
        (b"", ENTRY_TIME),
        (b"  ", ENTRY_TIME),
        ("", ENTRY_TIME),
    ],
)
def test_timestamp(timestamp, expected):
    result = to_row(STREAM, ENTRY_ID, with_timestamp(timestamp)).timestamp
    assert result == expected and result.tzinfo is UTC


def test_missing_timestamp_is_the_entry_id_time():
    assert to_row(STREAM, "1700000000123-7", {b"value": b"1"}).timestamp == ENTRY_TIME
    assert to_row(STREAM, b"0-1", {"value": "1"}).timestamp == datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("timestamp", "step", "reason"),
    [
        (b"10000-01-01T00:00:00Z", "parse", "timestamp is neither ISO 8601 nor a Unix epoch: '10000-01-01T00:00:00Z'"),
        (
            b"2024-01-01T00:00:00 Europe/Paris",
            "parse",
            "timestamp is neither ISO 8601 nor a Unix epoch: '2024-01-01T00:00:00 Europe/Paris'",
        ),
        (b"2024-13-01", "parse", "timestamp is neither ISO 8601 nor a Unix epoch: '2024-13-01'"),
        (b"NaN", "parse", "timestamp is neither ISO 8601 nor a Unix epoch: 'NaN'"),
        (
            b"2016-12-31T23:59:60Z",
            "validate",
            "timestamp is a leap second, which cannot be stored exactly: '2016-12-31T23:59:60Z'",
        ),
        (b"0001-01-01T00:00:00+05:30", "validate", "timestamp out of range: '0001-01-01T00:00:00+05:30'"),
        (b"-62135596801", "validate", "timestamp out of range: '-62135596801'"),
        (b"1e20", "validate", "timestamp out of range: '1e20'"),
        (b"1e400", "validate", "timestamp out of range: '1e400'"),
        (10**400, "validate", "timestamp out of range: int"),
        (float("inf"), "validate", "timestamp out of range: float"),
        (b"9" * 65, "validate", "timestamp longer than 64 bytes"),
        (b"2024-01-01\xff", "parse", "timestamp is not valid UTF-8"),
        (False, "parse", "timestamp must be bytes or str, not bool"),
    ],
)
def test_bad_timestamps(timestamp, step, reason):
    assert dead_letter(with_timestamp(timestamp)) == (step, reason)


@pytest.mark.parametrize(
    ("entry_id", "step", "reason"),
    [
        (b"not-an-id", "parse", "no timestamp, and entry id is not a Redis id: 'not-an-id'"),
        (b"17-", "parse", "no timestamp, and entry id is not a Redis id: '17-'"),
        ("²-0", "parse", "no timestamp, and entry id is not a Redis id: '²-0'"),
        (
            b"18446744073709551615-0",
            "validate",
            "no timestamp, and entry id time out of range: '18446744073709551615-0'",
        ),
        (None, "parse", "entry id must be bytes or str, not NoneType"),
    ],
)
def test_bad_entry_id_matters_only_without_timestamp(entry_id, step, reason):
    assert dead_letter({b"value": b"1"}, entry_id=entry_id) == (step, reason)
    assert to_row(STREAM, entry_id, with_timestamp(b"2024-01-01T12:00:00Z")).timestamp == NOON


# --- metadata and extra fields --------------------------------------------------------------


def test_metadata_text_passes_through_untouched():
    text = ' {"unit": "C", "battery": 87, "ort": "Küche"} '
    assert to_row(STREAM, ENTRY_ID, with_metadata(text.encode())).metadata == text
    assert to_row(STREAM, ENTRY_ID, with_metadata(text)).metadata == text


@pytest.mark.parametrize("metadata", [b"", "", b" \r\n\t"])
def test_empty_or_blank_metadata_is_none(metadata):
    assert to_row(STREAM, ENTRY_ID, with_metadata(metadata)).metadata is None


def test_extra_fields_become_metadata_strings():
    fields = {b"value": b"1", b"unit": b"C", "battery": "87"}
    assert to_row(STREAM, ENTRY_ID, fields).metadata == '{"unit":"C","battery":"87"}'


def test_extra_fields_merge_and_explicit_metadata_wins():
    fields = with_metadata(b'{"unit": "F", "nested": {"a": [1, 2.5]}}', unit=b"C", room=b"K\xc3\xbcche")
    assert to_row(STREAM, ENTRY_ID, fields).metadata == '{"unit":"F","room":"K\\u00fcche","nested":{"a":[1,2.5]}}'


@pytest.mark.parametrize(
    ("metadata", "step", "reason"),
    [
        (b"[1, 2]", "validate", "metadata must be a JSON object"),
        (b"42", "validate", "metadata must be a JSON object"),
        (b'"text"', "validate", "metadata must be a JSON object"),
        (b"null", "validate", "metadata must be a JSON object"),
        (
            b"{unit: C}",
            "parse",
            "metadata is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (b'{"a": 1} x', "parse", "metadata is not valid JSON: extra data at character 8"),
        (b'{"a": NaN}', "parse", "metadata is not valid JSON: NaN is not valid JSON"),
        (b'{"a": -Infinity}', "parse", "metadata is not valid JSON: -Infinity is not valid JSON"),
        (b'{"a": 1e999}', "validate", "metadata number beyond a double: 1e999"),
        (b'{"a": -1.5e-999}', "validate", "metadata number beyond a double: -1.5e-999"),
        (b'{"a": "x\\u0000"}', "validate", "metadata contains \\u0000, which jsonb cannot store"),
        (b'{"\\u0000": 1}', "validate", "metadata contains \\u0000, which jsonb cannot store"),
        (b'{"a": "\\udc00"}', "validate", "metadata contains an unpaired surrogate escape"),
        (b'{"a": "\xff"}', "parse", "metadata is not valid UTF-8"),
        ('{"a": "\ud800"}', "parse", "metadata is not valid UTF-8"),
        (b'{"a":' * 65 + b"1" + b"}" * 65, "validate", "metadata nested deeper than 64 levels"),
        (b'{"a":' + b"[" * 64 + b"]" * 64 + b"}", "validate", "metadata nested deeper than 64 levels"),
        (b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}", "validate", "metadata nested deeper than 64 levels"),
        (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "validate", "metadata longer than 65536 bytes"),
        (b'{"a":"' + b"x" * 10_000_000 + b'"}', "validate", "metadata longer than 65536 bytes"),
    ],
)
def test_bad_metadata(metadata, step, reason):
    assert dead_letter(with_metadata(metadata)) == (step, reason)


def test_metadata_limits_are_inclusive():
    deep = '{"a":' + "[" * 63 + "]" * 63 + "}"  # 64 levels with the object itself
    assert to_row(STREAM, ENTRY_ID, with_metadata(deep)).metadata == deep
    brackets = '{"a":"' + "[" * 1000 + '"}'  # brackets in strings are not nesting
    assert to_row(STREAM, ENTRY_ID, with_metadata(brackets)).metadata == brackets
    pair = '{"a":"\\ud83d\\ude00 \\u00fc"}'
    assert json.loads(to_row(STREAM, ENTRY_ID, with_metadata(pair)).metadata) == {"a": "\U0001f600 ü"}
    big = '{"a":"' + "x" * (65536 - 8) + '"}'
    assert len(big) == 65536 and to_row(STREAM, ENTRY_ID, with_metadata(big)).metadata == big


def test_extra_fields_share_the_metadata_budget():
    half = b"x" * 40_000
    assert dead_letter({b"value": b"1", b"a": half, b"b": half}) == (
        "validate",
        "metadata and extra fields larger than 65536 bytes",
    )
    assert dead_letter(with_metadata(b'{"a":"' + half + b'"}', b=half)) == (
        "validate",
        "metadata and extra fields larger than 65536 bytes",
    )


@pytest.mark.parametrize(
    ("fields", "step", "reason"),
    [
        ({b"value": b"1", b"unit": b"C\x00"}, "validate", "field 'unit' contains a NUL character"),
        ({b"value": b"1", b"u\x00": b"C"}, "validate", "field 'u\\x00' contains a NUL character"),
        ({b"value": b"1", b"un\xffit": b"C"}, "parse", "field name is not valid UTF-8"),
        ({b"value": b"1", b"unit": b"\xc3\x28"}, "parse", "extra field is not valid UTF-8"),
        ({b"value": b"1", b"unit": 5}, "parse", "extra field must be bytes or str, not int"),
        ({b"value": b"1", 7: b"x"}, "parse", "field name must be bytes or str, not int"),
        ({b"value": b"1", "value": "2"}, "parse", "a field name occurs twice (as bytes and as str)"),
        ({b"value": b"1", b"unit": b"C", "unit": "F"}, "parse", "a field name occurs twice (as bytes and as str)"),
        ({}, "parse", "value is missing"),
        ({b"value": b"1", **{f"f{i}".encode(): b"x" for i in range(100)}}, "validate", "more than 100 fields"),
        ([(b"value", b"1")], "parse", "fields must be a mapping, not list"),
        (None, "parse", "fields must be a mapping, not NoneType"),
    ],
)
def test_bad_fields(fields, step, reason):
    assert dead_letter(fields) == (step, reason)


def test_ten_thousand_fields_are_refused_without_reading_them():
    fields = {b"value": b"1", **{f"f{i}".encode(): b"x" * 100 for i in range(10_000)}}
    started = time.perf_counter()
    assert dead_letter(fields) == ("validate", "more than 100 fields")
    assert time.perf_counter() - started < 0.01


def test_bytes_str_and_mixed_inputs_give_the_same_row():
    as_bytes = to_row(
        "mqtt_stream:Küche:t".encode(),
        b"1-0",
        {b"value": b"1.5", b"timestamp": b"1700000000", b"metadata": b'{"a":1}', b"u": b"C"},
    )
    as_str = to_row(
        "mqtt_stream:Küche:t", "1-0", {"value": "1.5", "timestamp": "1700000000", "metadata": '{"a":1}', "u": "C"}
    )
    mixed = to_row(
        "mqtt_stream:Küche:t", b"1-0", {b"value": "1.5", "timestamp": b"1700000000", b"metadata": '{"a":1}', "u": b"C"}
    )
    assert as_bytes == as_str == mixed
    assert all(type(part) is str for part in as_bytes[1:3])


def test_duplicate_timestamps_are_both_rows():
    first = to_row(STREAM, b"1-0", with_value(b"20.0"))
    second = to_row(STREAM, b"1-1", with_value(b"21.0"))
    assert first.timestamp == second.timestamp and (first.value, second.value) == (20.0, 21.0)


# --- properties -----------------------------------------------------------------------------
# Each part of an entry is mostly plausible and sometimes hostile, so that both outcomes are
# common; a plain "arbitrary dict" strategy would almost never produce a row.

any_text = st.text(st.characters(), max_size=40)  # lone surrogates and NUL included
storable_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
any_blob = st.binary(max_size=40) | any_text


def str_or_bytes(texts):
    """The same texts as str or as UTF-8 bytes (where a lone surrogate becomes invalid UTF-8)."""
    return texts | texts.map(lambda text: text.encode("utf-8", "surrogatepass"))


def mostly(plausible, hostile):
    """plausible four times in five (st.one_of would weigh each of its branches alike)."""
    return st.integers(0, 4).flatmap(lambda n: hostile if n == 4 else plausible)


names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=101)  # may hold ':', NUL, be too long
streams = mostly(str_or_bytes(st.builds("mqtt_stream:{}:{}".format, names, names)), any_blob | st.none())
entry_ids = mostly(
    str_or_bytes(st.builds("{}-{}".format, st.integers(min_value=0), st.integers(min_value=0))), any_blob
)
numbers = (
    st.floats().map(repr)
    | st.integers().map(str)
    | st.sampled_from(["nan", "-Infinity", "1_0", "0x1A", " 1 ", "1e309", "١", "-0", ".", "e5", "+", ""])
)
timestamps = (
    st.datetimes(
        timezones=st.none()
        | st.just(UTC)
        | st.builds(
            timezone,
            st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)),
        )
    ).map(datetime.isoformat)
) | numbers
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
json_texts = (st.dictionaries(any_text, json_values, max_size=4) | json_values).flatmap(
    lambda value: st.sampled_from([json.dumps(value), json.dumps(value, ensure_ascii=False)])
)
hostile_values = any_blob | st.integers() | st.floats() | st.none() | st.booleans()


@st.composite
def entry_fields(draw):
    fields = draw(
        st.dictionaries(
            mostly(str_or_bytes(storable_text), any_blob),
            mostly(str_or_bytes(storable_text), hostile_values),
            max_size=3,
        )
    )
    for name, plausible in (("value", numbers), ("timestamp", timestamps), ("metadata", json_texts)):
        if draw(mostly(st.just(True), st.just(False))):
            key = draw(st.sampled_from([name, name.encode()]))
            fields[key] = draw(mostly(str_or_bytes(plausible), hostile_values))
    return fields


def _storable(text: str) -> bool:
    """What PostgreSQL text and jsonb accept: UTF-8 encodable, no NUL."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _check_json_storable(node, depth=0) -> None:
    if isinstance(node, str):
        assert _storable(node)
    elif isinstance(node, float):
        assert math.isfinite(node)
    elif isinstance(node, dict):
        assert depth < 64 and all(_storable(key) for key in node)
        for child in node.values():
            _check_json_storable(child, depth + 1)
    elif isinstance(node, list):
        assert depth < 64
        for child in node:
            _check_json_storable(child, depth + 1)


@settings(max_examples=300, deadline=None)
@given(stream=streams, entry_id=entry_ids, fields=entry_fields())
def test_any_input_gives_a_storable_row_or_invalid_entry(stream, entry_id, fields):
    try:
        row = to_row(stream, entry_id, fields)
    except InvalidEntry as exc:
        assert exc.step in ("parse", "validate") and str(exc) == exc.reason and exc.reason
        return
    assert type(row) is Reading and len(row) == len(COLUMN_TYPES)
    timestamp, device_id, sensor_type, value, metadata = row
    assert type(timestamp) is datetime and timestamp.tzinfo is UTC
    for name in (device_id, sensor_type):
        assert type(name) is str and 0 < len(name) <= MAX_NAME_LENGTH and _storable(name)
    assert type(value) is float and math.isfinite(value)
    if metadata is not None:
        assert type(metadata) is str and _storable(metadata)
        decoded = json.loads(metadata, parse_constant=lambda name: pytest.fail(f"{name} in metadata"))
        assert type(decoded) is dict
        _check_json_storable(decoded)


@given(
    value=st.floats(allow_nan=False, allow_infinity=False),
    timestamp=st.datetimes(
        min_value=datetime(2, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.none()
        | st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
    ),
    as_bytes=st.booleans(),
)
def test_valid_readings_round_trip(value, timestamp, as_bytes):
    fields = {"value": repr(value), "timestamp": timestamp.isoformat()}
    if as_bytes:
        fields = {k.encode(): v.encode() for k, v in fields.items()}
    row = to_row("mqtt_stream:dev:temp", "1-0", fields)
    assert row.value == value and math.copysign(1, row.value) == math.copysign(1, value)
    assert row.timestamp == (timestamp.replace(tzinfo=UTC) if timestamp.tzinfo is None else timestamp)


@given(millis=st.integers(min_value=-62135596800000, max_value=253402300799999).filter(lambda ms: abs(ms) >= 1e11))
def test_epoch_milliseconds_round_trip(millis):
    row = to_row(STREAM, ENTRY_ID, with_timestamp(str(millis).encode()))
    assert row.timestamp == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)


@given(millis=st.integers(min_value=-(2**32) * 1000, max_value=2**32 * 1000))  # 1833..2106: exact in a double
def test_epoch_seconds_with_milliseconds_round_trip(millis):
    text = f"{'-' if millis < 0 else ''}{abs(millis) // 1000}.{abs(millis) % 1000:03}"
    row = to_row(STREAM, ENTRY_ID, with_timestamp(text.encode()))
    assert row.timestamp == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)


storable_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.integers() | storable_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(storable_text, children, max_size=4),
    max_leaves=12,
)


@given(
    metadata=st.dictionaries(storable_text, storable_json, max_size=5),
    indent=st.none() | st.integers(0, 2),
    ensure_ascii=st.booleans(),
)
def test_valid_metadata_passes_through(metadata, indent, ensure_ascii):
    text = json.dumps(metadata, indent=indent, ensure_ascii=ensure_ascii)
    assert to_row(STREAM, ENTRY_ID, with_metadata(text.encode())).metadata == text
