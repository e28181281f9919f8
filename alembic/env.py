"""Alembic environment: the URL and schema options come from the service's settings.

Callers may hand in `config.attributes["settings"]` (migrations.py does) or just
`config.attributes["database_url"]` (tests); plain `alembic` reads the environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import load_settings
from models import metadata_for

config = context.config
if "settings" not in config.attributes:
    overrides = {"database_url": config.attributes["database_url"]} if "database_url" in config.attributes else {}
    config.attributes["settings"] = load_settings(**overrides)
settings = config.attributes["settings"]
target_metadata = metadata_for(settings.table_name)


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Compare only our own tables: TimescaleDB and other tenants of the database are not ours."""
    if type_ == "table":
        return name in target_metadata.tables
    return True


def run_migrations_offline() -> None:
    context.configure(
        url=settings.sqlalchemy_url,
        target_metadata=target_metadata,
        include_object=include_object,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(
        settings.sqlalchemy_url,
        poolclass=pool.NullPool,
        connect_args={"connect_timeout": max(1, int(settings.db_connect_timeout_s))},
    )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            include_object=include_object,
            compare_type=True,
            compare_server_default=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
