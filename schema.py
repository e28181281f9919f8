"""Turn one Redis stream entry into one readings row, or say why it never can be.

This module owns two facts: which columns a row has (`Reading`, `COLUMN_TYPES`,
`KEY_COLUMNS`; db_writer.py derives its COPY, INSERT and staging table from them) and
where a reading's identity comes from (`Layout`: the stream name, or two fields of the
entry). The worker, the dead letters, `trace` and `reconcile` all ask a `Layout`.

This is the hot path (tens of thousands of entries a second), so it is plain
functions over str/bytes: no model objects, one pass over the fields.

The contract the writer relies on: `Layout.to_row` returns a row or raises
`InvalidEntry`, for any input whatsoever. A data error must become a dead
letter for that one entry; it must never reach PostgreSQL, where a single bad
row fails the whole COPY batch (the original project lost 50,000 readings to
one over-long device id). So everything PostgreSQL would refuse is refused
here first: over-long names, NUL characters, non-UTF-8 bytes, NaN/Infinity,
timestamps outside the datetime range, JSON that jsonb rejects.

Decisions (each is also tested in tests/test_schema.py and the hostile corpus):

* Identity in the stream name (the default): ``{prefix}{device_id}:{sensor_type}``,
  where the prefix is STREAM_PATTERN up to its first wildcard. The device id ends
  at the first ':' and the sensor type is all the rest, so ``esp32:temp:inner``
  gives ("esp32", "temp:inner"): a sensor type is a free-form name that may grow
  sub-parts, and every reading of one device must land under one id whatever
  sensor it came from. Hash-tag braces around a segment are not part of the name
  (``{esp32}:temperature`` gives "esp32"); inside them a ':' is kept, so
  ``{a4:cf:12:00:00:01}:temp`` gives the MAC address whole.
* Identity in fields (DEVICE_ID_FIELD and SENSOR_TYPE_FIELD): the stream name
  says nothing, so one shared stream or many shards carry any device; the two
  fields are taken verbatim (':' included) and are not copied into metadata.
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
* Extra fields (anything but value/timestamp/metadata and the identity fields) are merged into the
  metadata as strings, never guessed into numbers. On a key clash the explicit
  metadata object wins: it is what the publisher deliberately wrote, a stray
  field is more likely an accident. With no extra fields the metadata text is
  passed through untouched (jsonb normalises it anyway), otherwise the merged
  object is dumped compactly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

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
# A replayed entry names the dead letter it came from (see cli.py, dlq replay); not metadata.
REPLAY_FIELD = "db_writer_replay_of"
_READING_FIELDS = ("value", "timestamp", "metadata", REPLAY_FIELD)
_new_tuple = tuple.__new__
_GLOB = re.compile(r"[*?\[\\]")


class Reading(NamedTuple):
    """One row of the readings table. The field order is the column order of the COPY."""

    timestamp: datetime  # aware, UTC
    device_id: str
    sensor_type: str
    value: float
    metadata: str | None  # JSON text of an object, already checked against jsonb's rules


# How each column travels in a binary COPY; db_writer.py builds its statements from these.
COLUMN_TYPES: dict[str, str] = {
    "timestamp": "timestamptz",
    "device_id": "varchar",
    "sensor_type": "varchar",
    "value": "float8",
    "metadata": "jsonb",
}
KEY_COLUMNS = ("device_id", "sensor_type", "timestamp")  # the table's primary key: one reading per key
assert tuple(COLUMN_TYPES) == Reading._fields and set(KEY_COLUMNS) <= set(Reading._fields)


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


def _is_number(raw) -> bool:
    return isinstance(raw, (int, float)) and not isinstance(raw, bool)


def _value(raw) -> float:
    if type(raw) is bytes and len(raw) <= MAX_NUMBER_LENGTH and raw.isascii() and b"_" not in raw:
        try:  # the usual case, with no detour through text; anything odd takes the careful path
            value = float(raw)
        except ValueError:
            pass
        else:
            if math.isfinite(value):
                return value
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
    if type(raw) is bytes and b":" in raw and len(raw) <= MAX_NUMBER_LENGTH:
        try:  # the usual ISO 8601 bytes; anything odd takes the careful path, which says why
            ts = datetime.fromisoformat(raw.decode())
            return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
        except (ValueError, OverflowError):  # UnicodeDecodeError is a ValueError
            pass
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


def stream_prefix(pattern: str) -> str:
    """The literal start of STREAM_PATTERN, which every stream name of the default layout
    begins with; raises ValueError saying why a pattern cannot be split that way."""
    glob = _GLOB.search(pattern)
    if glob is None:
        raise ValueError(
            f"{pattern!r} names one stream, so its name cannot carry the device and sensor:"
            " set DEVICE_ID_FIELD and SENSOR_TYPE_FIELD, or use a pattern such as 'mqtt_stream:*'"
        )
    prefix = pattern[: glob.start()].removesuffix("{")  # 'ingest:{*': the brace opens a hash tag
    if not prefix:
        raise ValueError(
            f"{pattern!r} starts with a wildcard, so no prefix can be cut off before"
            " {device_id}:{sensor_type}: use a pattern such as 'telemetry:*', or set DEVICE_ID_FIELD"
            " and SENSOR_TYPE_FIELD"
        )
    if prefix[-1].isalnum():
        raise ValueError(
            f"{pattern!r} has its wildcard inside a name segment, so device ids would lose"
            f" their first characters: end the prefix at a separator ({prefix.rpartition(':')[0] or prefix}:*)"
        )
    return prefix


class Layout:
    """Where a reading's identity (device id, sensor type) comes from, and the transform
    that uses it: built once from the settings, shared by the loop and the dead letters."""

    def __init__(
        self, *, prefix: str | None = None, device_field: str | None = None, sensor_field: str | None = None
    ) -> None:
        if (device_field is None) != (sensor_field is None) or (prefix is None) == (device_field is None):
            raise ValueError("a layout takes a prefix, or both identity fields")
        self.prefix = prefix
        self.device_field = device_field
        self.sensor_field = sensor_field
        names = {name: name for name in _READING_FIELDS}
        if device_field is not None and sensor_field is not None:
            names |= {device_field: "device_id", sensor_field: "sensor_type"}
            self.describe = f"fields {device_field!r} and {sensor_field!r}"
        else:
            self.describe = f"stream name {prefix}{{device_id}}:{{sensor_type}}"
        # Field names as Redis returns them (bytes) and as callers may pass them (str).
        self._known = names | {name.encode(): role for name, role in names.items()}
        self._stream_identity: Callable[[Any], tuple[str, str]] = lru_cache(maxsize=4096)(self._parse_stream)

    @classmethod
    def from_settings(cls, settings: Any) -> Layout:
        if settings.device_id_field:
            return cls(device_field=settings.device_id_field, sensor_field=settings.sensor_type_field)
        return cls(prefix=stream_prefix(settings.stream_pattern))

    @property
    def in_fields(self) -> bool:
        return self.device_field is not None

    def identity(self, stream: Any, fields: Any) -> tuple[str, str]:
        """-> (device_id, sensor_type) of an entry; raises InvalidEntry like to_row."""
        if self.device_field is None:
            return self.stream_identity(stream)
        try:
            known = {role: raw for key, raw in fields.items() if (role := self._known.get(key))}
        except (TypeError, AttributeError):
            raise InvalidEntry("parse", f"fields must be a mapping, not {type(fields).__name__}") from None
        return (
            self._field_identity(known, "device_id", self.device_field),
            self._field_identity(known, "sensor_type", self.sensor_field),
        )

    def stream_identity(self, stream: Any) -> tuple[str, str]:
        """(device_id, sensor_type) from a stream name of the default layout."""
        if type(stream) is bytes or type(stream) is str:
            return self._stream_identity(stream)  # a few streams, many entries each
        return self._parse_stream(stream)  # bytearray etc. are unhashable

    def _parse_stream(self, stream: Any) -> tuple[str, str]:
        name = _text(stream, "stream name", MAX_STREAM_BYTES)
        prefix = self.prefix or ""
        if not name.startswith(prefix):
            raise InvalidEntry("parse", f"stream name does not start with {prefix!r}")
        rest = name[len(prefix) :]
        close = rest.find("}:") if rest.startswith("{") else -1
        if close > 0:  # a hash-tagged device id, which may itself hold ':'
            device_id, sensor_type = rest[1:close], rest[close + 2 :]
        else:
            device_id, _, sensor_type = rest.partition(":")
        if len(sensor_type) > 2 and sensor_type[0] == "{" and sensor_type[-1] == "}":
            sensor_type = sensor_type[1:-1]
        if not device_id:
            raise InvalidEntry("parse", "stream name has an empty device_id")
        if not sensor_type:
            raise InvalidEntry("parse", "stream name has an empty sensor_type")
        _check_length(device_id, "device_id")
        _check_length(sensor_type, "sensor_type")
        if "\x00" in name:
            raise InvalidEntry("validate", "stream name contains a NUL character")
        return device_id, sensor_type

    def to_row(self, stream: Any, entry_id: Any, fields: Any) -> Reading:
        """One entry -> one Reading. Raises InvalidEntry and nothing else."""
        by_name = self.device_field is None
        if by_name:
            if type(stream) is bytes or type(stream) is str:
                device_id, sensor_type = self._stream_identity(stream)
            else:
                device_id, sensor_type = self._parse_stream(stream)  # bytearray etc. are unhashable
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
        roles = self._known
        for key, raw in items:
            role = roles.get(key)
            if role is not None:
                known[role] = raw
                continue
            key = _text(key, "field name", MAX_METADATA_BYTES)
            extra = _text(raw, "extra field", MAX_METADATA_BYTES)
            budget -= len(key) + len(extra)
            if budget < 0:
                raise InvalidEntry("validate", f"metadata and extra fields larger than {MAX_METADATA_BYTES} bytes")
            if "\x00" in key or "\x00" in extra:
                raise InvalidEntry("validate", f"field {key[:40]!r} contains a NUL character")
            extras[key] = extra
        if len(known) + len(extras) != count:
            raise InvalidEntry("parse", "a field name occurs twice (as bytes and as str)")

        if not by_name:
            device_id = self._field_identity(known, "device_id", self.device_field)
            sensor_type = self._field_identity(known, "sensor_type", self.sensor_field)
        raw_value = known.get("value")
        if raw_value is None:
            raise InvalidEntry("parse", "value is missing")
        value = _value(raw_value)
        timestamp = _timestamp(known.get("timestamp"), entry_id)

        raw_metadata = known.get("metadata")
        metadata = None if raw_metadata is None else _metadata(raw_metadata, budget)
        text: str | None = None if metadata is None else metadata[1]
        if extras:
            if metadata is not None:
                extras.update(metadata[0])  # the explicit metadata object wins
            text = _ENCODER.encode(extras)
        return _new_tuple(Reading, (timestamp, device_id, sensor_type, value, text))  # Reading(...), 2x faster

    @staticmethod
    def _field_identity(known: dict, role: str, field_name: str | None) -> str:
        raw = known.get(role)
        if raw is None:
            raise InvalidEntry("parse", f"{role} field {field_name!r} is missing")
        text = _text(raw, f"{role} field {field_name!r}", MAX_NAME_LENGTH * 4)
        if not text:
            raise InvalidEntry("parse", f"{role} field {field_name!r} is empty")
        _check_length(text, role)
        if "\x00" in text:
            raise InvalidEntry("validate", f"{role} field {field_name!r} contains a NUL character")
        return text


def _check_length(name: str, what: str) -> None:
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidEntry("validate", f"{what} longer than {MAX_NAME_LENGTH} characters")
