"""The database schema: the source of truth that Alembic migrations are made from.

The service never creates tables; `./migrate.sh upgrade` does. The readings table
is declared under its default name, and `metadata_for(table_name)` renames it for
TABLE_NAME, so migrations and the writer agree on one name.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Double,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import quoted_name

READINGS_TABLE = "sensor_readings"
STREAMS_TABLE = "db_writer_streams"
PROGRESS_TABLE = "db_writer_progress"
DEAD_LETTERS_TABLE = "db_writer_dead_letters"
SENSORS_TABLE = "db_writer_sensors"
NAME_LENGTH = 100

TIMESTAMPTZ = TIMESTAMP(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "pk": "%(table_name)s_pkey",
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        }
    )


class SensorReading(Base):
    """One reading. The key (device_id, sensor_type, timestamp) makes a redelivered
    entry a no-op, serves "latest readings of one sensor", and includes the time
    column, which TimescaleDB requires of every unique index on a hypertable."""

    __tablename__ = READINGS_TABLE

    timestamp: Mapped[datetime] = mapped_column(TIMESTAMPTZ, nullable=False)
    device_id: Mapped[str] = mapped_column(String(NAME_LENGTH), nullable=False)
    sensor_type: Mapped[str] = mapped_column(String(NAME_LENGTH), nullable=False)
    value: Mapped[float] = mapped_column(Double, nullable=False)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSONB, nullable=True)
    created_at: Mapped[datetime | None] = mapped_column(TIMESTAMPTZ, server_default=func.now())

    __table_args__ = (
        PrimaryKeyConstraint("device_id", "sensor_type", "timestamp"),
        # Time-range scans over all devices; tiny, and cheap to keep up on append-mostly data.
        Index(None, "timestamp", postgresql_using="brin"),
    )


class StreamCheck(Base):
    """Per stream and group: every entry up to `checked_through` is known to be written or
    dead-lettered on this server. Advanced by workers that reconciled on this very server;
    a worker that lands on another server (a failover) checks the entries after it row by
    row and writes again what is missing (reconcile.py)."""

    __tablename__ = STREAMS_TABLE

    consumer_group: Mapped[str] = mapped_column(Text, primary_key=True)
    stream: Mapped[str] = mapped_column(Text, primary_key=True)
    checked_through: Mapped[str] = mapped_column(Text, nullable=False)  # a Redis entry id
    checked_position: Mapped[int | None] = mapped_column(BigInteger)  # entries ever added up to it, when Redis tells
    checked_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now(), nullable=False)

    __table_args__ = {"postgresql_with": {"fillfactor": "70"}}  # noqa: RUF012 - room for HOT updates


class StreamProgress(Base):
    """The ledger: per group, stream and consumer, what that consumer handled. One row per
    stream and consumer, however many batches: merged in place every second after the
    batches it sums committed, each worker touching only its own rows."""

    __tablename__ = PROGRESS_TABLE

    consumer_group: Mapped[str] = mapped_column(Text, primary_key=True)
    stream: Mapped[str] = mapped_column(Text, primary_key=True)
    consumer: Mapped[str] = mapped_column(Text, primary_key=True)
    first_id: Mapped[str] = mapped_column(Text, nullable=False)  # lowest entry id handled
    last_id: Mapped[str] = mapped_column(Text, nullable=False)  # highest entry id handled
    entries: Mapped[int] = mapped_column(BigInteger, nullable=False)  # handled: rows, duplicates, dead letters
    rows_inserted: Mapped[int] = mapped_column(BigInteger, nullable=False)
    dead_letters: Mapped[int] = mapped_column(BigInteger, nullable=False)
    first_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now(), nullable=False)

    __table_args__ = {"postgresql_with": {"fillfactor": "70"}}  # noqa: RUF012 - room for HOT updates


class DeadLetter(Base):
    """Every entry that could not be written, with the step, the reason and its fields
    verbatim, so "what failed, where and why" is a SQL query, and the capped Redis
    dead-letter stream loses nothing."""

    __tablename__ = DEAD_LETTERS_TABLE

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    failed_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now(), nullable=False)
    original_stream: Mapped[str] = mapped_column(Text, nullable=False)
    original_id: Mapped[str] = mapped_column(Text, nullable=False)
    device_id: Mapped[str | None] = mapped_column(Text)
    sensor_type: Mapped[str | None] = mapped_column(Text)
    value: Mapped[str | None] = mapped_column(Text)
    step: Mapped[str] = mapped_column(Text, nullable=False)
    error: Mapped[str] = mapped_column(Text, nullable=False)
    consumer_group: Mapped[str] = mapped_column(Text, nullable=False)
    consumer: Mapped[str] = mapped_column(Text, nullable=False)
    delivery_count: Mapped[int] = mapped_column(Integer, nullable=False)
    fields: Mapped[dict] = mapped_column(JSONB, nullable=False)
    replayed_at: Mapped[datetime | None] = mapped_column(TIMESTAMPTZ)
    replay_of: Mapped[int | None] = mapped_column(BigInteger)  # the dead letter this entry was replayed from

    __table_args__ = (
        Index(None, "original_stream", "original_id", unique=True),  # one dead letter per entry
        Index(None, "failed_at"),
    )


class Sensor(Base):
    """The sensor registry: which sensors exist and when each last sent a reading, so
    silent sensors can be found (`main.py status --sensors`). Each worker keeps its own
    row per sensor, upserted in the batch's transaction and counting only rows actually
    inserted: exact (never a count lost or doubled by a crash), and no two workers ever
    wait for each other's row. Readers sum over consumers; consumer '' holds the counts
    folded in from workers gone longer than LEDGER_RETENTION."""

    __tablename__ = SENSORS_TABLE

    device_id: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    sensor_type: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    consumer: Mapped[str] = mapped_column(Text, primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(TIMESTAMPTZ, nullable=False)  # earliest reading timestamp
    last_seen: Mapped[datetime] = mapped_column(TIMESTAMPTZ, nullable=False)  # latest reading timestamp
    last_written_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now(), nullable=False)
    readings: Mapped[int] = mapped_column(BigInteger, nullable=False)

    # No index on last_seen: each batch updates these rows, and unindexed columns (with room
    # left on the page) make those HOT updates, without index churn. Status scans the table.
    __table_args__ = {"postgresql_with": {"fillfactor": "50"}}  # noqa: RUF012 - SQLAlchemy reads it once


def metadata_for(table_name: str = READINGS_TABLE) -> MetaData:
    """The schema with the readings table named `table_name` (TABLE_NAME)."""
    if table_name == READINGS_TABLE:
        return Base.metadata
    renamed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        copy = table.to_metadata(renamed, name=table_name if table.name == READINGS_TABLE else None)
        if copy.name == table_name:
            copy.primary_key.name = f"{table_name}_pkey"
            for index in copy.indexes:
                index.name = quoted_name(str(index.name).replace(READINGS_TABLE, table_name, 1), None)
    return renamed
