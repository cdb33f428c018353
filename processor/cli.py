"""The ``m365sync`` console script (docs/contract.md §1)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from processor.settings import OPERATOR_REQUIRED, SERVICE_REQUIRED, Settings, SettingsError

EXIT_CONFIG = 2
EXIT_NOT_AVAILABLE = 3

ROLES = ("receiver", "worker", "outbound", "subscriptions", "all")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m365sync",
        description="Bidirectional sync of Microsoft 365 calendars with 1Relation.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("receiver", help="HTTP app: Graph webhooks, OAuth connect, 1Relation API")
    commands.add_parser("worker", help="inbound consumers: fetch, encrypt, reconcile into MongoDB")
    commands.add_parser("outbound", help="consumers of 1Relation's outbound messages")
    commands.add_parser("subscriptions", help="subscription manager and scheduled resyncs")
    commands.add_parser("all", help="every role above in one process")
    demo = commands.add_parser(
        "demo", help="`all` plus the Graph simulator and a scripted 1Relation"
    )
    demo.add_argument("--changes", type=int, default=40, help="Outlook-side changes to make")
    keys = commands.add_parser("keys", help="key management")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys_commands.add_parser("rotate", help="rewrap every account's data key under the active key")
    dlq = commands.add_parser("dlq", help="dead-lettered messages")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_commands.add_parser("list", help="list dead-lettered messages with their reasons")
    replay = dlq_commands.add_parser("replay", help="send chosen dead letters back for another try")
    replay.add_argument("ids", nargs="+", metavar="ID")
    status = commands.add_parser(
        "status",
        help="accounts by status, expiring subscriptions, queues, dead letters, lag (read-only)",
    )
    status.add_argument("--json", action="store_true", help="one JSON document for machines")
    return parser


def _load(required: frozenset[str]) -> Settings:
    from processor.settings import load_settings  # noqa: PLC0415  keeps `--help` fast

    return load_settings(required=required)


def _run(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        return asyncio.run(coro_factory())
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from processor.demo import run_demo  # noqa: PLC0415

            return _run(lambda: run_demo(changes=args.changes))
        if args.command in ROLES:
            settings = _load(SERVICE_REQUIRED)
            from processor.app import run_roles  # noqa: PLC0415

            roles = ("receiver", "worker", "outbound", "subscriptions")
            chosen = roles if args.command == "all" else (args.command,)
            return _run(lambda: run_roles(settings, chosen))
        if args.command == "keys":
            settings = _load(OPERATOR_REQUIRED)
            from processor.operations import rotate_keys  # noqa: PLC0415

            return _run(lambda: rotate_keys(settings))
        if args.command == "status":
            settings = _load(frozenset())
            from processor.operations import status  # noqa: PLC0415

            return _run(lambda: status(settings, as_json=args.json))
        if args.command == "dlq":
            settings = _load(OPERATOR_REQUIRED)
            from processor.operations import dlq_list, dlq_replay  # noqa: PLC0415

            if args.dlq_command == "list":
                return _run(lambda: dlq_list(settings))
            return _run(lambda: dlq_replay(settings, args.ids))
    except SettingsError as exc:
        print(f"m365sync: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NotAvailableYet as exc:
        print(f"m365sync: {exc}", file=sys.stderr)
        return EXIT_NOT_AVAILABLE
    return EXIT_CONFIG


class NotAvailableYet(RuntimeError):
    """A command of the contract whose implementation arrives with a later issue."""


if __name__ == "__main__":
    raise SystemExit(main())
