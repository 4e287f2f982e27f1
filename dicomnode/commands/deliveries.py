"""`dicomnode deliveries [--state S] [--json]`, `dicomnode deliveries retry ID...|--all-failed`,
`dicomnode destinations check`: the outbox and the destinations it sends to."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dicomnode.commands.common import (
    add_config_option,
    add_json_option,
    print_json,
    print_table,
    settings_from,
)
from dicomnode.db import opened_database
from dicomnode.db.models import DeliveryState
from dicomnode.dispatch import outbox
from dicomnode.dispatch.check import check_destination


def register(subparsers: Any) -> None:
    deliveries = subparsers.add_parser(
        "deliveries", help="result objects queued for destinations (newest first)")
    deliveries.add_argument("--state", choices=DeliveryState.ALL, help="only this state")
    deliveries.add_argument("--limit", type=int, default=200, help="at most this many")
    add_config_option(deliveries)
    add_json_option(deliveries)
    deliveries.set_defaults(func=run_list)
    actions = deliveries.add_subparsers(dest="deliveries_command", metavar="ACTION")
    retry = actions.add_parser("retry", help="send failed deliveries again")
    retry.add_argument("ids", type=int, nargs="*", metavar="ID")
    retry.add_argument("--all-failed", action="store_true", help="every failed delivery")
    add_config_option(retry)
    retry.set_defaults(func=run_retry)

    destinations = subparsers.add_parser("destinations", help="configured destinations")
    dest_actions = destinations.add_subparsers(
        dest="destinations_command", required=True, metavar="ACTION")
    check = dest_actions.add_parser("check", help="C-ECHO each destination")
    add_config_option(check)
    add_json_option(check)
    check.set_defaults(func=run_check)


def run_list(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        rows = outbox.list_deliveries(database, args.state, args.limit)
    if args.json:
        print_json(rows)
        return 0
    print_table(
        ["ID", "STATE", "DESTINATION", "TRIES", "NEXT", "SOP INSTANCE", "LAST ERROR"],
        [[r["id"], r["state"], r["destination"], r["attempts"],
          r["next_attempt_at"] if r["state"] == DeliveryState.PENDING else r["sent_at"],
          r["sop_instance_uid"], r["last_error"]] for r in rows],
    )
    return 0


def run_retry(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all_failed):
        print("dicomnode: error: name delivery IDs or --all-failed (not both)",
              file=sys.stderr)
        return 2
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        ids = outbox.retry(database, args.ids, all_failed=args.all_failed)
    print(f"{len(ids)} delivery(ies) queued again: {', '.join(map(str, ids)) or '-'}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    calling = settings.dispatch.calling_ae_title or settings.node.ae_title
    results = [
        check_destination(name, destination, calling_ae=calling, settings=settings.dispatch)
        for name, destination in sorted(settings.destinations.items())
    ]
    # A destination that answers again gets its failed deliveries sent at once (a running
    # node picks them up at its next poll).
    with opened_database(settings.database.url) as database:
        for result in results:
            if result.ok:
                outbox.due_now(database, result.destination,
                               reason="it answered `dicomnode destinations check`")
    if args.json:
        print_json([r.__dict__ for r in results])
    else:
        if not results:
            print("no destinations configured")
        print_table(["DESTINATION", "OK", "SECONDS", "DETAIL"],
                    [[r.destination, "yes" if r.ok else "NO", f"{r.seconds:.2f}", r.detail]
                     for r in results])
    return 0 if all(r.ok for r in results) else 1
