"""Images a model did not analyse, end to end with real peers, and in the console.

storescu (the camera) sends a colour fundus, a monochrome (red-free, MONOCHROME2) one and one
too small for the segmenter to a real `dicomnode serve`; Orthanc is the PACS. The SR fetched
back from Orthanc must say, for each of the two images and each model that skipped it,
"Not analysed" with the coded reason, and pass dciodvfy; `dicomnode job show`, the API and
the console's study page (headless Chromium) must show the reason text.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.db import open_database
from dicomnode.db.models import Job, ModelRun
from dicomnode.inference.decode import decode_rgb
from dicomnode.registry import load_registry
from dicomnode.results.codes import NOT_ANALYSED
from dicomnode.synthetic import op_dataset, synthetic_fundus
from dicomnode.web import auth
from tests.support.node import NODE_AE, NodeProcess, wait_until_delivered, write_config
from tests.support.onnx_models import (
    RegistryWriter,
    classifier_manifest,
    mean_colour_classifier,
    measurement_manifest,
    private_code,
    segmenter_manifest,
)
from tests.support.orthanc import ORTHANC_AET, Orthanc
from tests.support.peers import free_port, require_tool
from tests.unit.results.sources import content_items, dciodvfy, errors
from tests.web.test_console_browser import chromium_context, shot, watch

pytestmark = pytest.mark.integration

PASSWORD = "admin-password-1"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("pacs"), free_port(), free_port())
    peer.start()
    yield peer
    peer.stop()


def _registry(root: Path) -> None:
    """quality (gate) <- colour-seg (colour image, at least 80 x 80) <- fraction."""
    writer = RegistryWriter(root)
    quality = classifier_manifest("quality", modalities=("OP",))
    quality["outputs"][0]["gate"] = {
        "ineligible": ["ungradable"], "reason": "ungradable image",
        "reasons": {"ungradable": {"text": "ungradable image",
                                   "code": private_code("NA-UNGRADABLE", "Ungradable image")}},
    }
    writer.add(quality, mean_colour_classifier(bias=[1.0, 0.0]))
    seg = segmenter_manifest("colour-seg", modalities=("OP",), requires=("quality",))
    seg["requirements"] = {"colour": "colour", "min_width": 80, "min_height": 80}
    writer.add(seg)
    writer.add(measurement_manifest("fraction", source="colour-seg.mask", modalities=("OP",)))


def _monochrome(ds: Dataset) -> Dataset:
    """The same OP image as one MONOCHROME2 channel (the green), as a red-free photo is."""
    rgb = np.frombuffer(ds.PixelData, np.uint8).reshape(int(ds.Rows), int(ds.Columns), 3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    del ds.PlanarConfiguration
    ds.PixelData = np.ascontiguousarray(rgb[..., 1]).tobytes()
    return ds


def _study(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    study = generate_uid()
    made = {
        "colour": op_dataset(synthetic_fundus(128, "R", seed=1), laterality="R",
                             study_uid=study, instance_number=1),
        "mono": _monochrome(op_dataset(synthetic_fundus(128, "L", seed=2), laterality="L",
                                       study_uid=study, instance_number=2)),
        "small": op_dataset(synthetic_fundus(64, "R", seed=3), laterality="R",
                            study_uid=study, instance_number=3),
    }
    paths = {}
    for name, ds in made.items():
        paths[name] = folder / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


def _not_analysed(sr: Dataset) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(source SOP Instance UID, algorithm name) -> (scheme, code, meaning) of each
    Not analysed item, from the measurement groups of the SR."""
    found = {}
    for group in content_items(sr.ContentSequence):
        if group.ValueType != "CONTAINER" or "ContentSequence" not in group:
            continue
        children = list(group.ContentSequence)
        sources = [c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for c in children
                   if c.ValueType == "IMAGE"]
        names = [c.TextValue for c in children
                 if c.ConceptNameCodeSequence[0].CodeValue == "111001"]  # Algorithm Name
        if not (sources and names):  # the study summary: no model of its own (see below)
            continue
        for c in children:
            if (c.ValueType == "CODE"
                    and c.ConceptNameCodeSequence[0].CodeValue == NOT_ANALYSED.value):
                value = c.ConceptCodeSequence[0]
                found[(str(sources[0]), str(names[0]))] = (
                    str(value.CodingSchemeDesignator), str(value.CodeValue),
                    str(value.CodeMeaning))
    return found


