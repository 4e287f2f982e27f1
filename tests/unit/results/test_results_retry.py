"""`dicomnode results list|retry` and the per-study delivery summary, with the real pipeline,
a real executor over tiny fixture models, and the database (SQLite and PostgreSQL).

Encoding fails for a real reason (a source image file is gone), exhausts its attempts
(`results.max_attempts` from the settings file), is listed, the operator restores the file and
retries (CLI, or the API as an administrator), and the pipeline's next pass encodes it and
queues the outbox rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from dicomnode.cli import main
from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Delivery, Instance, ResultSet
from dicomnode.dispatch import outbox
from dicomnode.jobs import ProcessingService, queue
from dicomnode.registry import load_registry
from dicomnode.results.pipeline import ResultsPipeline
from dicomnode.routing import load_presets
from dicomnode.settings import Settings, load_settings
from dicomnode.web import auth
from dicomnode.web.app import create_app
from dicomnode.web.state import CatalogHolder, WebState
from tests.support.executor_fixtures import add_study, write_diamond
from tests.unit.results.test_pipeline import PRESET

MAX_ATTEMPTS = 2  # settings results.max_attempts


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[tuple[Path, Settings, Database]]:
    """A config file (for the CLI) and the same settings and database (for the node)."""
    storage = tmp_path / "storage"
    storage.mkdir()
    write_diamond(tmp_path / "registry", slow_repeats=1)
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "screening.yaml").write_text(yaml.safe_dump(PRESET), "utf-8")
    config = tmp_path / "dicomnode.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"path": str(storage), "min_free_mb": 0},
        "database": {"url": db_url},
        "registry": {"path": str(tmp_path / "registry")},
        "presets": {"path": str(tmp_path / "presets")},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}},
        "inference": {"workers": 0, "lease_seconds": 30, "poll_seconds": 0.2},
        "results": {"max_attempts": MAX_ATTEMPTS, "retry_seconds": 60},
    }), "utf-8")
    settings = load_settings(config)
    database = open_database(db_url)
    try:
        yield config, settings, database
    finally:
        database.dispose()


def _parts(settings: Settings, database: Database) -> tuple[ProcessingService, ResultsPipeline]:
    registry = load_registry(settings.registry.path)
    presets = load_presets(settings.presets.path, registry=registry,
                           destinations=set(settings.destinations))
    assert not presets.problems, presets.problems
    # The attempt limit comes from the settings; only the wait is cut short for the test.
    return (ProcessingService(settings, database, registry, presets),
            ResultsPipeline(settings, database, registry, presets, retry_seconds=0))


def _finished_job(settings: Settings, database: Database, service: ProcessingService
                  ) -> tuple[str, int]:
    uid, _ = add_study(database, settings.storage.path, [200, 180])
    service.on_study_complete(uid)
    job_id = service.run_once()
    assert job_id is not None
    return uid, job_id


def _cli(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def _studies(capsys: pytest.CaptureFixture[str], config: Path) -> dict[str, Any]:
    code, out, _ = _cli(capsys, config, "studies", "--json")
    assert code == 0
    return {row["study_uid"]: row["delivery"] for row in json.loads(out)}


def _deliveries(database: Database) -> int:
    with database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Delivery)) or 0)


def test_failed_encoding_is_listed_retried_and_encoded(
    env: tuple[Path, Settings, Database], capsys: pytest.CaptureFixture[str],
) -> None:
    config, settings, database = env
    service, pipeline = _parts(settings, database)
    uid, job_id = _finished_job(settings, database, service)
    assert _studies(capsys, config)[uid]["state"] == "waiting"  # done, not yet encoded

    # A source image disappears (a real cause: e.g. a storage volume not mounted).
    with database.transaction() as session:
        first = session.scalars(select(Instance.path).order_by(Instance.id)).first()
    assert first is not None
    source = settings.storage.path / first
    moved = source.with_suffix(".away")
    source.rename(moved)
    assert pipeline.max_attempts == MAX_ATTEMPTS
    for attempt in range(1, MAX_ATTEMPTS + 1):
        [outcome] = pipeline.run_once()
        assert outcome.state == "failed" and "FileNotFoundError" in str(outcome.error)
        summary = _studies(capsys, config)[uid]
        assert (summary["results"], summary["attempts"], summary["max_attempts"]) == (
            "failed", attempt, MAX_ATTEMPTS)
        assert "FileNotFoundError" in summary["last_error"]
        # The pipeline will try again on its own until the attempts are used up.
        assert summary["state"] == ("failed" if attempt == MAX_ATTEMPTS else "waiting")
    assert pipeline.run_once() == []  # attempts exhausted: the pipeline gives up

    code, out, _ = _cli(capsys, config, "results", "list", "--state", "failed", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert (row["job_id"], row["study_uid"], row["state"], row["attempts"]) == (
        job_id, uid, "failed", MAX_ATTEMPTS)
    assert "FileNotFoundError" in row["last_error"] and row["updated_at"]
    code, out, _ = _cli(capsys, config, "results", "--state", "failed")
    assert code == 0 and "FileNotFoundError" in out and str(job_id) in out
    assert "LAST ERROR" in out.splitlines()[0]
    summary = _studies(capsys, config)[uid]
    assert (summary["state"], summary["results"], summary["job_id"]) == (
        "failed", "failed", job_id)
    code, out, _ = _cli(capsys, config, "studies")
    assert "delivery" in out.splitlines()[0] and "failed" in out.splitlines()[1]

    # The operator fixes the cause and retries; the node's next pass encodes it.
    moved.rename(source)
    code, out, _ = _cli(capsys, config, "results", "retry", str(job_id))
    assert code == 0 and f"job {job_id}" in out and "1 result set(s)" in out
    with database.transaction() as session:
        result_set = session.scalars(select(ResultSet)).one()
        assert (result_set.state, result_set.attempts) == ("pending", 0)
        [event] = session.scalars(
            select(AuditEvent).where(AuditEvent.kind == "results-retry")).all()
        assert event.actor and event.actor.startswith("cli:")
        assert event.study_uid == uid and f"job {job_id}" in str(event.detail)
        assert "FileNotFoundError" in str(event.detail)
    code, out, _ = _cli(capsys, config, "results", "list", "--state", "failed", "--json")
    assert json.loads(out) == []
    assert _studies(capsys, config)[uid]["state"] == "waiting"

    [outcome] = pipeline.run_once()
    assert outcome.state == "encoded" and outcome.deliveries == _deliveries(database) > 0
    with database.transaction() as session:
        result_set = session.scalars(select(ResultSet)).one()
        assert (result_set.state, result_set.attempts, result_set.error) == (
            "encoded", 1, None)
    summary = _studies(capsys, config)[uid]
    assert (summary["state"], summary["results"], summary["pending"], summary["sent"]) == (
        "sending", "encoded", outcome.deliveries, 0)

    # Nothing failed any more: a retry is refused, and changes nothing.
    code, _, err = _cli(capsys, config, "results", "retry", str(job_id))
    assert code == 2 and f"job {job_id}'s results are already encoded" in err
    assert "no failed result set to retry" in err
    code, out, _ = _cli(capsys, config, "results", "retry", "--all-failed")
    assert code == 0 and "0 result set(s)" in out


def test_retry_refuses_jobs_without_a_failed_result_set(
    env: tuple[Path, Settings, Database], capsys: pytest.CaptureFixture[str],
) -> None:
    config, settings, database = env
    service, pipeline = _parts(settings, database)
    _, done = _finished_job(settings, database, service)
    # A second study's job is queued and never ran.
    uid, _ = add_study(database, settings.storage.path, [200])
    service.on_study_complete(uid)
    [queued] = [row["id"] for row in _jobs(capsys, config) if row["state"] == "queued"]
    assert _studies(capsys, config)[uid]["state"] == "waiting"

    code, _, err = _cli(capsys, config, "results", "retry", str(done))
    assert code == 2 and f"job {done}'s results are waiting to be encoded" in err
    code, _, err = _cli(capsys, config, "results", "retry", str(queued))
    assert code == 2 and f"job {queued} is queued with no outputs to encode" in err
    code, _, err = _cli(capsys, config, "results", "retry", "9999")
    assert code == 2 and "no job 9999" in err
    code, _, err = _cli(capsys, config, "results", "retry")
    assert code == 2 and "name job IDs or --all-failed" in err
    with database.transaction() as session:
        assert session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "results-retry")).all() == []
    # Listed as pending work, not failed.
    code, out, _ = _cli(capsys, config, "results", "list", "--json")
    assert [(r["job_id"], r["state"]) for r in json.loads(out)] == [(done, "pending")]
    [outcome] = pipeline.run_once()
    assert outcome.state == "encoded"


def _jobs(capsys: pytest.CaptureFixture[str], config: Path) -> list[dict[str, Any]]:
    code, out, _ = _cli(capsys, config, "jobs", "--json")
    assert code == 0
    rows = json.loads(out)
    assert isinstance(rows, list)
    return rows


def test_all_failed_retries_every_failed_set_and_a_failed_delivery_shows(
    env: tuple[Path, Settings, Database], capsys: pytest.CaptureFixture[str],
) -> None:
    config, settings, database = env
    service, pipeline = _parts(settings, database)
    uid, job_id = _finished_job(settings, database, service)
    index = settings.storage.path / queue.job_detail(database, job_id)["output_path"]
    index = index / "index.json"
    text = index.read_text()
    index.write_text("{ not json")  # the job's stored outputs are damaged
    for _ in range(MAX_ATTEMPTS):
        assert [o.state for o in pipeline.run_once()] == ["failed"]
    index.write_text(text)
    code, out, _ = _cli(capsys, config, "results", "retry", "--all-failed")
    assert code == 0 and f"job {job_id}" in out
    assert [o.state for o in pipeline.run_once()] == ["encoded"]

    # One delivery fails for good (as the dispatcher records it): the study shows failed.
    claimed = outbox.claim_due(database, settings.dispatch, "test")
    assert claimed
    for item in claimed[1:]:
        outbox.mark_sent(database, item.id)
    settings_one = settings.dispatch.model_copy(update={"max_attempts": 1})
    assert outbox.mark_attempt_failed(database, settings_one, claimed[0].id,
                                      "association rejected") == "failed"
    summary = _studies(capsys, config)[uid]
    assert (summary["state"], summary["failed"], summary["sent"], summary["pending"]) == (
        "failed", 1, len(claimed) - 1, 0)


def _bearer(database: Database, name: str, role: str) -> dict[str, str]:
    auth.add_user(database, name, role, "a-password-of-ten")
    return {"Authorization": f"Bearer {auth.issue_token(database, name)}"}


def test_admin_retries_through_the_api_and_the_next_pass_encodes(
    env: tuple[Path, Settings, Database],
) -> None:
    _, settings, database = env
    service, pipeline = _parts(settings, database)
    uid, job_id = _finished_job(settings, database, service)
    index = settings.storage.path / queue.job_detail(database, job_id)["output_path"]
    index = index / "index.json"
    text = index.read_text()
    index.write_text("{ not json")
    for _ in range(MAX_ATTEMPTS):
        assert [o.state for o in pipeline.run_once()] == ["failed"]
    admin = _bearer(database, "alice", "admin")
    viewer = _bearer(database, "victor", "viewer")
    retry = f"/api/jobs/{job_id}/results/retry"
    with TestClient(create_app(WebState(settings, database, CatalogHolder(settings)))) as client:
        delivery = client.get(f"/api/studies/{uid}", headers=viewer).json()["delivery"]
        assert (delivery["state"], delivery["results"], delivery["attempts"]) == (
            "failed", "failed", MAX_ATTEMPTS)
        assert delivery["last_error"]
        refused = client.post(retry, headers=viewer)
        assert refused.status_code == 403 and "admin" in refused.json()["detail"]
        unknown = client.post("/api/jobs/9999/results/retry", headers=admin)
        assert unknown.status_code == 404 and unknown.json()["detail"] == "no job 9999"

        index.write_text(text)  # the operator fixes the cause, then retries
        retried = client.post(retry, headers=admin)
        assert retried.status_code == 200, retried.text
        body = retried.json()
        assert (body["job_id"], body["study_uid"], body["state"], body["attempts"]) == (
            job_id, uid, "pending", 0)
        with database.transaction() as session:
            [event] = session.scalars(
                select(AuditEvent).where(AuditEvent.kind == "results-retry")).all()
            assert (event.actor, event.study_uid) == ("alice", uid)
            assert f"job {job_id}: encoding queued again after {MAX_ATTEMPTS}" in str(
                event.detail)
        delivery = client.get(f"/api/studies/{uid}", headers=viewer).json()["delivery"]
        assert (delivery["state"], delivery["results"], delivery["attempts"]) == (
            "waiting", "pending", 0)

        [outcome] = pipeline.run_once()
        assert outcome.state == "encoded" and outcome.deliveries > 0
        delivery = client.get(f"/api/studies/{uid}", headers=viewer).json()["delivery"]
        assert (delivery["state"], delivery["results"]) == ("sending", "encoded")

        # Nothing failed any more: refused with bookkeeping's reason, nothing changes.
        again = client.post(retry, headers=admin)
        assert again.status_code == 409
        assert again.json()["detail"] == (
            f"job {job_id}'s results are already encoded; it has no failed result set to retry")
    with database.transaction() as session:
        assert len(session.scalars(
            select(AuditEvent).where(AuditEvent.kind == "results-retry")).all()) == 1
