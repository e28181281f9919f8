"""TimescaleDB compression and retention policies, from TIMESCALE_COMPRESS_AFTER and
TIMESCALE_RETENTION. Applied by `./migrate.sh upgrade` after the migrations, and again
on every upgrade, so the database follows the settings: an unset setting removes its
policy.

Compression segments by (device_id, sensor_type) and orders by time, newest first, so
"latest readings of one sensor" reads one segment. Writing into a compressed chunk is
slow, so COMPRESS_AFTER must exceed the lateness of the latest readings you expect.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from config import Settings


def apply(connection: Connection, settings: Settings) -> list[str]:
    """Make the policies match the settings; returns what was done, for the user."""
    if not settings.enable_timescale:
        return []
    table = f'"{settings.table_name}"'
    done = []
    enabled = connection.execute(
        text("SELECT compression_enabled FROM timescaledb_information.hypertables WHERE hypertable_name = :t"),
        {"t": settings.table_name},
    ).scalar()
    connection.execute(text("SELECT remove_compression_policy(CAST(:t AS regclass), if_exists => true)"), {"t": table})
    if settings.timescale_compress_after:
        if not enabled:
            connection.execute(
                text(
                    f"ALTER TABLE {table} SET (timescaledb.compress,"
                    " timescaledb.compress_segmentby = 'device_id, sensor_type',"
                    " timescaledb.compress_orderby = 'timestamp DESC')"
                )
            )
        connection.execute(
            text("SELECT add_compression_policy(CAST(:t AS regclass), compress_after => CAST(:i AS interval))"),
            {"t": table, "i": settings.timescale_compress_after},
        )
        done.append(f"compression policy: chunks older than {settings.timescale_compress_after}")
    connection.execute(text("SELECT remove_retention_policy(CAST(:t AS regclass), if_exists => true)"), {"t": table})
    if settings.timescale_retention:
        connection.execute(
            text("SELECT add_retention_policy(CAST(:t AS regclass), drop_after => CAST(:i AS interval))"),
            {"t": table, "i": settings.timescale_retention},
        )
        done.append(f"retention policy: chunks older than {settings.timescale_retention} are dropped")
    return done
