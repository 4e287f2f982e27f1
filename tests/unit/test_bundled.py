"""`dicomnode init DIR` writes a working node folder; without --config the node finds it (run
from DIR), and from a checkout the embedded default as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.bundled import shipped_root
from dicomnode.cli import main
from dicomnode.settings import DEFAULT_CONFIG_PATH, default_config_path, load_settings


def test_init_writes_config_presets_and_models_and_serve_finds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "node"
    assert main(["init", str(target)]) == 0
    assert "cd " in capsys.readouterr().out
    shipped = shipped_root()
    for name in ("presets", "model_registry"):
        assert sorted(p.relative_to(target / name) for p in (target / name).rglob("*")) == \
            sorted(p.relative_to(shipped / name) for p in (shipped / name).rglob("*")
                   if "__pycache__" not in p.parts)
    monkeypatch.chdir(target)
    assert default_config_path() == target / "config" / "dicomnode.yaml"
    settings = load_settings()
    assert settings.registry.path == target / "model_registry"
    assert settings.presets.path == target / "presets"
    assert settings.storage.path == target / "var" / "storage"
    assert settings.modality_defaults["OP"] == "diabetic-screening"


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "mine.yaml").write_text("id: mine\n")
    assert main(["init", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert not (tmp_path / "config").exists()  # nothing written
    assert (tmp_path / "presets" / "mine.yaml").read_text() == "id: mine\n"


def test_a_checkout_keeps_its_embedded_default(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/ here
    assert default_config_path() == DEFAULT_CONFIG_PATH
