"""`dicomnode serve`, `dicomnode studies`, `dicomnode study complete|rerun UID`."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from dicomnode.assemble import completeness
from dicomnode.assemble.studies import COLUMNS, list_studies
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

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the node in the foreground")
    add_config_option(parser)
    parser.set_defaults(func=_serve)

    parser = subparsers.add_parser("studies", help="list received studies and their state")
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

    return serve(settings_from(args))


def _studies(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        rows = list_studies(database)
        with database.transaction() as session:
            summaries = summarise(session, max_attempts=settings.results.max_attempts)
    if args.json:
        print_json([{**row.as_json(), "delivery": _summary_json(summaries.get(row.study_uid))}
                    for row in rows])
    else:
        print_table(
            (*COLUMNS, "delivery"),
            [
                (
                    row.study_uid, row.patient_id, row.calling_ae, row.instances,
                    ",".join(row.modalities), row.state,
                    _short(row.created_at), _short(row.updated_at), _short(row.completed_at),
                    _summary_cell(summaries.get(row.study_uid)),
                )
                for row in rows
            ],
        )
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
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")
