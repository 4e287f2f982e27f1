"""The CLI commands, in-process via dicomnode.cli.main and once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomnode.cli import main
from tests.unit.selection.test_presets import GOOD

PROJECT = Path(__file__).resolve().parents[3]


@pytest.fixture
def config(tmp_path: Path, registry_dir: Path) -> Path:
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "screening.yaml").write_text(GOOD, encoding="utf-8")
    path = tmp_path / "dicomnode.yaml"
    path.write_text(
        f"registry: {{path: {registry_dir}}}\n"
        f"presets: {{path: {presets}}}\n"
        "destinations: {pacs: {ae_title: PACS, host: 127.0.0.1, port: 4242}}\n"
        "modality_defaults: {XC: screening}\n"
        "logging: {level: WARNING}\n",
        encoding="utf-8",
    )
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_graph_json_shape(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "graph", "--config", str(config), "--preset", "screening",
        "--with", "mask-centre", "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["stages"] == [["green-quality"], ["green-seg"], ["mask-centre", "mask-fraction"]]
    assert data["added"] == {"green-quality": "required by green-seg"}
    assert data["models"] == {
        "green-quality": "1.0.0", "green-seg": "1.0.0", "mask-centre": "1.0.0",
        "mask-fraction": "1.0.0",
    }


def test_graph_text_says_what_was_added_and_why(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(
        capsys, "graph", "--config", str(config), "--preset", "screening",
        "--without", "green-seg", "--choices",
    )
    assert code == 0
    assert "stage 1: green-quality@1.0.0" in out
    assert "green-seg-alt: required by mask-fraction" in out
    assert "green-seg: switched off" in out
    assert "mask-fraction.mask <- green-seg-alt.mask" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["graph", "--preset", "screening", "--with", "green-seg-alt"],
         "conflicts with green-seg-alt"),
        (["graph", "--preset", "nope"], "no preset 'nope' (loaded: screening)"),
        (["graph", "--preset", "screening", "--with", "ghost"], "unknown model 'ghost'"),
        (["graph", "--preset", "screening", "--modality", "XC", "--with", "mask-centre"],
         "does not accept modality XC"),
        (["graph"], "nothing selected"),
        (["models", "show", "green-seg@7.0.0"], "has no version 7.0.0"),
    ],
)
def test_errors_go_to_stderr_with_exit_2(
    config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = _run(capsys, *argv, "--config", str(config))
    assert code == 2
    assert out == ""
    assert err.startswith("dicomnode: error: ") and message in err


def test_models_list_show_check(
    config: Path, registry_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "models", "list", "--config", str(config), "--json")
    assert code == 0
    listed = json.loads(out)
    assert [(m["id"], m["version"]) for m in listed["models"]][:3] == [
        ("green-quality", "1.0.0"), ("green-seg", "1.0.0"), ("green-seg", "1.1.0")
    ]
    code, out, _ = _run(capsys, "models", "show", "green-seg", "--config", str(config))
    assert code == 0 and "# green-seg@1.1.0" in out and "kind: mask" in out
    assert _run(capsys, "models", "check", "--config", str(config))[0] == 0
    (registry_dir / "green-seg-alt" / "1.0.0" / "model.onnx").write_bytes(b"junk")
    code, out, err = _run(capsys, "models", "check", "--config", str(config))
    assert code == 2
    assert "model left out: green-seg-alt@1.0.0" in err and "does not load" in err


def test_models_check_reports_cycles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.onnx_models import RegistryWriter, segmenter_manifest

    writer = RegistryWriter(tmp_path / "cyclic")
    writer.add(segmenter_manifest("aa", requires=["bb"]))
    writer.add(segmenter_manifest("bb", requires=["aa"]))
    writer.add(segmenter_manifest("cc"))
    config = tmp_path / "cyclic.yaml"
    config.write_text(f"registry: {{path: {writer.root}}}\nlogging: {{level: ERROR}}\n")
    code, out, err = _run(capsys, "models", "check", "--config", str(config))
    assert code == 2
    assert "ok  cc@1.0.0" in out and "ok  aa" not in out
    assert "model aa@1.0.0 does not resolve alone: dependency cycle: aa -> bb -> aa" in err


def test_presets_validate_reports_file_line_field(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("green-seg@1.0.0", "green-seg@5.0.0"), encoding="utf-8")
    good = tmp_path / "presets" / "screening.yaml"
    code, out, err = _run(
        capsys, "presets", "validate", str(good), str(bad), "--config", str(config)
    )
    assert code == 2
    assert f"ok  {good} (screening)" in out
    assert f"{bad}:7: field 'models[1]': model 'green-seg' has no version 5.0.0" in err
    assert _run(capsys, "presets", "validate", "--config", str(config))[0] == 0
    text = config.read_text().replace("{XC: screening}", "{XC: screening, OP: ghost}")
    config.write_text(text)
    code, _, err = _run(capsys, "presets", "validate", "--config", str(config))
    assert code == 2
    assert "field 'modality_defaults.OP': names preset 'ghost', which is not loaded" in err


def test_a_modality_default_whose_models_cannot_take_the_modality_is_warned(
    config: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from dicomnode.routing.catalog import load_catalog
    from dicomnode.settings import load_settings

    # The fixture models take OP and XC; a Secondary Capture (OT) default cannot run them.
    config.write_text(config.read_text().replace("{XC: screening}", "{XC: screening, "
                                                 "OT: screening}"))
    code, _, err = _run(capsys, "presets", "validate", "--config", str(config))
    assert code == 2
    assert ("field 'modality_defaults.OT': names preset 'screening', whose models cannot take "
            "modality OT: ") in err
    assert "modality_defaults.XC" not in err
    with caplog.at_level("WARNING", logger="dicomnode.routing.catalog"):
        load_catalog(load_settings(config))  # what `serve` does at start-up
    warned = [r.getMessage() for r in caplog.records if r.name == "dicomnode.routing.catalog"]
    assert len(warned) == 1 and "cannot take modality OT" in warned[0], warned


def test_presets_list_keeps_valid_ones(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "presets" / "broken.yaml").write_text("id: x\nbogus: 1\n", encoding="utf-8")
    code, out, err = _run(capsys, "presets", "list", "--config", str(config))
    assert code == 0
    assert "screening" in out
    assert "broken.yaml:2: field 'bogus': unknown key 'bogus'" in err
    code, out, _ = _run(capsys, "presets", "show", "screening", "--config", str(config), "--json")
    assert json.loads(out)["graph"]["stages"][0] == ["green-quality"]


def _write_dicom(path: Path, **values: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_route_command(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dcm = _write_dicom(
        tmp_path / "a.dcm", Modality="OP", StudyDescription="Diabetic SCREENING",
        ManufacturerModelName="TRC-NW8",
    )
    code, out, _ = _run(
        capsys, "route", str(dcm), "--calling-ae", "CAM2", "--config", str(config), "--json"
    )
    assert code == 0
    decision = json.loads(out)
    assert decision["preset"] == "screening" and decision["via"] == "preset"
    code, out, _ = _run(capsys, "route", str(dcm), "--calling-ae", "CAM7", "--config",
                        str(config))
    assert code == 0
    assert "preset: (none)" in out
    assert "calling_ae: expected CAM1 or CAM2; saw CAM7 -> failed" in out
    study = tmp_path / "study"
    study.mkdir()
    _write_dicom(study / "b.dcm", Modality="XC")
    code, out, _ = _run(capsys, "route", str(study), "--config", str(config))
    assert "preset: screening" in out and "modality default for XC" in out
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    code, _, err = _run(capsys, "route", str(tmp_path / "junk.dcm"), "--config", str(config))
    assert code == 2 and "junk.dcm: cannot read as DICOM" in err


def test_default_config_loads(capsys: pytest.CaptureFixture[str]) -> None:
    # The embedded default points at the checkout's presets/ and model_registry/, which may be
    # absent or empty: listing must still work.
    assert main(["presets", "list"]) == 0
    assert main(["models", "list"]) == 0


def test_real_subprocess_refusal(config: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "graph", "--config", str(config),
         "--preset", "screening", "--with", "green-seg-alt"],
        capture_output=True, text=True, cwd=PROJECT, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "green-seg (selected) conflicts with green-seg-alt (selected)" in proc.stderr
