"""`dicomnode deliveries`, `deliveries retry`, `destinations check` against a real Orthanc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dicomnode.cli import main
from dicomnode.db import open_database
from dicomnode.db.models import DeliveryState
from dicomnode.dispatch import outbox
from dicomnode.settings import load_settings
from tests.integration.test_dispatch import _results
from tests.support.orthanc import NODE_AET, ORTHANC_AET, Orthanc
from tests.support.peers import free_port

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, destinations: dict[str, dict[str, object]]) -> Path:
    path = tmp_path / "dicomnode.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"ae_title": NODE_AET},
        "storage": {"path": str(tmp_path / "storage")},
        "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
        "destinations": destinations,
        "dispatch": {"first_delay_seconds": 0, "max_attempts": 1,
                     "connect_timeout_seconds": 2},
    }), encoding="utf-8")
    return path


def test_cli_lists_retries_and_echoes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pacs = Orthanc(tmp_path / "pacs", free_port(), free_port())
    good = {"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": pacs.dicom_port}
    config = _config(tmp_path, {"pacs": good})
    settings = load_settings(config)
    database = open_database(settings.database.url)
    [path] = _results(tmp_path / "out")[:1]
    with database.transaction() as session:
        outbox.enqueue(session, path, ["pacs"])
    claimed = outbox.claim_due(database, settings.dispatch, "test")
    outbox.mark_attempt_failed(database, settings.dispatch, claimed[0].id, "PACS down")
    database.dispose()

    assert main(["deliveries", "--state", "failed", "--json", "--config", str(config)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["state"], row["last_error"]) == (DeliveryState.FAILED, "PACS down")

    assert main(["destinations", "check", "--config", str(config)]) == 1  # PACS is down
    assert "NO" in capsys.readouterr().out
    pacs.start()
    try:
        assert main(["destinations", "check", "--json", "--config", str(config)]) == 0
        [echoed] = json.loads(capsys.readouterr().out)
        assert echoed["ok"] is True
        assert main(["deliveries", "retry", str(row["id"]), "--config", str(config)]) == 0
        assert "1 delivery(ies) queued again" in capsys.readouterr().out
        assert main(["deliveries", "retry", str(row["id"]), "--config", str(config)]) == 2
        assert "pending, not failed" in capsys.readouterr().err
    finally:
        pacs.stop()
