#!/usr/bin/env bash
# Schema migrations: ./migrate.sh create "message" | upgrade [rev] [--wait SECONDS] | downgrade N | check | history | current
# Settings (DATABASE_URL, TABLE_NAME, ENABLE_TIMESCALE, ...) come from the environment or ./.env.
# Runtime dependencies only (--no-dev): in a `uv sync --no-dev` environment it installs no dev
# tools, and in a developer's environment it removes none (`uv run` syncs inexactly).
# In the container image there is no uv at run time: `python migrations.py ...` is the same.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
exec uv run --quiet --no-dev --project "$ROOT" python "$ROOT/migrations.py" "$@"