def test_monochrome_and_small_images_say_why_in_the_pacs_cli_api_and_console(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    require_tool("dciodvfy", "dicom3tools")
    storescu = require_tool("storescu", "dcmtk")
    require_tool("chromium", "chromium")  # before the node runs: the console check needs it
    _registry(tmp_path / "registry")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "na.yaml").write_text(yaml.safe_dump({
        "id": "na", "name": "Not analysed", "audience": "tests", "description": "test",
        "models": ["fraction"], "destinations": ["pacs"], "routing": {"modality": "OP"},
    }), "utf-8")
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    web_port = free_port()
    config = write_config(
        tmp_path, db_url,
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        registry={"path": str(tmp_path / "registry")},
        presets={"path": str(tmp_path / "presets")},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.3},
        dispatch={"first_delay_seconds": 0.3, "poll_seconds": 0.2},
        web={"enabled": True, "host": "127.0.0.1", "port": web_port},
    )
    database = open_database(db_url)
    auth.add_user(database, "alice", "admin", PASSWORD)
    token = auth.issue_token(database, "alice")
    paths = _study(tmp_path / "study")
    uid = {k: str(pydicom.dcmread(p).SOPInstanceUID) for k, p in paths.items()}
    study_uid = str(pydicom.dcmread(paths["colour"]).StudyInstanceUID)
    try:
        with NodeProcess(config) as node:
            subprocess.run([storescu, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1",
                            str(node.port), *map(str, paths.values())],
                           check=True, capture_output=True, timeout=60)
            wait_until_delivered(database, node, timeout=120, poll=0.3)
            with database.transaction() as session:
                [job] = list(session.scalars(select(Job)))
                job_id, job_state = job.id, job.state
            assert job_state == "done"

            # The SR as the PACS holds it.
            held = []
            for orthanc_id in orthanc.instance_ids():
                path = orthanc.download(orthanc_id, tmp_path / f"pacs-{orthanc_id}.dcm")
                ds = pydicom.dcmread(path)
                if ds.Modality == "SR":
                    held.append((path, ds))
            [(sr_path, sr)] = held
            assert errors(dciodvfy(sr_path)) == [], dciodvfy(sr_path)
            said = _not_analysed(sr)
            want = {
                (uid[image], model): ("99DICOMNODE", code, meaning)
                for image, code, meaning in (("mono", "NA-MONOCHROME", "Monochrome image"),
                                             ("small", "NA-TOO-SMALL", "Image too small"))
                for model in ("Colour Seg", "Fraction")
            }
            assert said == want
            declared = {str(i.CodingSchemeDesignator)
                        for i in sr.CodingSchemeIdentificationSequence}
            assert "99DICOMNODE" in declared

            # `dicomnode job show` and the API.
            shown = subprocess.run(
                [sys.executable, "-m", "dicomnode.cli", "job", "show", str(job_id),
                 "--config", str(config)], capture_output=True, text=True, timeout=60)
            assert shown.returncode == 0, shown.stderr
            for text in ("not analysed:", "Monochrome image", "99DICOMNODE NA-TOO-SMALL",
                         "is smaller than 80x80", uid["mono"]):
                assert text in shown.stdout, shown.stdout
            request = urllib.request.Request(
                f"http://127.0.0.1:{web_port}/api/jobs/{job_id}",
                headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                detail: dict[str, Any] = json.loads(response.read())
            rows = {(r["sop_instance_uid"], r["model_id"]): r["code"]
                    for r in detail["not_analysed"]}
            assert rows == {(uid[i], m): c for i, c in (("mono", "NA-MONOCHROME"),
                                                         ("small", "NA-TOO-SMALL"))
                            for m in ("colour-seg", "fraction")}

            _console_shows_the_reasons(tmp_path, web_port, study_uid, job_id)
    finally:
        database.dispose()


def _console_shows_the_reasons(tmp_path: Path, port: int, study_uid: str, job_id: int) -> None:
    base = f"http://127.0.0.1:{port}"
    with chromium_context(tmp_path / "profile") as context:
        page = context.new_page()
        problems = watch(page)
        page.goto(f"{base}/login?next=/studies/{study_uid}")
        page.fill("#username", "alice")
        page.fill("#password", PASSWORD)
        page.click("#login")
        page.wait_for_url(f"{base}/studies/{study_uid}")
        table = page.inner_text(f"#not-analysed-{job_id}")
        reasons = page.eval_on_selector_all(
            f"#not-analysed-{job_id} td.reason", "els => els.map(e => e.textContent)")
        assert sorted(reasons) == ["Image too small"] * 2 + ["Monochrome image"] * 2
        assert "needs a colour image" in table and "is smaller than 80x80" in table
        findings = page.inner_text("table.findings")
        assert "Not analysed" in findings and "Monochrome image" in findings, findings
        shot(page, "20-study-not-analysed")
        assert problems == []


DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ROOT = Path(__file__).resolve().parents[2]
NEMA_ENDOSCOPY = DATA / "dicom-samples" / "NEMA_WG04" / "RLE" / "VL1_RLE"


def test_a_non_fundus_photograph_is_refused_with_its_own_reason(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """The NEMA WG04 endoscopy image (Barrett's oesophagus), re-wrapped as an OP instance in
    code (its own Modality OT is not routed to fundus presets on this branch), through the
    shipped registry: fundus-quality 2.0.0 calls it not a fundus photograph, no other model
    runs on it, and the SR in Orthanc says why for each of them."""
    if not NEMA_ENDOSCOPY.exists():
        pytest.skip(f"{NEMA_ENDOSCOPY} is absent (../shared/data is not part of the project)")
    require_tool("dciodvfy", "dicom3tools")
    storescu = require_tool("storescu", "dcmtk")
    rgb = decode_rgb(pydicom.dcmread(NEMA_ENDOSCOPY))
    path = tmp_path / "endoscopy-as-op.dcm"
    op_dataset(rgb, laterality="R").save_as(path, enforce_file_format=True)
    sop = str(pydicom.dcmread(path).SOPInstanceUID)
    (tmp_path / "presets").mkdir()
    models = ["fundus-quality", "vessel-metrics", "disc-metrics", "laterality"]
    (tmp_path / "presets" / "screen.yaml").write_text(yaml.safe_dump({
        "id": "screen", "name": "Screening", "audience": "tests", "description": "test",
        "models": models, "destinations": ["pacs"], "routing": {"modality": "OP"},
    }), "utf-8")
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    config = write_config(
        tmp_path, db_url,
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        registry={"path": str(ROOT / "model_registry")},
        presets={"path": str(tmp_path / "presets")},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.3},
        dispatch={"first_delay_seconds": 0.3, "poll_seconds": 0.2},
    )
    database = open_database(db_url)
    before = set(orthanc.instance_ids())
    try:
        with NodeProcess(config) as node:
            subprocess.run([storescu, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1",
                            str(node.port), str(path)],
                           check=True, capture_output=True, timeout=60)
            wait_until_delivered(database, node, timeout=120, poll=0.3)
            with database.transaction() as session:
                [job] = list(session.scalars(select(Job)))
                graph = json.loads(job.graph_json)
                job_state = job.state
        with database.transaction() as session:
            runs = {r.model_id: (r.version, r.images, json.loads(r.not_analysed_json or "{}"))
                    for r in session.scalars(select(ModelRun))}
    finally:
        database.dispose()
    assert job_state == "done"
    assert runs["fundus-quality"][:2] == ("2.0.0", 1)
    others = set(graph["models"]) - {"fundus-quality"}
    assert {"vessel-seg", "optic-disc", "laterality"} <= others
    for model in others:
        _, images, reasons = runs[model]
        assert images == 0, f"{model} ran on a non-fundus image"
        assert reasons[sop]["value"] == "NA-NOT-FUNDUS", (model, reasons)
        assert reasons[sop]["detail"] == "fundus-quality: not a fundus photograph"

    [sr_path] = [path for path in (orthanc.download(i, tmp_path / f"pacs-{i}.dcm")
                                   for i in set(orthanc.instance_ids()) - before)
                 if pydicom.dcmread(path).Modality == "SR"]
    assert errors(dciodvfy(sr_path)) == [], dciodvfy(sr_path)
    said = _not_analysed(pydicom.dcmread(sr_path))
    registry = load_registry(ROOT / "model_registry")
    names = {registry.get(m, runs[m][0]).manifest.name[:64]  # LO: 64 characters
             for m in {*others, "fundus-quality"}}
    # Every model, the gate included (its own group), says not analysed: not a fundus photo.
    assert {name for (uid, name) in said if uid == sop} == names
    assert set(said.values()) == {("99DICOMNODE", "NA-NOT-FUNDUS", "Not a fundus photograph")}
    # The study summary a grader reads first lists the image as not analysed, for that reason.
    [summary] = [item for item in content_items(pydicom.dcmread(sr_path).ContentSequence)
                 if str(item.ConceptNameCodeSequence[0].CodeValue) == "C0034375"]
    stopped = [(str(i.ConceptCodeSequence[0].CodeValue),
                str(i.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
               for i in summary.ContentSequence
               if str(i.ConceptNameCodeSequence[0].CodeValue) == NOT_ANALYSED.value]
    assert stopped == [("NA-NOT-FUNDUS", sop)], stopped
