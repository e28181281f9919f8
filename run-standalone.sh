#!/usr/bin/env bash
# Everything on one machine: Redis, PostgreSQL, migrations and the workers; Ctrl-C stops it all.
#
#   ./run-standalone.sh [--demo] [--workers N] [--quiet] [--embedded]
#
# Needs only Python >= 3.11: installs uv if missing (from PyPI), syncs the venv, then
# hands over to standalone.py (its docstring has the details; --help lists the options).
# Without REDIS_URL/REDIS_HOST and DATABASE_URL/DB_NAME it starts an embedded Valkey and
# an embedded PostgreSQL, keeping their data in .standalone/ (STANDALONE_DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

say() { printf '%s\n' "$*" >&2; }

find_python() {
    local candidate
    for candidate in python3 python python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# uv: on PATH, or where `pip install --user uv` puts it, or installed now from PyPI.
find_uv() {
    command -v uv 2>/dev/null && return 0
    local python user_bin
    python="$(find_python)" || return 1
    user_bin="$("$python" -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))')"
    [ -x "$user_bin/uv" ] && { echo "$user_bin/uv"; return 0; }
    [ -x "$ROOT/.standalone/uv/bin/uv" ] && { echo "$ROOT/.standalone/uv/bin/uv"; return 0; }
    return 1
}

install_uv() {
    local python
    if ! python="$(find_python)"; then
        say "run-standalone: needs Python >= 3.11 (python3 on PATH); found none"
        exit 1
    fi
    say "uv not found: installing it from PyPI with $python -m pip install --user uv ..."
    if "$python" -m pip install --quiet --user uv >&2; then
        return 0
    fi
    # An "externally managed" system Python (PEP 668) refuses --user installs: use a private venv.
    say "pip --user was refused; installing uv into .standalone/uv instead ..."
    mkdir -p "$ROOT/.standalone"
    if "$python" -m venv "$ROOT/.standalone/uv" >&2 && "$ROOT/.standalone/uv/bin/python" -m pip install --quiet uv >&2; then
        return 0
    fi
    say "run-standalone: could not install uv; install it yourself (python3 -m pip install uv) and run me again"
    exit 1
}

if ! UV="$(find_uv)"; then
    install_uv
    UV="$(find_uv)" || { say "run-standalone: uv was installed but cannot be found"; exit 1; }
fi
export PATH="$(dirname "$UV"):$PATH" # migrate.sh calls uv too

# An up-to-date venv needs no network (first try); otherwise download what is missing.
# Compiled to bytecode at install: where PYTHONDONTWRITEBYTECODE is set (this machine, many
# containers), Python would otherwise compile every library again at each command's start.
if ! "$UV" sync --offline --quiet --compile-bytecode 2>/dev/null; then
    say "installing dependencies (uv sync) ..."
    "$UV" sync --compile-bytecode
fi
VENV="${UV_PROJECT_ENVIRONMENT:-$ROOT/.venv}"
"$VENV/bin/python" -m compileall -q "$ROOT"/*.py >/dev/null || true # the project's own modules too

# The venv's Python directly, not `uv run`: a Ctrl-C then reaches standalone.py once (uv run
# would forward a second SIGINT), and SIGTERM to this script's PID reaches it too (exec).
exec "$VENV/bin/python" "$ROOT/standalone.py" "$@"
