"""Dead letters remember the dead letter they were replayed from.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

A replayed entry carries the field db_writer_replay_of (the id of the dead letter it
came from); if it fails again, its new dead letter records that id in replay_of, and
`dlq replay` leaves it alone unless asked (--again): two replays in a row converge.
Written by hand.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("db_writer_dead_letters", sa.Column("replay_of", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("db_writer_dead_letters", "replay_of")
