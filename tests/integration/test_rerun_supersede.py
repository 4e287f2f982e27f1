"""A re-run supersedes cleanly in a real PACS (Orthanc): after a late image, the objects of
the images already analysed are not sent again; the new SR names its predecessor and
references the current objects only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Result, Series, Study, utcnow
from dicomnode.dispatch import Dispatcher
from dicomnode.receive.storage import relative_path
from dicomnode.synthetic import op_dataset
from tests.integration.test_dispatch import orthanc  # noqa: F401  (the module's Orthanc)
from tests.integration.test_results_delivery import _drain, node  # noqa: F401
from tests.support.executor_fixtures import add_study, disc_rgb, mark_late
from tests.support.orthanc import Orthanc

pytestmark = pytest.mark.integration


def add_late_image(database: Database, storage: Path, study_uid: str, green: int) -> str:
    """One more image of a finished study, as the receiver records a late arrival."""
    with database.transaction() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        series = session.scalars(select(Series).where(Series.study_id == study.id)).first()
        assert series is not None
        ds = op_dataset(disc_rgb(green=green), laterality="L", study_uid=study_uid,
                        series_uid=series.series_uid, instance_number=9)
        rel = relative_path(study_uid, series.series_uid, str(ds.SOPInstanceUID))
        ds.save_as(storage / rel, enforce_file_format=True)
        session.add(Instance(
            study_id=study.id, series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            modality="OP", laterality="L", path=rel.as_posix(),
            size_bytes=(storage / rel).stat().st_size, calling_ae="CAM1", received_at=utcnow(),
            late=True))
    mark_late(database, study_uid)  # a minute ago: past the late re-run's quiet period
    return str(ds.SOPInstanceUID)


def stored(pacs: Orthanc, study_uid: str) -> list[tuple[str, str]]:
    """(Modality, SOP Instance UID) of every copy the PACS holds for a study."""
    out = []
    for orthanc_id in pacs.instance_ids():
        tags = pacs.get(f"/instances/{orthanc_id}/simplified-tags")
        assert isinstance(tags, dict)
        if tags["StudyInstanceUID"] == study_uid:
            out.append((str(tags["Modality"]), str(tags["SOPInstanceUID"])))
    return sorted(out)


def _results(database: Database, job_id: int) -> list[Result]:
    with database.transaction() as session:
        return list(session.scalars(select(Result).where(Result.job_id == job_id)))


def wait_stored(pacs: Orthanc, study_uid: str, count: int) -> list[tuple[str, str]]:
    deadline = time.monotonic() + 10
    while len(held := stored(pacs, study_uid)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return held


def run_and_send(service: Any, pipeline: Any, dispatcher: Dispatcher,
                 database: Database) -> int:
    job_id = service.run_once()
    assert job_id is not None
    [outcome] = pipeline.run_once()
    assert outcome.state == "encoded", outcome
    _drain(dispatcher, database)
    return int(job_id)


def test_late_image_sends_only_what_is_new(node: Any, orthanc: Orthanc,  # noqa: F811
                                           tmp_path: Path) -> None:
    settings, database, service, pipeline, dispatcher = node(orthanc.dicom_port)
    storage = settings.storage.path
    uid, _ = add_study(database, storage, [200, 180])
    service.on_study_complete(uid)
    first = run_and_send(service, pipeline, dispatcher, database)
    # Per image a SEG and an overlay, and the SR.
    before = wait_stored(orthanc, uid, 5)
    assert [m for m, _ in before].count("SEG") == 2 and len(before) == 5, before

    late = add_late_image(database, storage, uid, green=160)
    [second] = service.plan_pending()
    assert run_and_send(service, pipeline, dispatcher, database) == second
    # New: the late image's SEG and overlay, and the new SR. Nothing else twice.
    after = wait_stored(orthanc, uid, 8)
    assert len(after) == 8, after
    assert len(set(after)) == len(after)
    assert [m for m, _ in after].count("SEG") == 3
    assert [m for m, _ in after].count("SR") == 2
    time.sleep(0.5)
    assert len(stored(orthanc, uid)) == 8

    new = _results(database, second)
    assert sorted((r.kind, r.source_uid) for r in new if r.kind != "sr") == [
        ("overlay", late), ("seg", late)]
    [old_sr] = [r for r in _results(database, first) if r.kind == "sr"]
    [new_sr] = [r for r in new if r.kind == "sr"]
    report = hd.sr.srread(storage / new_sr.path)
    predecessors = [ref.ReferencedSOPInstanceUID
                    for study in report.PredecessorDocumentsSequence
                    for series in study.ReferencedSeriesSequence
                    for ref in series.ReferencedSOPSequence]
    assert predecessors == [old_sr.sop_instance_uid]
    # The report's evidence: the three images and the three current SEGs, all in the PACS.
    evidence = {ref.ReferencedSOPInstanceUID: ref.ReferencedSOPClassUID
                for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    segs = {sop for sop, cls in evidence.items() if cls == "1.2.840.10008.5.1.4.1.1.66.4"}
    assert segs == {sop for modality, sop in after if modality == "SEG"}
    # An old SEG it references is the very object the PACS got the first time.
    reused = next(iter(segs - {r.sop_instance_uid for r in new}))
    with database.transaction() as session:
        path = session.scalar(select(Result.path).where(Result.sop_instance_uid == reused))
    assert path is not None and dcmread(storage / path).SOPInstanceUID == reused


def test_operator_rerun_supersedes(node: Any, orthanc: Orthanc) -> None:  # noqa: F811
    from dicomnode.jobs.rerun import rerun_study

    settings, database, service, pipeline, dispatcher = node(orthanc.dicom_port)
    storage = settings.storage.path
    uid, _ = add_study(database, storage, [200, 180])
    service.on_study_complete(uid)
    first = run_and_send(service, pipeline, dispatcher, database)
    assert len(wait_stored(orthanc, uid, 5)) == 5

    def again(**selection: Any) -> int:
        queued = rerun_study(database, storage, service.registry, service.presets,
                             settings.modality_defaults, uid, actor="alice", **selection)
        assert run_and_send(service, pipeline, dispatcher, database) == queued.job_id
        return queued.job_id

    # The same preset again: the same masks and findings, so only a new SR goes out.
    second = again()
    held = wait_stored(orthanc, uid, 6)
    assert len(held) == 6 and [m for m, _ in held].count("SR") == 2
    assert [r.kind for r in _results(database, second)] == ["sr"]
    # Switch the measurement chain off: other findings, so new SEGs and overlays supersede.
    third = again(without=["total"])
    new = _results(database, third)
    assert sorted(r.kind for r in new) == ["overlay", "overlay", "seg", "seg", "sr"]
    assert len(wait_stored(orthanc, uid, 11)) == 11
    report = hd.sr.srread(storage / next(r.path for r in new if r.kind == "sr"))
    evidence = {ref.ReferencedSOPInstanceUID
                for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert {r.sop_instance_uid for r in new if r.kind == "seg"} <= evidence
    old_segs = {r.sop_instance_uid for r in _results(database, first) if r.kind == "seg"}
    assert not old_segs & evidence
