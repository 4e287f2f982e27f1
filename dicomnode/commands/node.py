"""`dicomnode serve`, `dicomnode studies`, `dicomnode study complete|rerun UID`."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from dicomnode.assemble import completeness
from dicomnode.assemble.studies import COLUMNS, StudyFilter, list_studies
from dicomnode.commands.common import (
    add_config_option,
    add_json_option,
    cli_actor,
    print_json,
    print_table,
    settings_from,
)
from dicomnode.db import opened_database
from dicomnode.results.summary import DeliverySummary, summarise
from dicomnode.timefmt import iso_utc

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the node in the foreground")
    add_config_option(parser)
    parser.set_defaults(func=_serve)

    parser = subparsers.add_parser(
        "studies", help="list received studies (newest first), filtered and paged")
    parser.add_argument("--state", metavar="STATE", help="only studies in this state")
    parser.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD",
                        help="study date on or after")
    parser.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD",
                        help="study date on or before")
    parser.add_argument("--patient", dest="patient_id", metavar="ID", help="this patient ID")
    parser.add_argument("--preset", metavar="ID", help="the latest job ran this preset")
    parser.add_argument("--limit", type=int, default=100, help="rows per page (default 100)")
    parser.add_argument("--offset", type=int, default=0, help="rows to skip (paging)")
    add_config_option(parser)
    add_json_option(parser)
    parser.set_defaults(func=_studies)

    study = subparsers.add_parser("study", help="act on one study")
    actions = study.add_subparsers(dest="action", required=True, metavar="ACTION")
    parser = actions.add_parser(
        "complete", help="force a study complete (a running node picks it up at its next sweep)"
    )
    parser.add_argument("study_uid", metavar="UID", help="Study Instance UID")
    add_config_option(parser)
    parser.set_defaults(func=_study_complete)

    parser = actions.add_parser(
        "rerun", help="run a finished (or failed) study again, with its preset, another one, "
        "or models switched on/off; the new results supersede the old")
    parser.add_argument("study_uid", metavar="UID", help="Study Instance UID")
    parser.add_argument("--preset", metavar="ID",
                        help="preset to run (default: the study's latest job's preset)")
    parser.add_argument("--with", dest="with_models", action="append", default=[],
                        metavar="MODEL[@VERSION]", help="switch a model on (repeatable)")
    parser.add_argument("--without", action="append", default=[], metavar="MODEL",
                        help="switch a model off (repeatable)")
    add_config_option(parser)
    add_json_option(parser)
    parser.set_defaults(func=_study_rerun)


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the network stack is not needed by the other commands' start-up.
    from dicomnode.app import serve

    return serve(settings_from(args, service=True))


def _studies(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    where = StudyFilter(  # a bad date: FilterError, exit 2
        state=args.state, date_from=StudyFilter.parse_date(args.date_from, "--from"),
        date_to=StudyFilter.parse_date(args.date_to, "--to"),
        patient_id=args.patient_id, preset=args.preset)
    with opened_database(settings.database.url) as database:
        page = list_studies(database, where, limit=args.limit, offset=args.offset)
        with database.transaction() as session:
            summaries = summarise(session, [r.study_uid for r in page.rows],
                                  max_attempts=settings.results.max_attempts)
    if args.json:
        print_json([{**row.as_json(), "delivery": _summary_json(summaries.get(row.study_uid))}
                    for row in page.rows])
        return 0
    print_table(
        (*COLUMNS, "delivery"),
        [
            (
                row.study_uid, row.patient_id, row.study_date, row.station_name,
                row.calling_ae, row.instances, ",".join(row.modalities), row.preset, row.state,
                _short(row.created_at), _short(row.updated_at), _short(row.completed_at),
                _summary_cell(summaries.get(row.study_uid)),
            )
            for row in page.rows
        ],
    )
    shown = f"{page.offset + 1}-{page.offset + len(page.rows)}" if page.rows else "none"
    print(f"studies {shown} of {page.total} (times UTC)")
    return 0


def _summary_json(summary: DeliverySummary | None) -> dict[str, Any] | None:
    return None if summary is None else summary.as_json()


def _summary_cell(summary: DeliverySummary | None) -> str:
    """The delivery word, with the sent/total count once anything is queued."""
    if summary is None or summary.state is None:
        return "-"
    total = summary.sent + summary.pending + summary.failed
    return f"{summary.state} {summary.sent}/{total}" if total else summary.state


def _study_complete(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        changed = completeness.force_complete(
            database, args.study_uid, actor=cli_actor()
        )
    if changed:
        print(f"study {args.study_uid} marked complete")
    else:
        print(f"study {args.study_uid} was already complete (nothing changed)")
    return 0


def _study_rerun(args: argparse.Namespace) -> int:
    # Imported here: the catalog (ONNX checks) is only needed by this command.
    from dicomnode.jobs.rerun import rerun_study
    from dicomnode.routing.catalog import load_catalog

    settings = settings_from(args)
    catalog = load_catalog(settings)
    with opened_database(settings.database.url) as database:
        rerun = rerun_study(
            database, settings.storage.path, catalog.registry, catalog.presets,
            settings.modality_defaults, args.study_uid, actor=cli_actor(),
            preset=args.preset, with_models=args.with_models, without=args.without,
        )
    if args.json:
        print_json(rerun.as_json())
    else:
        models = ", ".join(f"{m}@{v}" for m, v in rerun.graph.models.items())
        print(f"study {rerun.study_uid}: job {rerun.job_id} queued (preset {rerun.preset}: "
              f"{models}); a running node runs it")
    return 0


def _short(value: Any) -> str:
    return iso_utc(value) or ""
