"""The hostile corpus, tests/data/hostile_corpus.jsonl, as Redis delivers it (all bytes).

Shared by test_corpus.py (straight through schema.to_row) and the end-to-end tests
(published into a real Redis, then looked for in the table or the dead letters).

One JSON object a line: {"name", "stream", "fields", "expect"}.
- A blob (stream, field name, field value) is a str (its UTF-8), {"b64": ...} for bytes
  that are not UTF-8, {"repeat": s, "times": n} for big ones, or a list of blobs, joined.
- "fields" is a list of [name, value] pairs and {"generate": n, "key": "f{i}", "value": blob}.
- "expect" is {"row": {"device_id", "sensor_type", "value", "timestamp", ["metadata"]}} or
  {"dead_letter": {"step": "parse" | "validate", "reason_contains": ...}}. A row's timestamp is
  ISO 8601, or null for "the time of the Redis entry id". "metadata", when present, is the
  expected JSON object (null for none); when absent it is not checked.
"""

import base64
import json
from collections.abc import Iterator
from pathlib import Path

CORPUS_PATH = Path(__file__).parent / "data" / "hostile_corpus.jsonl"


def blob(spec) -> bytes:
    if isinstance(spec, str):
        return spec.encode()
    if isinstance(spec, list):
        return b"".join(blob(part) for part in spec)
    if "b64" in spec:
        return base64.b64decode(spec["b64"])
    return spec["repeat"].encode() * spec["times"]


def _fields(specs) -> dict[bytes, bytes]:
    fields = {}
    for spec in specs:
        if isinstance(spec, dict):
            pairs = [(spec["key"].format(i=i).encode(), blob(spec["value"])) for i in range(spec["generate"])]
        else:
            pairs = [(blob(spec[0]), blob(spec[1]))]
        for key, value in pairs:
            assert key not in fields, f"field {key!r} given twice"
            fields[key] = value
    return fields


def load_corpus() -> Iterator[tuple[str, bytes, dict[bytes, bytes], dict]]:
    """-> (name, stream, fields, expected) for each corpus item, in file order."""
    with CORPUS_PATH.open(encoding="utf-8") as lines:
        for line in lines:
            item = json.loads(line)
            yield item["name"], blob(item["stream"]), _fields(item["fields"]), item["expect"]
