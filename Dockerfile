# db-writer worker image: one worker per container (`main.py run`); `main.py health` is the probe.
# Not built on the development machine (it has no Docker engine); see README "Containers".
FROM ghcr.io/astral-sh/uv:python3.12-bookworm-slim

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when the lock file changes.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project

COPY pyproject.toml uv.lock alembic.ini migrate.sh ./
COPY alembic/ alembic/
COPY *.py ./
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev \
    && useradd --system --uid 10001 --no-create-home dbwriter

ENV PATH="/app/.venv/bin:$PATH"
USER dbwriter

HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "main.py", "health"]

# SIGTERM: the worker finishes its batch in flight, acks it and exits (SHUTDOWN_TIMEOUT_SEC).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "main.py"]
CMD ["run"]
