"""Jobs: a completed study is routed, queued, claimed with a lease, run once, recorded.

Runs on SQLite and PostgreSQL (`db_url`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Job, ModelRun, Study
from dicomnode.inference.outputs import read_index
from dicomnode.jobs import ProcessingService, queue
from dicomnode.registry import load_registry
from dicomnode.routing import load_presets
from dicomnode.settings import Settings
from tests.support.executor_fixtures import add_study, mark_late, write_diamond, write_preset


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[tuple[Settings, Database, Path]]:
    storage = tmp_path / "storage"
    storage.mkdir()
    write_diamond(tmp_path / "registry", slow_repeats=1)
    write_preset(tmp_path / "presets", "screening", ["gated-fraction", "total"])
    settings = Settings.model_validate({
        "storage": {"path": storage},
        "database": {"url": db_url},
        "registry": {"path": tmp_path / "registry"},
        "presets": {"path": tmp_path / "presets"},
        "inference": {"workers": 0, "lease_seconds": 30, "poll_seconds": 0.2},
    })
    database = open_database(db_url)
    try:
        yield settings, database, storage
    finally:
        database.dispose()


def service_for(settings: Settings, database: Database) -> ProcessingService:
    registry = load_registry(settings.registry.path)
    presets = load_presets(settings.presets.path, registry=registry, destinations=set())
    assert not presets.problems, presets.problems
    return ProcessingService(settings, database, registry, presets)


def study_state(database: Database, uid: str) -> str:
    with database.transaction() as session:
        return session.scalars(select(Study.state).where(Study.study_uid == uid)).one()


def test_completed_study_runs_to_stored_outputs(env: tuple[Settings, Database, Path]) -> None:
    settings, database, storage = env
    service = service_for(settings, database)
    uid, sops = add_study(database, storage, [200, 0, 200])
    service.on_study_complete(uid)
    service.on_study_complete(uid)  # a repeated notification makes no second job
    assert study_state(database, uid) == "processing"
    assert [j["state"] for j in queue.list_jobs(database)] == ["queued"]
    job_id = service.run_once()
    assert job_id is not None
    assert service.run_once() is None
    detail = queue.job_detail(database, job_id)
    assert detail["state"] == "done" and study_state(database, uid) == "done"
    assert detail["graph"]["models"] == {
        "gated-fraction": "1.0.0", "gated-seg": "1.0.0", "quality": "1.0.0", "seg": "1.0.0",
        "slow-b": "1.0.0", "slow-c": "1.0.0", "total": "1.0.0",
    }
    assert detail["preset"] == "screening"
    runs = {r["model_id"]: r for r in detail["runs"]}
    assert set(runs) == set(detail["graph"]["models"])
    for run in runs.values():
        assert run["provider"] == "CPUExecutionProvider"  # no GPU on this machine
        assert run["status"] == "ok"
    assert runs["gated-seg"]["images"] == 2
    assert set(runs["gated-seg"]["skipped"]) == {sops[1]}
    index = read_index(storage / detail["output_path"])
    assert index["job"] == job_id and index["images"] == sops
    assert (storage / detail["output_path"] / "total.npz").is_file()


def test_unrouted_study_is_recorded_with_reason(env: tuple[Settings, Database, Path]) -> None:
    settings, database, storage = env
    (settings.presets.path / "screening.yaml").unlink()
    write_preset(settings.presets.path, "elsewhere", ["seg"],
                 routing={"modality": ["OP"], "station_name": ["ELSEWHERE"]})
    service = service_for(settings, database)
    uid, _ = add_study(database, storage, [200])
    service.on_study_complete(uid)
    assert study_state(database, uid) == "not-routed"
    assert queue.list_jobs(database) == []
    with database.transaction() as session:
        detail = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.kind == "not-routed",
                                            AuditEvent.study_uid == uid)
        ).one()
    assert detail is not None
    assert "station_name" in detail and "no modality default" in detail


def test_dead_workers_job_is_completed_once_by_another(
    env: tuple[Settings, Database, Path]
) -> None:
    settings, database, storage = env
    service = service_for(settings, database)
    uid, _ = add_study(database, storage, [200, 200])
    assert service.plan_pending() != []  # the sweep finds the complete study
    dead = queue.claim(database, "dead-worker", lease_seconds=1.0)
    assert dead is not None
    assert service.run_once() is None  # leased: nobody else takes it
    time.sleep(1.2)
    job_id = service.run_once()  # lease lapsed: taken over and finished
    assert job_id == dead.id
    # The dead worker wakes up and tries to finish: its claim is gone.
    assert not queue.finish(database, dead, None, {"outcome": "failed"}, None)
    detail = queue.job_detail(database, job_id)
    assert detail["state"] == "done" and detail["attempts"] == 2
    with database.transaction() as session:
        runs = session.scalar(select(func.count()).select_from(ModelRun))
        jobs = session.scalar(select(func.count()).select_from(Job))
    assert (runs, jobs) == (len(detail["graph"]["models"]), 1)
    assert study_state(database, uid) == "done"
    folders = sorted(p.name for p in (storage / "jobs").iterdir())
    assert folders == [str(job_id)]


def test_late_instances_make_a_new_job(env: tuple[Settings, Database, Path]) -> None:
    settings, database, storage = env
    service = service_for(settings, database)
    uid, _ = add_study(database, storage, [200])
    service.on_study_complete(uid)
    first = service.run_once()
    # A late instance a moment ago: the quiet period (5 s) runs first, as more may follow.
    mark_late(database, uid, seconds_ago=1)
    assert service.plan_pending() == []
    mark_late(database, uid, seconds_ago=6)
    created = service.plan_pending()
    assert len(created) == 1 and created[0] != first
    assert queue.job_detail(database, created[0])["reason"] == "late-instances"
    assert service.run_once() == created[0]
    assert study_state(database, uid) == "done"
    second = queue.job_detail(database, created[0])
    assert read_index(storage / second["output_path"])["supersedes"] == first


def test_late_instances_wait_for_the_quiet_period_of_the_preset_that_ran(
        env: tuple[Settings, Database, Path]) -> None:
    settings, database, storage = env
    # "screening" asks for 30 s of quiet (the node's is 5 s); "other" sets none of its own.
    write_preset(settings.presets.path, "screening", ["gated-fraction", "total"],
                 completeness={"quiet_seconds": 30})
    write_preset(settings.presets.path, "other", ["total"],
                 routing={"modality": ["OP"], "calling_ae": ["NOBODY"]})
    service = service_for(settings, database)
    uids = [add_study(database, storage, [200])[0] for _ in range(2)]
    for uid in uids:
        service.on_study_complete(uid)
        service.run_once()
    with database.transaction() as session:  # the second study's latest job ran "other"
        session.execute(update(Job).where(Job.study_uid == uids[1]).values(preset="other"))
    for uid in uids:
        mark_late(database, uid, seconds_ago=10)

    def planned() -> list[str]:
        return [queue.job_detail(database, j)["study_uid"] for j in service.plan_pending()]

    assert planned() == [uids[1]]  # 10 s: past the node's 5 s, inside screening's 30 s
    mark_late(database, uids[0], seconds_ago=31)
    assert planned() == [uids[0]]


def test_concurrent_claims_never_share_a_job(env: tuple[Settings, Database, Path]) -> None:
    settings, database, storage = env
    service = service_for(settings, database)
    for _ in range(6):
        add_study(database, storage, [200])
    assert len(service.plan_pending()) == 6
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := queue.claim(database, name, 60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 6


def test_worker_threads_process_the_queue(env: tuple[Settings, Database, Path]) -> None:
    settings, database, storage = env
    settings = settings.model_copy(update={
        "inference": settings.inference.model_copy(update={"workers": 2})
    })
    service = service_for(settings, database)
    uids = [add_study(database, storage, [200])[0] for _ in range(3)]
    service.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(study_state(database, u) == "done" for u in uids):
                break
            time.sleep(0.2)
    finally:
        service.stop()
    assert [study_state(database, u) for u in uids] == ["done"] * 3
    outcomes = [json.loads(json.dumps(j)) for j in queue.list_jobs(database)]
    assert sorted(j["state"] for j in outcomes) == ["done"] * 3


def test_cli_lists_and_shows_jobs_and_health(
    env: tuple[Settings, Database, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from dicomnode.cli import main

    settings, database, storage = env
    service = service_for(settings, database)
    uid, _ = add_study(database, storage, [200])
    service.on_study_complete(uid)
    job_id = service.run_once()
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"path": str(storage)}, "database": {"url": settings.database.url},
        "registry": {"path": str(settings.registry.path)},
        "presets": {"path": str(settings.presets.path)}, "logging": {"level": "WARNING"},
    }))
    assert main(["jobs", "--config", str(config), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
    assert [(j["id"], j["state"]) for j in listed] == [(job_id, "done")]
    assert main(["job", "show", str(job_id), "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "CPUExecutionProvider" in text and "stage 1" in text
    assert main(["health", "--config", str(config), "--json", "--probe"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["database"]["ok"] and report["queue"] == {"done": 1}
    in_use = {s["model"]: s["provider"] for s in report["sessions"]}
    assert in_use["total@1.0.0"] == "CPUExecutionProvider"
    assert report["load_failures"] == {}
    assert "CUDAExecutionProvider" in report["providers_requested"]
    assert report["last_run_providers"]["total@1.0.0"] == "CPUExecutionProvider"
    _check_no_gpu_report(report["execution"], job_id)
    assert main(["health", "--config", str(config), "--probe"]) == 0
    text = capsys.readouterr().out
    assert "in use: CPUExecutionProvider" in text
    if "CUDAExecutionProvider" in report["providers_in_package"] and not _has_gpu():
        assert "CUDAExecutionProvider: in package, device not found" in text
    assert main(["job", "show", "999", "--config", str(config)]) == 2


def _has_gpu() -> bool:
    return Path("/dev/nvidia0").exists()


def _check_no_gpu_report(execution: dict[str, object], job_id: int | None) -> None:
    """On this machine (no GPU): CUDA is in the package, its device is not found, and the last
    run used the CPU. "In the package" must never read as "works here"."""
    statuses = {p["name"]: p for p in execution["providers"]}  # type: ignore[attr-defined]
    assert statuses["CPUExecutionProvider"]["device"] == "found"
    if "CUDAExecutionProvider" in statuses and not _has_gpu():
        cuda = statuses["CUDAExecutionProvider"]
        assert cuda["in_package"] is True and cuda["device"] == "not found", cuda
        assert "CPUExecutionProvider" in cuda["detail"]
    assert execution["in_use"] == "CPUExecutionProvider"
    assert execution["last_run"]["job_id"] == job_id  # type: ignore[index]


def test_a_failing_model_makes_the_job_and_study_partial(
    env: tuple[Settings, Database, Path]
) -> None:
    settings, database, storage = env
    write_preset(settings.presets.path, "screening", ["after-broken", "total"])
    service = service_for(settings, database)
    uid, _ = add_study(database, storage, [200, 200])
    service.on_study_complete(uid)
    job_id = service.run_once()
    assert job_id is not None
    detail = queue.job_detail(database, job_id)
    assert detail["state"] == "partial" and study_state(database, uid) == "partial"
    problems = detail["outcome"]["problems"]
    assert set(problems) == {"broken", "after-broken"}
    assert "broken" in problems["after-broken"]
    runs = {r["model_id"]: r["status"] for r in detail["runs"]}
    assert runs == {"seg": "ok", "slow-b": "ok", "slow-c": "ok", "total": "ok",
                    "broken": "failed", "after-broken": "skipped"}
    with database.transaction() as session:
        audit_detail = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.kind == "job-partial")
        ).one()
    assert audit_detail is not None and "broken" in audit_detail


def test_job_finished_hook_runs_once_after_commit(env: tuple[Settings, Database, Path]) -> None:
    settings, database, storage = env
    service = service_for(settings, database)
    seen: list[tuple[int, str]] = []
    service.on_job_finished.append(
        lambda job_id: seen.append((job_id, queue.job_detail(database, job_id)["state"]))
    )
    uid, _ = add_study(database, storage, [200])
    service.on_study_complete(uid)
    job_id = service.run_once()
    assert seen == [(job_id, "done")]


def _corrupt(storage: Path, database: Database, sop_uid: str, tag: int, vr: str,
             value: bytes) -> None:
    """Rewrite a stored instance with one element's raw bytes replaced (as a camera sent it)."""
    from dicomnode.db.models import Instance
    from tests.support.dicom_files import dataset_bytes
    from tests.support.mutate import put

    with database.transaction() as session:
        rel = session.scalars(select(Instance.path)
                              .where(Instance.sop_instance_uid == sop_uid)).one()
    path = storage / rel
    raw = path.read_bytes()
    body = dataset_bytes(path)
    path.write_bytes(raw[: len(raw) - len(body)] + put(body, tag, vr, value))


