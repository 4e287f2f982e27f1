"""Quiet, useful logs: one-shot commands warn only unless -v, peers' INFO chatter is held
back, `logging.format: json` gives one JSON object per line, each catalog problem once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from dicomnode.cli import main
from dicomnode.logs import configure_logging, effective_level
from dicomnode.results.seg import build_segmentation
from tests.support.onnx_models import write_example_registry
from tests.unit.results.sources import masks_for, source_image


def _config(tmp_path: Path, **logging_: str) -> Path:
    registry = tmp_path / "model_registry"
    write_example_registry(registry)
    broken = registry / "broken" / "1.0.0"
    broken.mkdir(parents=True)
    (broken / "manifest.yaml").write_text("id: broken\nversion: 1.0.0\nname: Broken\n")
    path = tmp_path / "dicomnode.yaml"
    path.write_text(yaml.safe_dump({
        "registry": {"path": str(registry)}, "presets": {"path": str(tmp_path / "presets")},
        "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
        "logging": {"level": "INFO", **logging_}}))
    return path


def test_levels_for_services_and_one_shot_commands() -> None:
    assert effective_level("INFO", service=True, verbose=0) == logging.INFO
    assert effective_level("INFO", service=True, verbose=1) == logging.DEBUG
    assert effective_level("INFO", service=False, verbose=0) == logging.WARNING
    assert effective_level("INFO", service=False, verbose=1) == logging.INFO
    assert effective_level("ERROR", service=False, verbose=0) == logging.ERROR
    assert effective_level("INFO", service=False, verbose=5) == logging.DEBUG


def test_a_command_logs_warnings_only_unless_verbose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    assert main(["models", "list", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "WARNING dicomnode.registry.loader: model broken@1.0.0 left out" in err
    assert " INFO " not in err
    assert main(["models", "list", "--config", str(config), "-v"]) == 0
    assert " INFO dicomnode.registry.loader: model registry" in capsys.readouterr().err
    assert main(["-v", "models", "list", "--config", str(config)]) == 0
    assert " INFO " in capsys.readouterr().err


def test_each_catalog_problem_is_reported_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    assert main(["models", "check", "--config", str(config)]) == 2
    out = capsys.readouterr()
    assert (out.out + out.err).count("broken@1.0.0") == 1, out


def test_json_format_is_one_object_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, format="json")
    assert main(["models", "list", "--config", str(config), "-v"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    left_out = [e for e in entries if "broken@1.0.0 left out" in e["message"]]
    assert [(e["level"], e["logger"]) for e in left_out] == [
        ("WARNING", "dicomnode.registry.loader")]
    assert entries[0]["time"].endswith("+00:00")


def test_highdicom_info_lines_are_held_back_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", service=True)  # as `serve` with logging.level INFO
    source, vessels, disc = source_image("op", size=64)
    build_segmentation(source, masks_for(vessels, disc))
    err = capsys.readouterr().err
    assert "INFO dicomnode.results.seg: built SEG" in err  # our own line stays
    assert "highdicom" not in err


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_library_messages_and_warnings_lose_data_set_values(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """pydicom quotes an invalid value in its warning (a Patient's Name sent under VR UI):
    neither its log record nor the Python warning reaches the log with the value."""
    import warnings

    from pydicom import config
    from pydicom.valuerep import validate_value

    configure_logging("INFO", fmt, service=True)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        validate_value("UI", "Leaky^Patient0001", config.WARN)  # logs and warns
    logging.getLogger("dicomnode.receive").info("own text 'kept'")
    err = capsys.readouterr().err
    assert "Leaky" not in err
    assert "Invalid value for VR UI" in err  # the message itself stays, without the value
    assert "kept" in err
