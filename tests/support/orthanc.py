"""Orthanc as the PACS for integration tests: a process on free ports, REST on loopback only
(Orthanc 1.10 has no bind option; PITFALLS.md)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.peers import require_tool, unavailable

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ORTHANC_AET = "PACSTEST"
NODE_AET = "DICOMNODE"


@dataclass
class Orthanc:
    """An Orthanc process on free ports, answering REST on loopback only."""

    folder: Path
    dicom_port: int
    http_port: int
    process: subprocess.Popen[bytes] | None = None
    # With the DICOMweb plugin (Debian orthanc-dicomweb) at /dicom-web/ on the HTTP port.
    dicomweb: bool = False
    # HTTP basic-auth users (REST and DICOMweb); None = no authentication.
    users: dict[str, str] | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> None:
        binary = require_tool("Orthanc", "orthanc")
        config = {
            "Name": "dicomnode-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.users is not None,
            "RegisteredUsers": self.users or {},
            "DicomCheckCalledAet": True,  # a wrong AE title is refused, as a PACS would
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {"node": [NODE_AET, "127.0.0.1", 104]},
            "Plugins": [self._dicomweb_plugin()] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([binary, str(path)], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        raise RuntimeError(f"Orthanc did not start; see {self.folder / 'orthanc.log'}")

    @staticmethod
    def _dicomweb_plugin() -> str:
        plugin = Path(DICOMWEB_PLUGIN)
        if not plugin.exists():
            unavailable(f"{plugin} not found (apt-get install orthanc-dicomweb)")
        return str(plugin)

    def _open(self, path: str, timeout: float) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return urllib.request.urlopen(request, timeout=timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def get(self, path: str) -> object:
        with self._open(path, 5) as r:
            return json.loads(r.read())

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of every stored instance (one entry per stored copy)."""
        ids = self.get("/instances")
        assert isinstance(ids, list)
        uids = []
        for orthanc_id in ids:
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            assert isinstance(tags, dict)
            uids.append(str(tags["SOPInstanceUID"]))
        return uids

    def instance_ids(self) -> list[str]:
        ids = self.get("/instances")
        assert isinstance(ids, list)
        return [str(i) for i in ids]

    def download(self, orthanc_id: str, target: Path) -> Path:
        """The stored file of one instance, as the PACS would hand it to a viewer."""
        with self._open(f"/instances/{orthanc_id}/file", 30) as response:
            target.write_bytes(response.read())
        return target