def test_an_unparseable_value_does_not_stop_planning(
    env: tuple[Settings, Database, Path]
) -> None:
    """A (0028,0106) US with 3 bytes, already stored, used to raise out of planning and stall
    every later study; the element is now left out of the routing facts."""
    settings, database, storage = env
    service = service_for(settings, database)
    bad, sops = add_study(database, storage, [200])
    _corrupt(storage, database, sops[0], 0x00280106, "US", b"\x01\x02\x03")
    good, _ = add_study(database, storage, [200])
    assert len(service.plan_pending()) == 2
    assert study_state(database, bad) == "processing"
    assert study_state(database, good) == "processing"
    while service.run_once() is not None:
        pass
    assert {j["study_uid"]: j["state"] for j in queue.list_jobs(database)} == {
        bad: "done", good: "done"}


def test_a_study_that_cannot_be_planned_fails_alone_without_patient_data(
    env: tuple[Settings, Database, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import struct

    from dicomnode.jobs import service as service_module
    from dicomnode.jobs.planning import plan_study as real

    settings, database, storage = env
    service = service_for(settings, database)
    bad, _ = add_study(database, storage, [200])
    good, _ = add_study(database, storage, [200])

    def plan_study(study_uid: str, *args: object, **kwargs: object) -> object:
        if study_uid == bad:  # what pydicom says about a name sent with a numeric VR
            raise struct.error(f"unpack requires a buffer: {b'Doe^Jane'!r} in (0010,0010)")
        return real(study_uid, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service_module, "plan_study", plan_study)
    created = service.plan_pending()
    assert study_state(database, bad) == "failed"
    assert study_state(database, good) == "processing"
    jobs = {j["study_uid"]: j for j in queue.list_jobs(database)}
    assert jobs[good]["id"] in created and jobs[good]["state"] == "queued"
    detail = queue.job_detail(database, jobs[bad]["id"])
    assert detail["state"] == "failed"
    problem = detail["outcome"]["problems"]["(planning)"]
    assert problem.startswith("error: unpack requires a buffer") and "(0010,0010)" in problem
    with database.transaction() as session:
        texts = [d or "" for d in session.scalars(select(AuditEvent.detail))]
    assert not [t for t in [problem, *texts] if "Doe" in t]
    # The queue keeps flowing: the good study's job runs; the failed study is never retried
    # on its own (an operator re-runs it).
    assert service.run_once() == jobs[good]["id"]
    assert service.run_once() is None and service.plan_pending() == []
