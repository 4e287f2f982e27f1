#!/usr/bin/env python3
"""Ingest benchmark: the same `storescu` burst to dicomnode, to DCMTK `storescp`, and to
`storescp --ignore` (the sender's receive-and-discard ceiling), in one run.

    python scripts/bench_ingest.py                  # 200 OP images of 2000x2000 RGB
    python scripts/bench_ingest.py --count 50 --size 1000

Prints images/s and MB/s of each, dicomnode/storescp, and dicomnode's peak RSS. dicomnode
runs with its defaults: SQLite, every file and its folder fsync'd, every row committed
before the success status; storescp writes files without fsync (its default).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydicom.uid import generate_uid

from dicomnode.synthetic import op_dataset, synthetic_fundus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/support is shared
from tests.support.peers import system_tool


@dataclass(frozen=True)
class Result:
    name: str
    seconds: float
    count: int
    megabytes: float

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.megabytes / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_burst(directory: Path, count: int, size: int) -> list[Path]:
    """`count` Ophthalmic Photography files, two eyes per study, one picture per eye reused."""
    directory.mkdir(parents=True, exist_ok=True)
    pictures = {lat: synthetic_fundus(size, lat, 0) for lat in ("R", "L")}
    paths: list[Path] = []
    study_uid = generate_uid()
    for index in range(count):
        laterality = "R" if index % 2 == 0 else "L"
        if index % 2 == 0:
            study_uid = generate_uid()
        ds = op_dataset(pictures[laterality], laterality=laterality,  # type: ignore[arg-type]
                        patient_id=f"BENCH{index // 2:04d}", study_uid=study_uid)
        path = directory / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("receiver did not start listening")


def send(storescu: str, port: int, called: str, files: list[Path], senders: int) -> float:
    """Send `files` with `senders` parallel storescu processes; return wall seconds."""
    chunks = [files[i::senders] for i in range(senders)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen([storescu, "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
                          *map(str, chunk)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for chunk in chunks if chunk
    ]
    errors = [proc.communicate()[1].decode(errors="replace") for proc in procs]
    seconds = time.perf_counter() - start
    failed = [err for proc, err in zip(procs, errors, strict=True) if proc.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-2000:]}")
    return seconds


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_storescp(args: argparse.Namespace, files: list[Path], work: Path, *, ignore: bool,
                 megabytes: float) -> Result:
    port = free_port()
    out = work / ("ignore" if ignore else "storescp")
    out.mkdir()
    cmd = [args.storescp, "-aet", "STORESCP", "-od", str(out)]
    if ignore:
        cmd.append("--ignore")
    proc = subprocess.Popen([*cmd, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        seconds = send(args.storescu, port, "STORESCP", files, args.senders)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    stored = len(list(out.iterdir()))
    if not ignore and stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} files")
    name = "storescp --ignore" if ignore else "storescp"
    return Result(name, seconds, len(files), megabytes)


def run_dicomnode(args: argparse.Namespace, files: list[Path], work: Path,
                  megabytes: float) -> tuple[Result, float]:
    port = free_port()
    node_dir = work / "dicomnode"
    node_dir.mkdir()
    config = node_dir / "dicomnode.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
        "storage": {"path": "./storage", "min_free_mb": 1024},
        "database": {"url": args.database or "sqlite:///./dicomnode.db"},
        "completeness": {"quiet_seconds": 5},
        "logging": {"level": "INFO"},
    }))
    log_path = node_dir / "dicomnode.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                                 str(config)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_listening(port, proc)
        seconds = send(args.storescu, port, "DICOMNODE", files, args.senders)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"dicomnode exited with {proc.returncode}:\n{tail}")
    problems = [line for line in log_path.read_text(errors="replace").splitlines()
                if " ERROR " in line or (" WARNING " in line and "callers is empty" not in line)]
    for line in problems[:20]:
        print(f"  dicomnode log: {line}")
    stored = len(list((node_dir / "storage").rglob("*.dcm")))
    if stored != len(files):
        raise RuntimeError(f"dicomnode stored {stored} of {len(files)} files")
    return Result("dicomnode", seconds, len(files), megabytes), rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="images in the burst (200)")
    parser.add_argument("--size", type=int, default=2000, help="image side in pixels (2000)")
    parser.add_argument("--senders", type=int, default=1,
                        help="parallel storescu processes sharing the burst (1)")
    parser.add_argument("--database", default=None,
                        help="dicomnode database URL (default: SQLite in the work folder)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where files go (default: a temporary folder, removed after)")
    parser.add_argument("--only-dicomnode", action="store_true",
                        help="measure dicomnode alone (for profiling)")
    # DCMTK's tools, not the same-named pynetdicom console scripts of an activated venv.
    parser.add_argument("--storescu", default=system_tool("storescu") or "storescu")
    parser.add_argument("--storescp", default=system_tool("storescp") or "storescp")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    try:
        print(f"making {args.count} OP images of {args.size}x{args.size} RGB in {work} ...",
              flush=True)
        files = make_burst(work / "burst", args.count, args.size)
        megabytes = sum(path.stat().st_size for path in files) / 1e6
        print(f"burst: {args.count} files, {megabytes:.0f} MB; "
              f"{args.senders} storescu process(es)", flush=True)
        if args.only_dicomnode:
            node, rss = run_dicomnode(args, files, work, megabytes)
            print(f"dicomnode: {node.seconds:.2f} s, {node.images_per_second:.1f} images/s, "
                  f"peak RSS {rss:.0f} MB")
            return 0
        ceiling = run_storescp(args, files, work, ignore=True, megabytes=megabytes)
        dcmtk = run_storescp(args, files, work, ignore=False, megabytes=megabytes)
        node, rss = run_dicomnode(args, files, work, megabytes)
        print()
        print(f"{'receiver':<20}{'seconds':>9}{'images/s':>10}{'MB/s':>9}")
        for result in (ceiling, dcmtk, node):
            print(f"{result.name:<20}{result.seconds:>9.2f}{result.images_per_second:>10.1f}"
                  f"{result.megabytes_per_second:>9.0f}")
        print()
        print(f"dicomnode / storescp: {node.images_per_second / dcmtk.images_per_second:.2f}x")
        print(f"dicomnode / storescp --ignore: "
              f"{node.images_per_second / ceiling.images_per_second:.2f}x")
        print(f"dicomnode peak RSS: {rss:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
