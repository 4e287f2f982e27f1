"""`dicomnode purge [--dry-run] [--json]`: apply the retention settings now, or show what
would go."""

from __future__ import annotations

import argparse
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
from dicomnode.retention import Purger
from dicomnode.retention.policy import Candidate


def register(subparsers: Any) -> None:
    purge = subparsers.add_parser(
        "purge", help="delete received files and results the retention settings let go")
    purge.add_argument("--dry-run", action="store_true",
                       help="only list what would be purged")
    add_config_option(purge)
    add_json_option(purge)
    purge.set_defaults(func=run_purge)


def _row(c: Candidate) -> dict[str, Any]:
    return {"study_uid": c.study_uid, "state": c.state, "what": c.kind, "reason": c.reason,
            "last_instance_at": c.last_instance_at.isoformat(), "files": c.files,
            "mb": round(c.bytes / (1024 * 1024), 1)}


def run_purge(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        purger = Purger(settings, database, actor=cli_actor())
        candidates = purger.plan() if args.dry_run else purger.run().purged
    rows = [_row(c) for c in candidates]
    if args.json:
        print_json({"dry_run": bool(args.dry_run), "purged" if not args.dry_run
                    else "would_purge": rows})
        return 0
    if not settings.retention.enabled:
        print("retention is off (no retention settings): nothing is purged")
    print_table(["STUDY", "STATE", "WHAT", "REASON", "LAST INSTANCE", "FILES", "MB"],
                [[r["study_uid"], r["state"], r["what"], r["reason"], r["last_instance_at"],
                  str(r["files"]), str(r["mb"])] for r in rows])
    verb = "would be purged" if args.dry_run else "purged"
    print(f"{len(rows)} purge(s) {verb}")
    return 0
