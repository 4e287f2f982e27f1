"""`evaluate --record` keeps the manifest's shape: comments, key order and style stay, the only
changed lines are the new metrics record's; `--name` / `--split` name the dataset."""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicomnode.cli import main
from tests.unit.test_evaluate_cli import SIZE, _csv, _image, _no_crop, config  # noqa: F401

MANIFEST = Path("registry") / "mask-fraction" / "1.0.0" / "manifest.yaml"


def _added(before: str, after: str) -> tuple[list[str], list[str]]:
    diff = [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return ([d[1:] for d in diff if d.startswith("+")], [d for d in diff if d.startswith("-")])


def _dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    rows = []
    for columns, truth in ((8, 0.2), (16, 0.6)):
        plane = np.zeros((SIZE, SIZE), np.uint8)
        plane[:, :columns] = 255
        rows.append(f"{_image(folder / f'm{columns}.tif', plane)},{truth}")
    return _csv(folder / "fractions.csv", "image,value", rows)


def _comment(path: Path) -> str:
    """Give the fixture manifest a person's touch: comments, and an earlier record."""
    data = yaml.safe_load(path.read_text("utf-8"))
    lines = yaml.safe_dump(data, sort_keys=False).splitlines()
    out = ["# manifest: mask-fraction 1.0.0 (hand-edited)"]
    for line in lines:
        if line.startswith("name:"):
            line += "   # as shown in the console"
        out.append(line)
    # (PyYAML writes lists at the key's indent; a file keeps one list style throughout.)
    out += ["metrics:", "# measured by hand before dicomnode could",
            "- {dataset: pilot, split: test, date: '2026-01-02', figures: {mae: 0.5}}"]
    text = "\n".join(out) + "\n"
    path.write_text(text, "utf-8")
    return text


@pytest.mark.parametrize("existing", [True, False])
def test_record_changes_only_the_new_lines(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
    existing: bool,
) -> None:
    path = tmp_path / MANIFEST
    before = _comment(path) if existing else path.read_text("utf-8")
    csv_path = _dataset(tmp_path)
    assert main(["evaluate", "mask-fraction", "--dataset", str(csv_path), "--record",
                 "--name", "CHASE_DB1 11L-14R", "--split", "test",
                 "--config", str(config)]) == 0
    capsys.readouterr()
    after = path.read_text("utf-8")
    added, removed = _added(before, after)
    assert removed == []
    assert added[0].lstrip().startswith("- ") or added[0] == "metrics:"
    record = yaml.safe_load(after)["metrics"][-1]
    assert (record["dataset"], record["split"]) == ("CHASE_DB1 11L-14R", "test")
    assert record["figures"]["mae"] == pytest.approx(0.075)
    # Every added line belongs to the record (and the key, when there was none).
    assert len(added) == (len(record) + (0 if existing else 1))
    if existing:
        assert after.startswith(before.rstrip("\n"))
        assert "# measured by hand before dicomnode could" in after
    assert main(["models", "check", "--config", str(config)]) == 0


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "model_registry").glob("*/*/manifest.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.parent.name}@{p.parent.name}")
def test_shipped_manifests_get_only_the_record_appended(path: Path) -> None:
    from dicomnode.evaluate.record import _appended

    before = path.read_text("utf-8")
    record = {"dataset": "set", "split": "test", "date": "2026-12-01",
              "figures": {"mae": 0.25}, "notes": "n"}
    after = _appended(before, record)
    added, removed = _added(before, after)
    assert removed == [], removed
    assert yaml.safe_load(after)["metrics"][-1] == record
    assert len(added) == len(record) + (0 if "metrics" in yaml.safe_load(before) else 1)
