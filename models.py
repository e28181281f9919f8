"""The database schema: the source of truth that Alembic migrations are made from.

The service never creates tables; `./migrate.sh upgrade` does. The readings table
is declared under its default name, and `metadata_for(table_name)` renames it for
TABLE_NAME, so migrations and the writer agree on one name.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    ARRAY,
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

READINGS_TABLE = "sensor_readings"
BATCHES_TABLE = "db_writer_batches"
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


class WrittenBatch(Base):
    """The ledger: one row per committed batch, written in the batch's own transaction.

    Arrays hold, per stream, the first and last entry id and the count, so a batch over
    4,000 streams costs one row, and `trace` finds an entry through the GIN index."""

    __tablename__ = BATCHES_TABLE

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    committed_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now(), nullable=False)
    consumer_group: Mapped[str] = mapped_column(Text, nullable=False)
    consumer: Mapped[str] = mapped_column(Text, nullable=False)
    entries: Mapped[int] = mapped_column(Integer, nullable=False)
    rows_inserted: Mapped[int] = mapped_column(Integer, nullable=False)
    streams: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    first_ids: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    last_ids: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    counts: Mapped[list[int]] = mapped_column(ARRAY(Integer), nullable=False)

    __table_args__ = (
        Index(None, "streams", postgresql_using="gin"),
        Index(None, "committed_at"),
    )


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

    __table_args__ = (
        Index(None, "original_stream", "original_id"),
        Index(None, "failed_at"),
    )


class Sensor(Base):
    """The sensor registry: which sensors exist and when each last sent a reading, so
    silent sensors can be found (`main.py status --sensors`). Upserted once per sensor
    per batch, in the batch's transaction, counting only rows actually inserted."""

    __tablename__ = SENSORS_TABLE

    device_id: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    sensor_type: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
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
                index.name = index.name.replace(READINGS_TABLE, table_name, 1)
    return renamed
