"""`dicomnode jobs`, `dicomnode job show ID`, `dicomnode health`: the processing queue."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from dicomnode.commands.common import (
    add_config_option,
    add_json_option,
    print_json,
    print_table,
    settings_from,
)
from dicomnode.db import open_database, opened_database
from dicomnode.errors import InferenceError
from dicomnode.identity import claim_identity
from dicomnode.inference.sessions import SessionPool
from dicomnode.jobs import queue
from dicomnode.jobs.health import health_report
from dicomnode.registry.loader import load_registry

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    jobs = subparsers.add_parser("jobs", help="list processing jobs (newest first)")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    add_config_option(jobs)
    add_json_option(jobs)
    jobs.set_defaults(func=run_jobs)

    job = subparsers.add_parser("job", help="one processing job")
    job_commands = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    show = job_commands.add_parser("show", help="a job's graph, model runs and outcome")
    show.add_argument("job_id", type=int, metavar="ID")
    add_config_option(show)
    add_json_option(show)
    show.set_defaults(func=run_show)

    worker = subparsers.add_parser(
        "worker",
        help="run job workers only (no DICOM listener), e.g. extra nodes sharing PostgreSQL",
    )
    add_config_option(worker)
    worker.set_defaults(func=run_worker)

    health = subparsers.add_parser(
        "health", help="database, execution providers (available and in use), queue depth"
    )
    health.add_argument(
        "--probe", action="store_true",
        help="create a tiny session per execution provider (is a device there?) and load "
             "every model's session, to show the provider each really gets here",
    )
    add_config_option(health)
    add_json_option(health)
    health.set_defaults(func=run_health)


def run_jobs(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        rows = queue.list_jobs(database, args.limit)
    if args.json:
        print_json(rows)
        return 0
    print_table(
        ["ID", "STATE", "STUDY", "PRESET", "REASON", "TRIES", "CREATED", "FINISHED"],
        [[r["id"], r["state"], r["study_uid"], r["preset"], r["reason"], r["attempts"],
          r["created_at"], r["finished_at"]] for r in rows],
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        detail = queue.job_detail(database, args.job_id)
    if args.json:
        print_json(detail)
        return 0
    print(f"job {detail['id']}: {detail['state']} (study {detail['study_uid']}, "
          f"preset {detail['preset']}, {detail['reason']}, attempts {detail['attempts']})")
    stages = detail["graph"].get("stages", [])
    for index, stage in enumerate(stages, start=1):
        print(f"  stage {index}: " + ", ".join(
            f"{m}@{detail['graph']['models'].get(m)}" for m in stage))
    outcome = detail.get("outcome") or {}
    for model, why in sorted((outcome.get("problems") or {}).items()):
        print(f"  problem: {model}: {why}")
    if detail["output_path"]:
        print(f"  outputs: {detail['output_path']} (under the storage path)")
    if detail["runs"]:
        print_table(
            ["MODEL", "VERSION", "STATUS", "PROVIDER", "IMAGES", "BATCH", "MS", "NOT ANALYSED",
             "ERROR"],
            [[r["model_id"], r["version"], r["status"], r["provider"], r["images"],
              r["batch_size"], None if r["duration_ms"] is None else f"{r['duration_ms']:.1f}",
              len(r.get("not_analysed") or r["skipped"]) or None, r["error"]]
             for r in detail["runs"]],
        )
    _print_not_analysed(detail.get("not_analysed") or [])
    return 0


def _print_not_analysed(rows: list[dict[str, Any]]) -> None:
    """One line per (image, model) not analysed: the coded reason and its detail."""
    if not rows:
        return
    print("  not analysed:")
    print_table(
        ["  IMAGE", "MODEL", "REASON", "CODE", "DETAIL"],
        [[f"  {r['sop_instance_uid']}", f"{r['model_id']}@{r['version']}", r["meaning"],
          f"{r['scheme']} {r['code']}", r["detail"]] for r in rows],
    )


def run_health(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    sessions = SessionPool.for_settings(settings.inference)
    with opened_database(settings.database.url) as database:
        if args.probe:
            registry = load_registry(settings.registry.path)
            failures: dict[str, str] = {}
            for entry in registry.latest_entries():
                try:
                    sessions.get(entry)
                except InferenceError as exc:
                    failures[entry.key] = str(exc)
        report = health_report(database, sessions, probe=args.probe)
        if args.probe:
            report["load_failures"] = failures
    if args.json:
        print_json(report)
        return 0 if report["ok"] else 1
    db = report["database"]
    print(f"database: {'ok' if db['ok'] else 'UNREACHABLE: ' + db.get('error', '')}")
    print(f"onnxruntime {report['onnxruntime']}")
    for status in report["execution"]["providers"]:
        print(f"  {status['name']}: in package, device {status['device']}"
              + (f" ({status['detail']})" if status["detail"] else ""))
    if not report["execution"]["probed"]:
        print("  (run with --probe to find out whether a device answers)")
    print(f"requested: {', '.join(report['providers_requested'] or [])}")
    for item in report["sessions"]:
        print(f"  {item['model']}: a session here runs on {item['provider']}")
    for model, error in sorted((report.get("load_failures") or {}).items()):
        print(f"  {model}: CANNOT LOAD: {error}")
    remote = report.get("remote")
    if remote is not None:
        print(f"remote inference {remote['url']}: "
              f"{'ready' if remote['ready'] else 'NOT READY: ' + str(remote['error'])}")
        for model, ready in sorted(remote["models"].items()):
            print(f"  {model}: {'ready' if ready['ready'] else 'NOT READY: ' + ready['error']}")
    for model, provider in sorted((report.get("last_run_providers") or {}).items()):
        print(f"  {model}: last run on {provider}")
    run = report["execution"].get("last_run")
    print(f"in use: {report['execution'].get('in_use') or 'no model has run yet'}"
          + (f" (last run: job {run['job_id']})" if run else ""))
    if "queue" in report:
        depth = report["queue"]
        print(f"queue: {depth.get('queued', 0)} queued, {depth.get('running', 0)} running")
    return 0 if report["ok"] else 1


def run_worker(args: argparse.Namespace) -> int:
    """Plan and run jobs until SIGINT/SIGTERM (the same service `serve` runs)."""
    import signal

    from dicomnode.jobs.service import ProcessingService
    from dicomnode.routing.catalog import CatalogHolder
    from dicomnode.routing.watcher import CatalogWatcher

    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before any thread starts, so only sigwait below sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    settings = settings_from(args, service=True)
    database = open_database(settings.database.url)
    database.wakeups.listen()  # jobs queued by the serving node wake this one (PostgreSQL)
    holder = CatalogHolder(settings)
    catalog = holder.catalog
    if settings.inference.workers < 1:
        settings = settings.model_copy(update={
            "inference": settings.inference.model_copy(update={"workers": 1})
        })
    identity = claim_identity(settings.storage.path, "worker")
    service = ProcessingService(settings, database, catalog.registry, catalog.presets,
                                node_id=identity.name if identity.resumable else None)
    service.start()
    # A worker node follows preset and registry changes on disk as `serve` does.
    holder.subscribe(service.use_catalog)
    watcher = CatalogWatcher(holder)
    watcher.start()
    try:
        received = signal.sigwait(stop_signals)
        logger.info("received %s; stopping workers", signal.Signals(received).name)
    finally:
        watcher.stop()
        service.stop(settings.node.shutdown_grace_seconds)
        database.dispose()
        identity.release()
    return 0
