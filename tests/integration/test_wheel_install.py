"""A real package: the wheel, installed into a fresh virtual environment outside any checkout,
gives a working node with `dicomnode init DIR` and `dicomnode serve` run from DIR.

The wheel is built from a copy of the source files (so concurrent runs never share a build
folder), installed with `pip install --no-deps` into a new venv that sees the dependencies
already installed for the tests through a .pth file (no download), and must import dicomnode
from that venv, not from the checkout. storescu sends the demo study; the SR and SEGs must
arrive in Orthanc.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest
import yaml

from tests.support.orthanc import ORTHANC_AET, Orthanc
from tests.support.peers import free_port, require_tool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "dicomnode", "config",
           "presets", "model_registry")


def _copy_sources(target: Path) -> Path:
    target.mkdir(parents=True)
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "_shipped", "*.egg-info"))
        else:
            shutil.copy2(source, target / name)
    return target


def _build_wheel(sources: Path, out: Path) -> Path:
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out)]
    major = int(importlib.metadata.version("setuptools").split(".")[0])
    if major >= 77:
        command.append("--no-build-isolation")  # offline: the installed setuptools builds it
    subprocess.run([*command, str(sources)], check=True, capture_output=True, timeout=300)
    [wheel] = out.glob("dicomnode-*.whl")
    return wheel


def _dependency_paths() -> list[str]:
    """sys.path entries of this interpreter that hold the dependencies, but no dicomnode."""
    stdlib = {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
    keep = []
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        # The checkout's own folders stay out; a venv inside it (CI's .ci-venv) is where the
        # dependencies are, so its site-packages stays in.
        in_checkout = path == ROOT or (ROOT in path.parents and "site-packages" not in path.parts)
        if (not path.is_dir() or str(path) in stdlib or (path / "dicomnode").exists()
                or in_checkout):
            continue
        keep.append(str(path))
    return keep


def _fresh_venv(folder: Path) -> Path:
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(_dependency_paths()) + "\n")
    return folder / "bin"


def test_wheel_in_a_fresh_venv_runs_a_node_outside_the_checkout(tmp_path: Path) -> None:
    storescu = require_tool("storescu", "dcmtk")
    started = time.monotonic()
    wheel = _build_wheel(_copy_sources(tmp_path / "src"), tmp_path / "dist")
    bin_dir = _fresh_venv(tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONNOUSERSITE": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)

    def run(*args: str, cwd: Path = elsewhere) -> str:
        done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    run(str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
        str(wheel))
    where = run(str(bin_dir / "python"), "-c", "import dicomnode; print(dicomnode.__file__)")
    assert Path(where.strip()).is_relative_to(tmp_path / "venv"), where
    node_dir = elsewhere / "node"
    out = run(str(bin_dir / "dicomnode"), "init", str(node_dir))
    assert "config" in out and (node_dir / "config" / "dicomnode.yaml").is_file()
    assert sorted(p.name for p in (node_dir / "presets").glob("*.yaml"))
    assert (node_dir / "model_registry" / "vessel-seg" / "1.0.0" / "model.onnx").is_file()

    pacs = Orthanc(tmp_path / "pacs", free_port(), free_port())
    pacs.start()
    config_path = node_dir / "config" / "dicomnode.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    port = free_port()
    config["node"].update(host="127.0.0.1", port=port, shutdown_grace_seconds=5)
    config["storage"]["min_free_mb"] = 1
    config["completeness"] = {**config["completeness"], "quiet_seconds": 1}
    config["destinations"]["pacs"] = {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                                      "port": pacs.dicom_port}
    config["inference"] = {"providers": ["CPUExecutionProvider"], "poll_seconds": 0.5}
    config["dispatch"] = {"first_delay_seconds": 0.5, "poll_seconds": 0.2}
    config["web"] = {"enabled": False}
    # The shipped glaucoma preset (no vessel model) keeps the run short on a shared CPU.
    config["modality_defaults"]["OP"] = "glaucoma-clinic"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log_path = tmp_path / "node.log"
    run(str(bin_dir / "dicomnode"), "demo-study", "--out", str(tmp_path / "demo"),
        "--size", "384")
    with log_path.open("wb") as log:
        # No --config: the node finds ./config/dicomnode.yaml that init wrote.
        node = subprocess.Popen([str(bin_dir / "dicomnode"), "serve"], cwd=node_dir, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in log_path.read_text(errors="replace"):
            assert node.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.1)
        subprocess.run([storescu, "-aet", "CAM1", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                        *map(str, sorted((tmp_path / "demo").glob("*.dcm")))],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 90
        modalities: list[str] = []
        while modalities.count("SR") < 1 or modalities.count("SEG") < 2:  # SEG: one per eye
            assert time.monotonic() < deadline, (modalities,
                                                 log_path.read_text(errors="replace")[-6000:])
            time.sleep(0.5)
            modalities = [
                str(pacs.get(f"/instances/{i}/simplified-tags")["Modality"])  # type: ignore[index]
                for i in pacs.instance_ids()]
    finally:
        node.terminate()
        node.wait(timeout=30)
        pacs.stop()
    assert modalities.count("SR") == 1 and modalities.count("SEG") == 2, modalities
    assert (node_dir / "var" / "dicomnode.db").is_file()  # state under the node folder
    print(f"wheel to results in {time.monotonic() - started:.1f} s")
