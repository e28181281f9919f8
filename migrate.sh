#!/usr/bin/env bash
# Schema migrations: ./migrate.sh create "message" | upgrade [rev] | downgrade N | check | history | current
# Settings (DATABASE_URL, TABLE_NAME, ENABLE_TIMESCALE, ...) come from the environment or ./.env.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
exec uv run --quiet --project "$ROOT" python "$ROOT/migrations.py" "$@"
