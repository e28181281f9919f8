# syntax=docker/dockerfile:1
# db-writer worker image: one worker per container (`main.py run`); `main.py health` is the probe.
# Migrations: `python migrations.py upgrade --wait 60` (compose.yaml's `migrate` service).
# Runtime dependencies only; uv builds the environment, nothing calls uv at run time.
# Not built on the development machine (it has no Docker engine); see README "Containers".
FROM ghcr.io/astral-sh/uv:python3.12-bookworm-slim

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json \
    MIGRATE_WAIT_SEC=60

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when the lock file changes.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project

# Then the project itself (README.md and LICENSE are part of its metadata), installed so that
# the `db-writer` command and its version exist.
COPY pyproject.toml uv.lock README.md LICENSE alembic.ini ./
COPY alembic/ alembic/
COPY *.py ./
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev \
    && .venv/bin/python -m compileall -q ./*.py \
    && groupadd --system --gid 10001 dbwriter \
    && useradd --system --uid 10001 --gid dbwriter --no-create-home --shell /usr/sbin/nologin dbwriter

ENV PATH="/app/.venv/bin:$PATH"
USER 10001:10001

HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "main.py", "health"]

# SIGTERM: the worker finishes its batch in flight, acks it and exits (SHUTDOWN_TIMEOUT_SEC).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "main.py"]
CMD ["run"]
