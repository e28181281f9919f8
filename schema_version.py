"""Which migration is the head, read from alembic/versions without importing Alembic.

The worker checks at start that the database is at the head, and `health` says whether
it is; neither should pay for loading Alembic and SQLAlchemy (about a second) to learn
one revision id. tests/test_migrations.py checks that this agrees with Alembic's own.
"""

from __future__ import annotations

import re
from pathlib import Path

VERSIONS = Path(__file__).resolve().parent / "alembic" / "versions"
_REVISION = re.compile(r"^revision\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_DOWN = re.compile(r"^down_revision\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)


def head() -> str | None:
    """The revision no other revision builds on."""
    revisions, parents = set(), set()
    for path in VERSIONS.glob("*.py"):
        text = path.read_text()
        if found := _REVISION.search(text):
            revisions.add(found.group(1))
        if down := _DOWN.search(text):
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None
