"""The results pipeline: a finished job becomes SEG, SR and overlay files, result rows and
outbox rows, once; re-processing names the previous report; failures are recorded, not raised.

Runs on SQLite and PostgreSQL (`db_url`), with a real executor over tiny fixture models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import yaml
from sqlalchemy import func, select

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Delivery, Result, ResultSet
from dicomnode.inference.outputs import read_index, source_mask
from dicomnode.jobs import ProcessingService, queue
from dicomnode.registry import load_registry
from dicomnode.results.pipeline import ResultsPipeline
from dicomnode.routing import load_catalog, load_presets
from dicomnode.routing.preset import OutputOptions
from dicomnode.settings import Settings
from tests.support.executor_fixtures import add_study, mark_late, write_diamond
from tests.unit.results.sources import content_items

PRESET = {
    "id": "screening", "name": "Screening", "audience": "tests", "description": "test preset",
    "models": ["gated-fraction", "total"],
    "outputs": {"sr": True, "seg": True, "overlay": True},
    "destinations": ["pacs"],
    "routing": {"modality": ["OP"]},
}


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[tuple[Settings, Database, Path]]:
    storage = tmp_path / "storage"
    storage.mkdir()
    write_diamond(tmp_path / "registry", slow_repeats=1)
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "screening.yaml").write_text(yaml.safe_dump(PRESET), "utf-8")
    settings = Settings.model_validate({
        "storage": {"path": storage},
        "database": {"url": db_url},
        "registry": {"path": tmp_path / "registry"},
        "presets": {"path": tmp_path / "presets"},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}},
        "inference": {"workers": 0, "lease_seconds": 30, "poll_seconds": 0.2},
    })
    database = open_database(db_url)
    try:
        yield settings, database, storage
    finally:
        database.dispose()


def _parts(settings: Settings, database: Database, **kwargs: Any
           ) -> tuple[ProcessingService, ResultsPipeline]:
    registry = load_registry(settings.registry.path)
    presets = load_presets(settings.presets.path, registry=registry,
                           destinations=set(settings.destinations))
    assert not presets.problems, presets.problems
    return (ProcessingService(settings, database, registry, presets),
            ResultsPipeline(settings, database, registry, presets, **kwargs))


def _count(database: Database, model: Any) -> int:
    with database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _rows(database: Database, job_id: int) -> list[Result]:
    with database.transaction() as session:
        return list(session.scalars(select(Result).where(Result.job_id == job_id)
                                    .order_by(Result.id)))


def test_finished_job_is_encoded_recorded_and_queued_once(
    env: tuple[Settings, Database, Path],
) -> None:
    settings, database, storage = env
    service, pipeline = _parts(settings, database)
    # Two gradable images (green) and one the quality gate stops (no green).
    uid, sops = add_study(database, storage, [200, 0, 180])
    service.on_study_complete(uid)
    job_id = service.run_once()
    assert job_id is not None
    [outcome] = pipeline.run_once()
    assert (outcome.job_id, outcome.state) == (job_id, "encoded")
    rows = _rows(database, job_id)
    kinds = sorted(r.kind for r in rows)
    # Each image is segmented by `seg` (the gated one too: `seg` has no gate); overlays per
    # analysed image; one SR.
    assert kinds == ["overlay"] * 3 + ["seg"] * 3 + ["sr"]
    assert sorted(str(r.source_uid) for r in rows if r.kind == "seg") == sorted(sops)
    assert outcome.objects == len(rows) and outcome.deliveries == len(rows)
    with database.transaction() as session:
        deliveries = list(session.scalars(select(Delivery)))
        result_set = session.scalars(select(ResultSet)).one()
    assert sorted(d.sop_instance_uid for d in deliveries) == sorted(
        r.sop_instance_uid for r in rows)
    assert {d.destination for d in deliveries} == {"pacs"}
    assert (result_set.job_id, result_set.state, result_set.attempts) == (job_id, "encoded", 1)
    for row in rows:
        assert (storage / row.path).is_file()

    # Content equals the stored outputs: masks pixel for pixel, measurements exactly.
    outputs = storage / queue.job_detail(database, job_id)["output_path"]
    index = read_index(outputs)
    seg_entry = index["models"]["seg"]
    with np.load(outputs / seg_entry["file"]) as npz:
        for row in (r for r in rows if r.kind == "seg"):
            assert row.source_uid is not None
            seg = hd.seg.segread(storage / row.path)
            stored = source_mask(npz, seg_entry["outputs"]["mask"]["per_image"][row.source_uid])
            segments = {int(s.SegmentNumber): str(s.TrackingID) for s in seg.SegmentSequence}
            number = next(n for n, key in segments.items() if key == "seg.mask")
            got = seg.get_pixels_by_source_instance(
                [row.source_uid], segment_numbers=[number]
            )[0, :, :, 0].astype(bool)
            np.testing.assert_array_equal(got, stored)
    [sr_row] = [r for r in rows if r.kind == "sr"]
    sr = hd.sr.srread(storage / sr_row.path)
    [measurements] = [c for c in sr.ContentSequence
                      if c.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"]
    reported = sorted(
        (str(item.ConceptNameCodeSequence[0].CodeMeaning),
         float(item.MeasuredValueSequence[0].NumericValue))
        for item in content_items(measurements.ContentSequence) if item.ValueType == "NUM"
        and item.ConceptNameCodeSequence[0].CodeValue != "122157")  # not a classification's
    # probability; the fixture measurement codes' meanings are the model ids.
    stored_values = sorted(
        (model, float(v["value"])) for model in ("gated-fraction", "slow-b", "slow-c", "total")
        for output in index["models"][model]["outputs"].values()
        for v in output["per_image"].values())
    assert [m for m, _ in reported] == [m for m, _ in stored_values]
    assert [v for _, v in reported] == pytest.approx([v for _, v in stored_values], rel=1e-12)
    assert "PredecessorDocumentsSequence" not in sr

    # Encoding again adds nothing: no rows, no deliveries.
    assert pipeline.run_once() == []
    assert pipeline.encode_job(job_id).state == "already"
    assert _count(database, Result) == len(rows) and _count(database, Delivery) == len(rows)



def test_reprocessed_study_report_names_the_previous_one(
    env: tuple[Settings, Database, Path],
) -> None:
    settings, database, storage = env
    service, pipeline = _parts(settings, database)
    uid, _ = add_study(database, storage, [200, 180])
    service.on_study_complete(uid)
    first = service.run_once()
    pipeline.run_once()
    mark_late(database, uid)
    [second] = service.plan_pending()
    assert service.run_once() == second and first is not None
    [outcome] = pipeline.run_once()
    assert outcome.state == "encoded"
    [old] = [r for r in _rows(database, first) if r.kind == "sr"]
    [new] = [r for r in _rows(database, second) if r.kind == "sr"]
    assert old.sop_instance_uid != new.sop_instance_uid
    sr = hd.sr.srread(storage / new.path)
    refs = [ref.ReferencedSOPInstanceUID
            for study in sr.PredecessorDocumentsSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence]
    assert refs == [old.sop_instance_uid]
    assert (storage / old.path).is_file()  # both versions stay traceable
    # The new set is its new SR and the first job's unchanged SEGs and overlays, which it
    # kept (no new rows): all on record as the set's objects, the SEGs the report's evidence.
    with database.transaction() as session:
        members = session.scalar(select(ResultSet.objects_json)
                                 .where(ResultSet.job_id == second))
    assert members is not None
    kept = {r.sop_instance_uid for r in _rows(database, first) if r.kind != "sr"}
    assert [r.kind for r in _rows(database, second)] == ["sr"] and kept
    assert set(json.loads(members)) == kept | {new.sop_instance_uid}
    evidence = {ref.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    segs = {r.sop_instance_uid for r in _rows(database, first) if r.kind == "seg"}
    assert segs and segs <= evidence


def test_encoding_failure_is_recorded_and_retried_not_raised(
    env: tuple[Settings, Database, Path],
) -> None:
    settings, database, storage = env
    service, pipeline = _parts(settings, database, retry_seconds=0, max_attempts=2)
    uid, _ = add_study(database, storage, [200])
    service.on_study_complete(uid)
    job_id = service.run_once()
    assert job_id is not None
    outputs = storage / queue.job_detail(database, job_id)["output_path"]
    index_text = (outputs / "index.json").read_text()
    (outputs / "index.json").write_text("{ not json")
    [outcome] = pipeline.run_once()
    assert outcome.state == "failed" and outcome.error and "JSONDecodeError" in outcome.error
    with database.transaction() as session:
        result_set = session.scalars(select(ResultSet)).one()
        assert (result_set.state, result_set.attempts) == ("failed", 1)
        events = session.scalars(select(AuditEvent.detail)
                                 .where(AuditEvent.kind == "results-failed")).all()
    assert len(events) == 1 and f"job {job_id}" in str(events[0])
    assert _count(database, Result) == 0 and _count(database, Delivery) == 0
    # Fixed before the last attempt: the next pass encodes it.
    (outputs / "index.json").write_text(index_text)
    [again] = pipeline.run_once()
    assert again.state == "encoded" and _count(database, Delivery) == again.objects > 0
    assert pipeline.run_once() == []


def test_failed_encoding_stops_after_max_attempts(env: tuple[Settings, Database, Path]) -> None:
    settings, database, storage = env
    service, pipeline = _parts(settings, database, retry_seconds=0, max_attempts=2)
    uid, _ = add_study(database, storage, [200])
    service.on_study_complete(uid)
    job_id = service.run_once()
    assert job_id is not None
    (storage / queue.job_detail(database, job_id)["output_path"] / "index.json").unlink()
    assert [o.state for o in pipeline.run_once()] == ["failed"]
    assert [o.state for o in pipeline.run_once()] == ["failed"]
    assert pipeline.run_once() == []  # visible as failed, no longer retried by itself


def test_preset_naming_an_unknown_destination_is_refused_at_load(
    env: tuple[Settings, Database, Path],
) -> None:
    settings, _database, _storage = env
    (settings.presets.path / "archive.yaml").write_text(yaml.safe_dump(
        {**PRESET, "id": "archive", "destinations": ["pacs", "archive"]}), "utf-8")
    catalog = load_catalog(settings)
    assert set(catalog.presets.presets) == {"screening"}
    [problem] = catalog.presets.problems
    assert "destination 'archive' is not defined in the settings" in str(problem)


def test_crash_between_writing_and_recording_reencodes_with_the_same_uids(
    env: tuple[Settings, Database, Path],
) -> None:
    settings, database, storage = env
    service, pipeline = _parts(settings, database)
    uid, _ = add_study(database, storage, [200, 180])
    service.on_study_complete(uid)
    job_id = service.run_once()
    assert job_id is not None
    # The first attempt writes its files and "dies" before its transaction.
    info = pipeline._job(job_id)
    folder = pipeline._attempt_folder(job_id)
    first_paths = pipeline._write(folder, pipeline._build(info, PRESET_OUTPUTS))
    first = sorted(p.name for p in first_paths)
    assert _count(database, Result) == 0 and _count(database, Delivery) == 0
    [outcome] = pipeline.run_once()
    assert outcome.state == "encoded"
    rows = _rows(database, job_id)
    # Same objects (same UIDs), one set of files, one row and one delivery each.
    assert sorted(Path(r.path).name for r in rows) == first
    with database.transaction() as session:
        recorded = session.scalars(select(ResultSet.folder)).one()
    assert recorded is not None and not folder.exists()  # the dead attempt's files are gone
    assert [p.name for p in (storage / recorded).parent.iterdir()] == [Path(recorded).name]
    assert sorted(p.name for p in (storage / recorded).iterdir()) == first
    assert _count(database, Delivery) == len(rows)


PRESET_OUTPUTS = OutputOptions(sr=True, seg=True, overlay=True)


def test_report_failing_after_the_images_were_queued_keeps_them_and_the_retry_reuses_them(
    env: tuple[Settings, Database, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-image objects are recorded and queued before the SR is built; an SR that
    fails leaves them queued (the PACS may have them already), the result set `failed`, and
    the next attempt makes only the SR: no second row, delivery or file of any image object."""
    import dicomnode.results.pipeline as pipeline_module

    settings, database, storage = env
    service, pipeline = _parts(settings, database, retry_seconds=0, max_attempts=2)
    uid, _ = add_study(database, storage, [200, 180])
    service.on_study_complete(uid)
    job_id = service.run_once()
    assert job_id is not None
    from dicomnode.results.encode import encode_report as real  # what the pipeline calls

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("report builder broke")

    monkeypatch.setattr(pipeline_module, "encode_report", broken)
    [failed] = pipeline.run_once()
    assert failed.state == "failed" and "report builder broke" in str(failed.error)
    first = _rows(database, job_id)
    assert sorted(r.kind for r in first) == ["overlay"] * 2 + ["seg"] * 2
    with database.transaction() as session:
        queued = sorted(session.scalars(select(Delivery.sop_instance_uid)))
        assert session.scalars(select(ResultSet.state)).one() == "failed"
    assert queued == sorted(r.sop_instance_uid for r in first)
    for row in first:
        assert (storage / row.path).is_file()

    monkeypatch.setattr(pipeline_module, "encode_report", real)
    [again] = pipeline.run_once()
    assert (again.state, again.objects, again.reused, again.deliveries) == ("encoded", 1, 4, 1)
    rows = _rows(database, job_id)
    assert [(r.sop_instance_uid, r.path) for r in rows[:4]] == [
        (r.sop_instance_uid, r.path) for r in first]
    assert sorted(r.kind for r in rows) == ["overlay"] * 2 + ["seg"] * 2 + ["sr"]
    assert _count(database, Delivery) == 5
    for row in rows:  # the first attempt's folder stays: its files are on record
        assert (storage / row.path).is_file()
    # The SR references the SEGs the first attempt made.
    [sr_row] = [r for r in rows if r.kind == "sr"]
    sr = hd.sr.srread(storage / sr_row.path)
    evidence = {ref.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert {r.sop_instance_uid for r in rows if r.kind == "seg"} <= evidence
