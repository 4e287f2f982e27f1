"""DCMTK storescp as the PACS for integration tests: every reception is its own file.

With `+uf` (unique file names) a second C-STORE of the same SOP Instance UID writes a second
file instead of replacing the first, so the files count how often each object arrived.
`--sleep-after` makes it a slow PACS: it sleeps after each stored object before it reads the
next request, which keeps the sender inside a delivery for that long.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from tests.support.peers import require_tool

STORESCP_AET = "STORESCP"


@dataclass
class StoreScp:
    folder: Path
    port: int
    sleep_after: int = 0
    process: subprocess.Popen[bytes] | None = None
    # `-v`: the log names every association it receives (`associations()` counts them).
    verbose: bool = False

    @property
    def log_path(self) -> Path:
        return self.folder.parent / f"storescp-{self.port}.log"

    def associations(self) -> int:
        """Associations accepted so far (needs `verbose`; the readiness probe of `start`, a
        bare TCP connection, is logged as received but never acknowledged)."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return text.count("Association Acknowledged")

    def start(self, timeout: float = 15.0) -> StoreScp:
        binary = require_tool("storescp", "dcmtk")
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [binary, "-aet", STORESCP_AET, "-od", str(self.folder), "+uf",
                "-pdu", "131072"]
        if self.sleep_after:
            args += ["--sleep-after", str(self.sleep_after)]
        if self.verbose:
            args.append("-v")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([*args, str(self.port)], stdout=log,
                                        stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"storescp exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"storescp did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def files(self) -> int:
        """How many objects it has stored (or is writing) so far."""
        return sum(1 for p in self.folder.iterdir() if p.is_file())

    def receptions(self) -> Counter[str]:
        """SOP Instance UID -> how many times it was stored (one file per reception); call it
        when storescp is idle (a file being written is not yet readable)."""
        counts: Counter[str] = Counter()
        for path in sorted(p for p in self.folder.iterdir() if p.is_file()):
            try:
                header = dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SOPInstanceUID"])
            except (OSError, InvalidDicomError) as exc:
                raise AssertionError(f"the PACS holds an unreadable file {path.name}: {exc}"
                                     ) from exc
            counts[str(header.SOPInstanceUID)] += 1
        return counts
