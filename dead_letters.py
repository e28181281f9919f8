"""Dead-letter records: the original README's fields plus a tracing record.

One record serves both homes: the capped Redis stream DEAD_LETTER_STREAM and the
`db_writer_dead_letters` table, which keeps everything the stream's cap trims.
Original fields are kept verbatim; bytes that are not UTF-8 (or hold NUL, which
PostgreSQL text cannot) are stored as {"base64": ...} so a replay restores them.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, NamedTuple

import schema

KEPT_FIELDS = 200
KEPT_BYTES = 64 * 1024
OMITTED = "db_writer:omitted"


class DeadLetter(NamedTuple):
    original_stream: str
    original_id: str
    device_id: str
    sensor_type: str
    value: str
    step: str  # deliver | parse | validate | write
    error: str
    delivery_count: int
    fields: dict  # JSON-safe, see encode_fields
    failed_at: float
    replay_of: int | None = None  # the dead letter this entry was replayed from


def make(
    layout: schema.Layout, stream: bytes, entry_id: bytes, fields: dict, step: str, error: str, delivery_count: int
) -> DeadLetter:
    """The dead letter of one entry; its device and sensor as far as the layout can tell."""
    try:
        device_id, sensor_type = layout.identity(stream, fields)
    except schema.InvalidEntry:
        device_id = sensor_type = ""
    return DeadLetter(
        original_stream=stream_text(stream),
        original_id=_text(entry_id, 100),
        device_id=device_id,
        sensor_type=sensor_type,
        value=_text(fields.get(b"value", fields.get("value", b"")), 1000),
        step=step,
        error=_text(error, 2000),
        delivery_count=delivery_count,
        fields=encode_fields(fields),
        failed_at=time.time(),
        replay_of=_replay_of(fields),
    )


def _replay_of(fields: dict) -> int | None:
    raw = fields.get(schema.REPLAY_FIELD.encode(), fields.get(schema.REPLAY_FIELD))
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return int(text) if isinstance(text, str) and text.isdigit() else None


def stream_fields(letter: DeadLetter, group: str, consumer: str) -> dict[str, str]:
    """The entry added to DEAD_LETTER_STREAM."""
    return {
        "original_stream": letter.original_stream,
        "original_id": letter.original_id,
        "device_id": letter.device_id,
        "sensor_type": letter.sensor_type,
        "value": letter.value,
        "error": letter.error,
        "failed_at": f"{letter.failed_at:.3f}",
        "step": letter.step,
        "delivery_count": str(letter.delivery_count),
        "consumer_group": group,
        "consumer": consumer,
        "fields": json.dumps(letter.fields, separators=(",", ":")),
    }


def encode_fields(fields: dict) -> dict:
    """JSON-safe copy of the fields. A flood of huge entries must not fill Redis or the
    table, so at most KEPT_FIELDS fields of at most KEPT_BYTES each are kept whole;
    longer values keep their head and say how long they were."""
    encoded: dict[str, Any] = {}
    for position, (key, value) in enumerate(fields.items()):
        if position == KEPT_FIELDS:
            encoded[OMITTED] = {"omitted_fields": len(fields) - KEPT_FIELDS}
            break
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
        kept: str | dict
        if len(raw) > KEPT_BYTES:
            kept = {"truncated_from": len(raw), "base64": base64.b64encode(raw[:KEPT_BYTES]).decode()}
        else:
            kept = _json_value(raw)
        encoded[_json_key(key)] = kept
    return encoded


def is_complete(encoded: dict) -> bool:
    """False when encode_fields had to cut something: such an entry cannot be replayed as it was."""
    return OMITTED not in encoded and not any(isinstance(v, dict) and "truncated_from" in v for v in encoded.values())


def decode_fields(encoded: dict) -> dict[bytes, bytes]:
    """The inverse of encode_fields, for replays (of complete records only)."""
    return {_raw(k): _raw(v) for k, v in encoded.items()}


def _json_value(raw: bytes | str) -> str | dict:
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode("ascii")}
    return {"base64": base64.b64encode(raw).decode("ascii")} if "\x00" in text else text


def _json_key(raw: bytes | str) -> str:
    value = _json_value(raw)
    if isinstance(value, str) and not value.startswith("base64:"):
        return value
    raw = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    return "base64:" + base64.b64encode(raw).decode("ascii")


def _raw(value: str | dict) -> bytes:
    if isinstance(value, dict):
        return base64.b64decode(value["base64"])
    if value.startswith("base64:"):
        return base64.b64decode(value[7:])
    return value.encode("utf-8")


def stream_text(stream: bytes | str) -> str:
    """A stream name as dead letters and trace rows record it (hostile names are cut)."""
    return _text(stream, 1000)


def _text(raw: bytes | str, max_bytes: int) -> str:
    """Printable text of at most max_bytes UTF-8 bytes: the trace table indexes some of these
    columns, and a btree entry is limited to about 2.7 kB."""
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "backslashreplace")
    data = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace")
    if len(data) <= max_bytes:
        return data.decode()
    return data[: max_bytes - 20].decode("utf-8", "ignore") + f"…[{len(data)} bytes]"
