"""Run dicomnode as a real subprocess (`python -m dicomnode.cli serve`) for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db.engine import Database
from dicomnode.db.models import Delivery, DeliveryState, Job, JobState, ResultSet, ResultSetState
from tests.support.peers import free_port

NODE_AE = "DICOMNODE"


def write_config(directory: Path, db_url: str, **overrides: Any) -> Path:
    """A settings file for a test node on a free loopback port; sections merge `overrides`."""
    config: dict[str, Any] = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port(),
                 "shutdown_grace_seconds": 5},
        "callers": [],
        "storage": {"path": str(directory / "storage"), "min_free_mb": 1},
        "database": {"url": db_url},
        "completeness": {"quiet_seconds": 1, "sweep_seconds": 1},
        "logging": {"level": "INFO"},
        # Off unless a test asks: nodes of concurrent test runs would all want port 8080.
        "web": {"enabled": False},
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **value}
        else:
            config[section] = value
    path = directory / "dicomnode.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def classifier_node_config(directory: Path, presets: dict[str, dict[str, Any]],
                           **overrides: Any) -> tuple[Path, str]:
    """A SQLite node with one tiny fixture model (`image-quality`, a classifier on OP) and
    these presets (id -> fields over an SR-only preset of that model); returns the settings
    file and the database URL. `overrides` as for `write_config`."""
    from tests.support.onnx_models import RegistryWriter, classifier_manifest

    RegistryWriter(directory / "registry").add(
        classifier_manifest("image-quality", gate=False, modalities=("OP",)))
    folder = directory / "presets"
    folder.mkdir()
    for preset_id, fields in presets.items():
        body = {"id": preset_id, "name": preset_id, "audience": "tests",
                "description": preset_id, "models": ["image-quality"],
                "outputs": {"sr": True, "seg": False, "overlay": False}, **fields}
        (folder / f"{preset_id}.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    db_url = f"sqlite:///{directory / 'node.db'}"
    return write_config(directory, db_url, registry={"path": str(directory / "registry")},
                        presets={"path": str(folder)}, **overrides), db_url


class NodeProcess:
    """One `dicomnode serve` process; its log goes to a file for failure messages."""

    def __init__(self, config: Path) -> None:
        self.config = config
        settings = yaml.safe_load(config.read_text(encoding="utf-8"))
        self.port: int = settings["node"]["port"]
        self.storage = Path(settings["storage"]["path"])
        self.log_path = config.with_suffix(f".{time.monotonic_ns()}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    # Generous: a start is ~3 s of CPU, but the suite runs 4 workers on 2 cores and a loaded
    # machine took 33 s to import the node; the wait ends as soon as the node listens.
    def start(self, timeout: float = 90.0) -> NodeProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            # The node logs its address once it listens (no probe connection needed).
            if "listening on" in self.log():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"node did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash or power cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def results_delivered(session: Session, study_uid: str | None = None) -> bool:
    """Every done/partial job's result set encoded and every delivery sent (of one study).

    The node queues each SEG and overlay as it is built and the SR last, so "every delivery
    sent" alone can hold while the report is still being built; the result set turns
    `encoded` only with the SR's commit.
    """
    jobs = select(Job.id).where(Job.state.in_((JobState.DONE, JobState.PARTIAL)))
    deliveries = select(Delivery.state)
    if study_uid is not None:
        jobs = jobs.where(Job.study_uid == study_uid)
        deliveries = deliveries.where(Delivery.study_uid == study_uid)
    job_ids = list(session.scalars(jobs))
    encoded = set(session.scalars(
        select(ResultSet.job_id).where(ResultSet.state == ResultSetState.ENCODED)))
    states = list(session.scalars(deliveries))
    return (bool(job_ids) and all(j in encoded for j in job_ids)
            and bool(states) and all(s == DeliveryState.SENT for s in states))


def wait_until_delivered(database: Database, node: NodeProcess, timeout: float,
                         poll: float = 0.3) -> None:
    """Wait until the node has encoded its results and sent every one; fail with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with database.transaction() as session:
            if results_delivered(session):
                return
        time.sleep(poll)
    pytest.fail(f"results not delivered; node log:\n{node.log()[-6000:]}")
