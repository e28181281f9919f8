"""Settings: names and defaults of the original README, one-line errors, secrets masked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, inspect_settings, load_settings, mask_url

ROOT = Path(__file__).resolve().parents[1]
DB = "postgresql://postgres@127.0.0.1:5432/db"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(("REDIS_", "DB_", "DATABASE_", "BATCH_", "TABLE_", "LOG_", "CONSUMER_", "STREAM_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_follow_the_original_readme():
    s = load_settings(database_url=DB)
    assert (s.redis_host, s.redis_port, s.consumer_group_name, s.consumer_name) == (
        "localhost",
        6379,
        "db_writer",
        "worker-01",
    )
    # BATCH_SIZE is 1000, not the original's 100: measured, see "What changed from the original README".
    assert (s.batch_size, s.batch_timeout_sec, s.stream_pattern) == (1000, 5.0, "mqtt_stream:*")
    assert (s.dead_letter_stream, s.table_name, s.enable_timescale) == ("mqtt_stream:failed", "sensor_readings", False)
    assert (s.log_level, s.log_format) == ("INFO", "json")


def test_environment_and_dotenv_are_read(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("BATCH_SIZE=250\nDB_NAME=iot\nDB_PASSWORD=s3cr3t\n")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    s = load_settings()
    assert s.batch_size == 250 and s.log_level == "DEBUG"
    assert s.postgres_dsn == "postgresql://postgres:s3cr3t@localhost:5432/iot"


def test_redis_url_wins_and_parts_build_a_url():
    assert (
        load_settings(database_url=DB, redis_url="rediss://:pw@cache:6380/2").redis_dsn == "rediss://:pw@cache:6380/2"
    )
    assert (
        load_settings(database_url=DB, redis_host="r", redis_port=7000, redis_db=3, redis_password="p w").redis_dsn
        == "redis://:p%20w@r:7000/3"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "BATCH_SIZE: Input should be greater than or equal to 1"),
        ({"log_level": "LOUD"}, "LOG_LEVEL: Input should be 'DEBUG'"),
        ({"log_format": "xml"}, "LOG_FORMAT:"),
        ({"database_url": "mysql://u:pw@h/db"}, "DATABASE_URL: must be a postgresql:// URL"),
        ({"table_name": 'readings"; DROP TABLE x; --'}, "TABLE_NAME: must be a plain SQL identifier"),
        ({"redis_url": "http://x"}, "REDIS_URL: must be a redis://"),
        ({"timescale_chunk_interval": "soon"}, "TIMESCALE_CHUNK_INTERVAL:"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(overrides, message):
    values = {"database_url": DB, **overrides}
    with pytest.raises(ConfigError) as info:
        load_settings(**values)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value) and "pw" not in str(info.value)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"enable_timescale": "yes", "metrics_port": " 9100 "}, (True, 9100, 1000)),
        ({"enable_timescale": "OFF", "metrics_port": "", "batch_size": "250"}, (False, None, 250)),
        ({"enable_timescale": 1, "metrics_port": None, "batch_size": 7}, (True, None, 7)),
        ({"enable_timescale": False, "metrics_port": 9100.0, "batch_size": 250.0}, (False, 9100, 250)),
    ],
)
def test_text_from_env_files_gets_its_type(given, expected):
    s = load_settings(database_url=DB, **given)
    assert (s.enable_timescale, s.metrics_port, s.batch_size) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"batch_size": "1.5"}, "BATCH_SIZE: Input should be a valid integer (got '1.5')"),
        ({"enable_timescale": "maybe"}, "ENABLE_TIMESCALE: Input should be a valid boolean"),
        ({"batch_timeout_sec": "soon"}, "BATCH_TIMEOUT_SEC: Input should be a valid number"),
        ({"consumer_name": "x" * 201}, "CONSUMER_NAME: String should have at most 200 characters"),
        ({"batch_sizee": 5}, "BATCH_SIZEE: not a setting"),
        ({"redis_mode": "Cluster", "redis_db": 2}, "REDIS_MODE=cluster: a Redis Cluster has database 0 only"),
    ],
)
def test_a_value_of_the_wrong_kind_is_named(given, message):
    with pytest.raises(ConfigError) as info:
        load_settings(database_url=DB, **given)
    assert str(info.value).startswith(message)


def test_secrets_never_show():
    s = load_settings(database_url="postgresql://u:topsecret@h/db", redis_password="alsosecret")
    assert "topsecret" not in repr(s) and "alsosecret" not in repr(s)
    assert mask_url("postgresql://u:topsecret@h/db") == "postgresql://u:***@h/db"


def test_the_config_report_masks_every_secret_setting(tmp_path, monkeypatch):
    """What `config` prints: every setting typed Secret is masked, a URL down to its password."""
    given = {
        "DATABASE_URL": "postgresql://u:pgpass1@h/db",
        "REDIS_URL": "redis://:urlpass5@h:6379/0",
        "DB_PASSWORD": "dbpass3",
        "REDIS_PASSWORD": "rpass2",
        "REDIS_SENTINEL_PASSWORD": "spass4",
    }
    for name in given:
        monkeypatch.delenv(name, raising=False)
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in given.items()))
    report = inspect_settings(env_file)
    assert report.problems == []
    secrets = ("pgpass1", "rpass2", "dbpass3", "spass4", "urlpass5")
    assert not [secret for secret in secrets if secret in str(report.values)]
    assert report.values["DATABASE_URL"][0] == "postgresql://u:***@h/db"
    assert report.values["REDIS_SENTINEL_PASSWORD"][0] == "***"


def test_no_database_is_a_clear_error():
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        load_settings()


@pytest.mark.parametrize(
    "assignment", ["BATCH_SIZE=0", "LOG_LEVEL=LOUD", "DATABASE_URL=mysql://u:pw@h/db", "TABLE_NAME=a;b"]
)
def test_main_exits_2_with_one_line(assignment):
    name, value = assignment.split("=", 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_"))}
    env.update({"DATABASE_URL": DB, name: value})
    done = subprocess.run([sys.executable, str(ROOT / "main.py")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"db-writer: {name}:"), done.stderr
    assert done.stdout == ""


def test_env_example_lists_every_setting_with_its_default():
    example = ROOT / ".env.example"
    named = {line.lstrip("# ").split("=", 1)[0] for line in example.read_text().splitlines() if "=" in line}
    from config import Settings

    assert {name.upper() for name in Settings.names()} <= named
    as_shipped = load_settings(env_file=example)
    defaults = load_settings(database_url=as_shipped.database_url.get_secret_value())
    assert as_shipped == defaults  # every line that is not commented out shows the default
