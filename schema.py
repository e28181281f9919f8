"""Turn one Redis stream entry into one sensor_readings row, or say why it never can be.

This is the hot path (tens of thousands of entries a second), so it is plain
functions over str/bytes: no model objects, one pass over the fields.

The contract the writer relies on: `to_row` returns a row or raises
`InvalidEntry`, for any input whatsoever. A data error must become a dead
letter for that one entry; it must never reach PostgreSQL, where a single bad
row fails the whole COPY batch (the original project lost 50,000 readings to
one over-long device id). So everything PostgreSQL would refuse is refused
here first: over-long names, NUL characters, non-UTF-8 bytes, NaN/Infinity,
timestamps outside the datetime range, JSON that jsonb rejects.

Decisions (each is also tested in tests/test_schema.py and the hostile corpus):

* Stream name ``{prefix}{device_id}:{sensor_type}``: the device id ends at the
  first ':' and the sensor type is all the rest, so ``esp32:temp:inner`` gives
  ("esp32", "temp:inner"). A sensor type is a free-form name that may grow
  sub-parts; a device id is an identifier, and every reading of one device must
  land under one id whatever sensor it came from. No part of the name is lost.
  (Device ids that are MAC addresses written with ':' would need rpartition.)
* "parse" errors: the entry cannot be understood (not UTF-8, not a number, not
  JSON, not a stream we know). "validate" errors: it was understood but cannot
  be stored (too long, out of range, non-finite, NUL, wrong JSON type).
* value: a plain decimal number (``[+-]digits[.digits][e[+-]digits]``) after
  stripping ASCII whitespace, or an int/float. Python's float() also takes
  "1_000", non-ASCII digits and Unicode spaces; sensors send none of those, so
  they are a parse error. NaN, Infinity and overflow ("1e309") are a validate
  error: numbers, but not a measurement. "-0" stays -0.0: a reading is stored
  as sent and double precision keeps the sign.
* timestamp: a purely numeric string (or number) is a Unix epoch: seconds when
  |x| < 1e11, else milliseconds. 1e11 s is the year 5138 while 1e11 ms is
  1973-03-03, so every plausible reading is read right (only millisecond
  stamps before March 1973 would be taken for seconds). Anything else must be
  ISO 8601 (datetime.fromisoformat); without an offset it is UTC. Note that
  "20240101" is numeric and therefore an epoch. Epochs are read as doubles:
  whole seconds and milliseconds are exact, fractions to the microsecond up to
  about 2106. Missing or empty: the time of the Redis entry id, which Redis set
  when the reading arrived.
* A leap second (":60") is refused: datetime cannot hold it, and moving it to
  :59.999999 or to the next second could make it collide with a real reading
  on the (time, device_id, sensor_type) key, where the database would drop one
  of the two as a duplicate. A dead letter keeps it visible instead.
* metadata: optional; empty or blank means absent. It must be a JSON object of at most
  MAX_METADATA_BYTES (counted together with extra fields) nested at most
  MAX_METADATA_DEPTH deep. NaN/Infinity literals, numbers beyond a double,
  \\u0000 and unpaired surrogates are refused because jsonb refuses them.
* Extra fields (anything but value/timestamp/metadata) are merged into the
  metadata as strings, never guessed into numbers. On a key clash the explicit
  metadata object wins: it is what the publisher deliberately wrote, a stray
  field is more likely an accident. With no extra fields the metadata text is
  passed through untouched (jsonb normalises it anyway), otherwise the merged
  object is dumped compactly.
"""

import json
import math
import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache

MAX_NAME_LENGTH = 100  # device_id / sensor_type are VARCHAR(100)
MAX_STREAM_BYTES = 1024  # room for two 100-character names even in 4-byte UTF-8
MAX_NUMBER_LENGTH = 64  # value / timestamp text; rejects a 1 MB "number" unread
MAX_METADATA_BYTES = 65536  # metadata plus extra fields, as received
MAX_METADATA_DEPTH = 64  # far beyond real metadata, far below Python's and PostgreSQL's stack limits
MAX_FIELDS = 100  # checked before looking at any field, so 10,000 fields cost nothing

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_MS_FROM = 1e11
_ASCII_WS = " \t\n\r\f\v\x1c\x1d\x1e\x1f"  # every ASCII character str.isspace() and float() take
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_JSON_WS = " \t\n\r"
_LEAP_SECOND = re.compile(r"[0-9]{2}:[0-9]{2}:60")
_NONZERO_MANTISSA = re.compile(r"-?[0.]*[1-9]")
_KNOWN_FIELDS = {
    b"value": "value",
    "value": "value",
    b"timestamp": "timestamp",
    "timestamp": "timestamp",
    b"metadata": "metadata",
    "metadata": "metadata",
}


class InvalidEntry(ValueError):
    """A data error: the entry can never be written as it is. Dead-lettered, then acked."""

    def __init__(self, step: str, reason: str):
        super().__init__(reason)
        self.step = step
        self.reason = reason

    def __reduce__(self):  # the default would call InvalidEntry(reason) and fail to unpickle
        return InvalidEntry, (self.step, self.reason)


