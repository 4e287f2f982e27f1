"""`dicomnode results [list] [--state S] [--json]`, `dicomnode results retry JOB_ID...|
--all-failed`: the encoding of finished jobs' results, and queueing failed ones again."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dicomnode.commands.common import (
    add_config_option,
    add_json_option,
    cli_actor,
    print_json,
    print_table,
    settings_from,
)
from dicomnode.db import opened_database
from dicomnode.db.models import ResultSetState
from dicomnode.results import bookkeeping


def register(subparsers: Any) -> None:
    results = subparsers.add_parser(
        "results", help="result encoding of finished jobs (newest first); retry failed ones")
    _list_options(results)
    actions = results.add_subparsers(dest="results_command", metavar="ACTION")
    listing = actions.add_parser("list", help="result sets (newest job first)")
    _list_options(listing)
    retry = actions.add_parser(
        "retry", help="encode failed result sets again (a running node picks them up)")
    retry.add_argument("job_ids", type=int, nargs="*", metavar="JOB_ID")
    retry.add_argument("--all-failed", action="store_true", help="every failed result set")
    add_config_option(retry)
    retry.set_defaults(func=run_retry)


def _list_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: `results --state failed list` and `results list --state failed` both work.
    parser.add_argument("--state", choices=ResultSetState.ALL, default=argparse.SUPPRESS,
                        help="only this state")
    parser.add_argument("--limit", type=int, default=argparse.SUPPRESS,
                        help="at most this many (default 200)")
    add_config_option(parser)
    add_json_option(parser)
    parser.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        rows = bookkeeping.list_result_sets(
            database, getattr(args, "state", None), getattr(args, "limit", 200))
    if args.json:
        print_json(rows)
        return 0
    print_table(
        ["JOB", "STUDY", "STATE", "ATTEMPTS", "LAST ERROR", "UPDATED"],
        [[r["job_id"], r["study_uid"], r["state"], r["attempts"], r["last_error"],
          r["updated_at"] or ""] for r in rows],
    )
    return 0


def run_retry(args: argparse.Namespace) -> int:
    if bool(args.job_ids) == bool(args.all_failed):
        print("dicomnode: error: name job IDs or --all-failed (not both)", file=sys.stderr)
        return 2
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        ids = bookkeeping.retry(database, args.job_ids, all_failed=args.all_failed,
                                actor=cli_actor())
    print(f"{len(ids)} result set(s) queued for encoding again: "
          f"{', '.join(f'job {i}' for i in ids) or '-'}")
    return 0
