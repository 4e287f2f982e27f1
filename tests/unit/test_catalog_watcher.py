"""The catalog fingerprint and the watcher's debounce, on real folders and a real holder."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import yaml

from dicomnode.routing.catalog import CatalogHolder, catalog_changes
from dicomnode.routing.fingerprint import catalog_print, folder_print
from dicomnode.routing.watcher import CatalogWatcher
from dicomnode.settings import Settings, load_settings
from tests.support.onnx_models import classifier_manifest, write_example_registry

SCREENING = {
    "id": "screening", "name": "Green screening", "audience": "Primary care",
    "description": "Quality gate and mask fraction.",
    "models": ["green-quality", "mask-fraction"],
    "routing": {"modality": ["OP"], "calling_ae": ["CAM1"]},
}


def _preset(preset_id: str, **changes: object) -> str:
    return yaml.safe_dump({**SCREENING, "id": preset_id, **changes})


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shared") / "model_registry"
    write_example_registry(root)
    return root


def _settings(root: Path, registry: Path) -> Settings:
    (root / "presets").mkdir()
    (root / "presets" / "screening.yaml").write_text(_preset("screening"), "utf-8")
    config = root / "dicomnode.yaml"
    config.write_text(yaml.safe_dump({
        "registry": {"path": str(registry)}, "presets": {"path": "presets", "watch_seconds": 0},
    }), "utf-8")
    return load_settings(config)


def test_fingerprint_sees_same_size_same_mtime_edits_and_skips_what_loaders_skip(
    tmp_path: Path,
) -> None:
    preset = tmp_path / "a.yaml"
    preset.write_text("name: aaaa\n", "utf-8")
    before = folder_print(tmp_path, depth=1, suffixes=(".yaml", ".yml"))
    stat = preset.stat()
    # An editor rewriting within the same mtime tick, same length: only the hash tells.
    preset.write_text("name: bbbb\n", "utf-8")
    os.utime(preset, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = folder_print(tmp_path, depth=1, suffixes=(".yaml", ".yml"))
    assert preset.stat().st_size == stat.st_size
    assert before != after and before.changes(after) == ["~a.yaml"]
    # Swap files, hidden temporaries, other suffixes and sub-folders are not presets.
    (tmp_path / ".a.yaml.swp").write_text("x", "utf-8")
    (tmp_path / "a.yaml~").write_text("x", "utf-8")
    (tmp_path / "notes.txt").write_text("x", "utf-8")
    (tmp_path / "old").mkdir()
    assert folder_print(tmp_path, depth=1, suffixes=(".yaml", ".yml")) == after
    assert not folder_print(tmp_path / "missing", depth=1).exists


def test_registry_fingerprint_stamps_model_files_without_hashing_onnx(
    tmp_path: Path, registry: Path
) -> None:
    settings = _settings(tmp_path, registry)
    first = catalog_print(settings)
    stamps = first.registry.stamps
    assert "green-seg/1.1.0/" in stamps
    assert stamps["green-seg/1.1.0/manifest.yaml"].digest
    assert stamps["green-seg/1.1.0/model.onnx"].digest == ""
    assert stamps["green-seg/1.1.0/model.onnx"].size > 0
    assert catalog_print(settings) == first


def test_watcher_reloads_a_change_once_it_holds_still(tmp_path: Path, registry: Path) -> None:
    settings = _settings(tmp_path, registry)
    holder = CatalogHolder(settings)
    handed: list[set[str]] = []
    holder.subscribe(lambda catalog: handed.append(set(catalog.presets.presets)))
    watcher = CatalogWatcher(holder)
    presets = settings.presets.path
    assert watcher.check() is False

    (presets / "cam9.yaml").write_text(_preset("cam9"), "utf-8")
    assert watcher.check() is False  # first sight: may be half-written
    assert "cam9" not in holder.catalog.presets.presets
    assert watcher.check() is True  # held still for one tick
    assert set(holder.catalog.presets.presets) == {"screening", "cam9"}
    assert handed == [{"screening", "cam9"}]
    assert watcher.check() is False

    # Still changing between ticks: never reloaded mid-write.
    (presets / "cam9.yaml").write_text("id: cam9\nname: half", "utf-8")
    assert watcher.check() is False
    (presets / "cam9.yaml").write_text(_preset("cam9", name="Camera nine"), "utf-8")
    assert watcher.check() is False
    assert holder.catalog.presets.presets["cam9"].name == "Green screening"
    assert watcher.check() is True
    assert holder.catalog.presets.presets["cam9"].name == "Camera nine"

    # A reload by someone else (the console) is not reloaded again by the watcher.
    (presets / "cam9.yaml").unlink()
    holder.reload()
    assert watcher.check() is False
    assert set(holder.catalog.presets.presets) == {"screening"}


def test_broken_files_are_left_out_with_problems_and_the_good_ones_stay(
    tmp_path: Path, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, registry)
    holder = CatalogHolder(settings)
    watcher = CatalogWatcher(holder)
    (settings.presets.path / "broken.yaml").write_text("id: broken\nmodels: [\n", "utf-8")
    (settings.presets.path / "ghost.yaml").write_text(
        _preset("ghost", models=["no-such-model"]), "utf-8")
    caplog.set_level(logging.INFO, logger="dicomnode.routing")
    assert watcher.check() is False
    assert watcher.check() is True
    catalog = holder.catalog
    assert set(catalog.presets.presets) == {"screening"}
    refused = {p.file.name for p in catalog.presets.problems if p.file is not None}
    assert refused == {"broken.yaml", "ghost.yaml"}
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "dicomnode.routing.catalog" and r.levelno == logging.WARNING]
    assert any("preset refused" in w and "broken.yaml" in w for w in warnings)
    assert any("preset refused" in w and "no-such-model" in w for w in warnings)


def test_a_vanished_folder_keeps_the_loaded_catalog(tmp_path: Path, registry: Path) -> None:
    settings = _settings(tmp_path, registry)
    holder = CatalogHolder(settings)
    watcher = CatalogWatcher(holder)
    away = tmp_path / "presets-away"
    settings.presets.path.rename(away)
    for _ in range(3):
        assert watcher.check() is False
    assert set(holder.catalog.presets.presets) == {"screening"}
    away.rename(settings.presets.path)
    assert watcher.check() is False
    assert set(holder.catalog.presets.presets) == {"screening"}


def test_new_model_version_is_reported(tmp_path: Path) -> None:
    from tests.support.onnx_models import RegistryWriter

    writer = RegistryWriter(tmp_path / "model_registry")
    writer.add(classifier_manifest("green-quality"))
    (tmp_path / "presets").mkdir()
    config = tmp_path / "dicomnode.yaml"
    config.write_text(yaml.safe_dump({"registry": {"path": "model_registry"},
                                      "presets": {"path": "presets"}}), "utf-8")
    holder = CatalogHolder(load_settings(config))
    old = holder.catalog
    writer.add(classifier_manifest("green-quality", "1.1.0"))
    writer.add(classifier_manifest("bad-model"), b"not onnx")
    new = holder.reload()
    changes, problems = catalog_changes(old, new)
    assert changes == ["model added green-quality@1.1.0"]
    assert len(problems) == 1 and problems[0].startswith("model refused bad-model@1.0.0")


def test_watcher_thread_starts_and_stops_promptly(tmp_path: Path, registry: Path) -> None:
    settings = _settings(tmp_path, registry)
    holder = CatalogHolder(settings)
    off = CatalogWatcher(holder)  # watch_seconds: 0 in these settings
    off.start()
    off.stop()
    watcher = CatalogWatcher(holder, interval=0.05)
    watcher.start()
    try:
        (settings.presets.path / "cam9.yaml").write_text(_preset("cam9"), "utf-8")
        deadline = time.monotonic() + 10
        while "cam9" not in holder.catalog.presets.presets and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "cam9" in holder.catalog.presets.presets
    finally:
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 5