def _text(raw, what: str, limit: int) -> str:
    """UTF-8 text of at most `limit` bytes; the length is checked before anything is decoded."""
    if not isinstance(raw, (bytes, str)):
        if not isinstance(raw, (bytearray, memoryview)):
            raise InvalidEntry("parse", f"{what} must be bytes or str, not {type(raw).__name__}")
        raw = bytes(raw)
    if len(raw) > limit:  # for str, characters <= bytes: a cheap first cut
        raise InvalidEntry("validate", f"{what} longer than {limit} bytes")
    if isinstance(raw, bytes):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise InvalidEntry("parse", f"{what} is not valid UTF-8") from None
    if not raw.isascii():
        try:
            size = len(raw.encode())
        except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form: psycopg could not send it
            raise InvalidEntry("parse", f"{what} is not valid UTF-8") from None
        if size > limit:
            raise InvalidEntry("validate", f"{what} longer than {limit} bytes")
    return raw


def _parse_stream(stream, prefix: str) -> tuple[str, str]:
    name = _text(stream, "stream name", MAX_STREAM_BYTES)
    if not name.startswith(prefix):
        raise InvalidEntry("parse", f"stream name does not start with {prefix!r}")
    device_id, _, sensor_type = name[len(prefix) :].partition(":")
    if not device_id:
        raise InvalidEntry("parse", "stream name has an empty device_id")
    if not sensor_type:
        raise InvalidEntry("parse", "stream name has an empty sensor_type")
    if len(device_id) > MAX_NAME_LENGTH:
        raise InvalidEntry("validate", f"device_id longer than {MAX_NAME_LENGTH} characters")
    if len(sensor_type) > MAX_NAME_LENGTH:
        raise InvalidEntry("validate", f"sensor_type longer than {MAX_NAME_LENGTH} characters")
    if "\x00" in name:
        raise InvalidEntry("validate", "stream name contains a NUL character")
    return device_id, sensor_type


_parse_stream_cached = lru_cache(maxsize=4096)(_parse_stream)  # a few streams, many entries each


def parse_stream_name(stream: bytes | str, prefix: str = "mqtt_stream:") -> tuple[str, str]:
    """-> (device_id, sensor_type); raises InvalidEntry("parse" | "validate", ...)."""
    if type(stream) is bytes or type(stream) is str:
        return _parse_stream_cached(stream, prefix)
    return _parse_stream(stream, prefix)  # bytearray etc. are unhashable


def _is_number(raw) -> bool:
    return isinstance(raw, (int, float)) and not isinstance(raw, bool)


def _value(raw) -> float:
    if _is_number(raw):
        try:
            value = float(raw)
        except OverflowError:
            raise InvalidEntry("validate", "value out of range") from None
        shown = repr(value)
    else:
        shown = _text(raw, "value", MAX_NUMBER_LENGTH).strip(_ASCII_WS)
        if not shown:
            raise InvalidEntry("parse", "value is empty")
        try:
            value = float(shown)
        except ValueError:
            raise InvalidEntry("parse", f"value is not a decimal number: {shown!r}") from None
        # float() also takes "1_000" and non-ASCII digits and spaces: sensors send none of those.
        if "_" in shown or not shown.isascii():
            raise InvalidEntry("parse", f"value is not a decimal number: {shown!r}")
    if not math.isfinite(value):
        raise InvalidEntry("validate", f"value is not finite (NaN, Infinity or beyond a double): {shown!r}")
    return value


def _timestamp(raw, entry_id) -> datetime:
    if _is_number(raw):
        return _from_epoch(raw, type(raw).__name__)
    text = "" if raw is None else _text(raw, "timestamp", MAX_NUMBER_LENGTH).strip(_ASCII_WS)
    if not text:
        return _entry_id_time(entry_id)
    if ":" not in text and _DECIMAL.fullmatch(text):  # the ':' test only skips the regex for the usual ISO form
        return _from_epoch(float(text), repr(text))
    try:
        ts = datetime.fromisoformat(text)
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except OverflowError:
        raise InvalidEntry("validate", f"timestamp out of range: {text!r}") from None
    except ValueError:
        if _LEAP_SECOND.search(text):
            reason = f"timestamp is a leap second, which cannot be stored exactly: {text!r}"
            raise InvalidEntry("validate", reason) from None
        raise InvalidEntry("parse", f"timestamp is neither ISO 8601 nor a Unix epoch: {text!r}") from None


def _from_epoch(number, shown: str) -> datetime:
    """Seconds, or milliseconds from |x| >= 1e11 on (see the module docstring).

    timedelta is exact for whole numbers (fromtimestamp(ms / 1000) is not, from about 2100 on).
    """
    try:
        if abs(number) >= _EPOCH_MS_FROM:
            return _EPOCH + timedelta(milliseconds=number)
        return _EPOCH + timedelta(seconds=number)
    except (OverflowError, ValueError):  # beyond year 1..9999, inf, NaN
        raise InvalidEntry("validate", f"timestamp out of range: {shown}") from None


