"""Gaps in the data: periods with no reading, longer than GAP_FACTOR times a sensor's usual
interval, learned from its own readings (seed 003's team found days missing only later).

Computed in SQL, sensor by sensor along the primary key (device_id, sensor_type,
timestamp): an index range scan per sensor from `since` on, never a scan of the whole
table; on a TimescaleDB hypertable the timestamp bound also skips the older chunks.
The usual interval is the median spacing of the sensor's readings in that window, so a
sensor that reports every second and one that reports hourly are each judged by their own
rhythm. A gap still open (no reading since) is reported with no end.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql


@dataclass
class Gap:
    device_id: str
    sensor_type: str
    start: datetime  # the last reading before the gap
    end: datetime | None  # the first reading after it; None: still open
    seconds: float
    usual_s: float


def find(
    conn: psycopg.Connection,
    table: str,
    since: datetime,
    factor: float,
    sensor: tuple[str, str] | None = None,
    limit: int = 100,
) -> list[Gap]:
    """The gaps since `since`, newest first."""
    where, params = "", {"since": since, "factor": factor, "limit": limit}
    if sensor is not None:
        where, params["device"], params["sensor"] = "WHERE device_id = %(device)s AND sensor_type = %(sensor)s", *sensor
    query = sql.SQL(
        "SELECT s.device_id, s.sensor_type, g.gap_start, g.gap_end, g.seconds, g.usual"
        " FROM (SELECT DISTINCT device_id, sensor_type FROM db_writer_sensors " + where + ") s"
        " CROSS JOIN LATERAL ("
        "  WITH d AS (SELECT r.timestamp AS ts, r.timestamp - lag(r.timestamp) OVER (ORDER BY r.timestamp) AS diff"
        "   FROM {table} r WHERE r.device_id = s.device_id AND r.sensor_type = s.sensor_type"
        "   AND r.timestamp >= %(since)s),"
        "  u AS (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM diff)) AS usual"
        "   FROM d WHERE diff IS NOT NULL)"
        "  SELECT d.ts - d.diff AS gap_start, d.ts AS gap_end, extract(epoch FROM d.diff)::float8 AS seconds,"
        "   u.usual FROM d, u WHERE u.usual > 0 AND extract(epoch FROM d.diff) > %(factor)s * u.usual"
        "  UNION ALL"
        "  SELECT max(d.ts), NULL, extract(epoch FROM now() - max(d.ts))::float8, u.usual FROM d, u"
        "   WHERE u.usual > 0 GROUP BY u.usual HAVING extract(epoch FROM now() - max(d.ts)) > %(factor)s * u.usual"
        " ) g ORDER BY coalesce(g.gap_end, 'infinity') DESC, g.gap_start DESC LIMIT %(limit)s"
    ).format(table=sql.Identifier(table))
    return [Gap(*row) for row in conn.execute(query, params)]


def sensors_in_gap(conn: psycopg.Connection, factor: float) -> int:
    """How many sensors are silent longer than `factor` times their usual interval now. The
    usual interval here comes from the registry (span over count): cheap enough for every
    metrics scrape, and close enough for an alert; `status --gaps` has the exact periods."""
    row = conn.execute(
        "SELECT count(*) FROM (SELECT max(last_written_at) AS arrived,"
        " extract(epoch FROM max(last_seen) - min(first_seen)) / greatest(sum(readings) - 1, 1) AS usual"
        " FROM db_writer_sensors GROUP BY device_id, sensor_type) s"
        " WHERE usual > 0 AND extract(epoch FROM now() - arrived) > %s * usual",
        [factor],
    ).fetchone()
    return int(row[0]) if row else 0
