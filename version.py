"""db-writer's version. It is kept in one place, pyproject.toml's `version`: read here from
the installed metadata (`uv sync` installs the project), or from pyproject.toml next to this
file when the project is not installed (a plain copy of the tree)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "db-writer"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        with open(Path(__file__).resolve().with_name("pyproject.toml"), "rb") as file:
            return str(tomllib.load(file)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"