def _entry_id_time(entry_id) -> datetime:
    text = _text(entry_id, "entry id", MAX_NUMBER_LENGTH)
    millis, dash, seq = text.partition("-")
    if not (dash and millis.isdigit() and seq.isdigit() and text.isascii()):
        raise InvalidEntry("parse", f"no timestamp, and entry id is not a Redis id: {text!r}")
    try:
        return _EPOCH + timedelta(milliseconds=int(millis))
    except OverflowError:
        raise InvalidEntry("validate", f"no timestamp, and entry id time out of range: {text!r}") from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _double(text: str) -> float:
    """Refuse JSON numbers beyond a double (1e999, 1e-999): jsonb's numeric has its own, different limits."""
    number = float(text)
    if math.isinf(number) or (number == 0.0 and _NONZERO_MANTISSA.match(text)):
        raise InvalidEntry("validate", f"metadata number beyond a double: {text[:40]}")
    return number


_DECODER = json.JSONDecoder(parse_float=_double, parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _check_json(node, depth: int) -> None:
    """Walk decoded metadata for what jsonb refuses but json.loads accepts: depth, \\u0000, lone surrogates."""
    if isinstance(node, str):
        if "\x00" in node:
            raise InvalidEntry("validate", "metadata contains \\u0000, which jsonb cannot store")
        if not node.isascii():
            try:
                node.encode()
            except UnicodeEncodeError:
                raise InvalidEntry("validate", "metadata contains an unpaired surrogate escape") from None
    elif isinstance(node, (dict, list)):
        if depth >= MAX_METADATA_DEPTH:
            raise InvalidEntry("validate", f"metadata nested deeper than {MAX_METADATA_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                _check_json(key, depth)
                _check_json(value, depth + 1)
        else:
            for value in node:
                _check_json(value, depth + 1)


def _metadata(raw, budget: int) -> tuple[dict, str] | None:
    """-> (object, original text), or None when empty or blank. `budget`: what extra fields left."""
    text = _text(raw, "metadata", MAX_METADATA_BYTES)
    start = len(text) - len(text.lstrip(_JSON_WS))
    if start == len(text):
        return None
    if len(text) > budget:
        raise InvalidEntry("validate", f"metadata and extra fields larger than {MAX_METADATA_BYTES} bytes")
    try:
        # what JSONDecoder.decode does, without its two (here slow) regex calls
        obj, end = _DECODER.raw_decode(text, start)
        if text[end:].strip(_JSON_WS):
            raise ValueError(f"extra data at character {end}")
    except RecursionError:
        raise InvalidEntry("validate", f"metadata nested deeper than {MAX_METADATA_DEPTH} levels") from None
    except InvalidEntry:
        raise
    except ValueError as exc:
        raise InvalidEntry("parse", f"metadata is not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise InvalidEntry("validate", "metadata must be a JSON object")
    # Only escapes can smuggle in NUL or surrogates, and depth needs at least that many brackets.
    if "\\u" in text or text.count("{") + text.count("[") > MAX_METADATA_DEPTH:
        _check_json(obj, 0)
    return obj, text


def to_row(stream, entry_id, fields) -> tuple[datetime, str, str, float, str | None]:
    """-> (aware UTC timestamp, device_id, sensor_type, value, metadata JSON text or None).

    Raises InvalidEntry and nothing else.
    """
    device_id, sensor_type = parse_stream_name(stream)
    try:
        count = len(fields)
        items = fields.items()
    except (TypeError, AttributeError):
        raise InvalidEntry("parse", f"fields must be a mapping, not {type(fields).__name__}") from None
    if count > MAX_FIELDS:
        raise InvalidEntry("validate", f"more than {MAX_FIELDS} fields")

    known = {}
    extras = {}
    budget = MAX_METADATA_BYTES
    for key, raw in items:
        name = _KNOWN_FIELDS.get(key)
        if name is not None:
            known[name] = raw
            continue
        key = _text(key, "field name", MAX_METADATA_BYTES)
        value = _text(raw, "extra field", MAX_METADATA_BYTES)
        budget -= len(key) + len(value)
        if budget < 0:
            raise InvalidEntry("validate", f"metadata and extra fields larger than {MAX_METADATA_BYTES} bytes")
        if "\x00" in key or "\x00" in value:
            raise InvalidEntry("validate", f"field {key[:40]!r} contains a NUL character")
        extras[key] = value
    if len(known) + len(extras) != count:
        raise InvalidEntry("parse", "a field name occurs twice (as bytes and as str)")

    raw_value = known.get("value")
    if raw_value is None:
        raise InvalidEntry("parse", "value is missing")
    value = _value(raw_value)
    timestamp = _timestamp(known.get("timestamp"), entry_id)

    raw_metadata = known.get("metadata")
    metadata = None if raw_metadata is None else _metadata(raw_metadata, budget)
    if extras:
        if metadata is not None:
            extras.update(metadata[0])  # the explicit metadata object wins
        return timestamp, device_id, sensor_type, value, _ENCODER.encode(extras)
    return timestamp, device_id, sensor_type, value, None if metadata is None else metadata[1]
