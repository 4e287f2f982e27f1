#!/usr/bin/env python3
"""Ingest benchmark: the same `storescu` burst, from 1 and from 4 parallel `storescu`
processes, to dicomnode (SQLite and PostgreSQL) and to three DCMTK references, in one run:

  storescp           one association at a time, writes files (no fsync: its default)
  storescp --fork    one child process per association (DCMTK's answer to several senders)
  storescp --ignore  receives and discards: the ceiling of the network path itself

dicomnode runs with its durable defaults (every file and folder fsync'd, every row committed
before the success status). Every receiver and every sender uses the same maximum PDU
(--max-pdu, 128 KB by default: the most storescp accepts). Each repetition runs every
(receiver, senders) pair once in a shuffled order (the seed is printed; --seed repeats it).

Printed per pair: images/s (min / median / max over the repetitions), MB/s, CPU ms per
image (utime + stime of the receiver and its child processes, from /proc, from "ready" to
"idle after the burst"; for dicomnode on PostgreSQL plus its server backends) and peak RSS
(VmHWM; for storescp --fork the largest of the parent and its children). Then the ratios
of dicomnode against each reference (ratio of the medians, and the range of the
per-repetition ratios) next to the project's aims: with 4 senders >= 1.5x storescp and
>= 1.0x storescp --fork; >= 0.8x storescp --ignore (with 1 and with 4 senders).

    python scripts/bench_ingest.py                 # 40 OP images, 2000x2000 RGB (12 MB), 3 reps
    python scripts/bench_ingest.py --count 120     # the burst of issue #16 (about 3x longer)
    python scripts/bench_ingest.py --quick         # 4 small images, 1 repetition (smoke test)
    python scripts/bench_ingest.py --databases sqlite --senders 4
    python scripts/bench_ingest.py --processes 1,2     # also dicomnode with 2 receiving processes

PostgreSQL: a fresh database per dicomnode run on the server of the tests (127.0.0.1:5432,
user postgres, trust auth; DICOMNODE_TEST_POSTGRES overrides), dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydicom.uid import generate_uid

from dicomnode.synthetic import op_dataset, synthetic_fundus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/support is shared
from tests.support.databases import POSTGRES_ADMIN_URL
from tests.support.peers import free_port, system_tool

MAX_PDU = 131072  # storescp's own upper limit for --max-pdu
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
AIMS = {  # reference -> (senders the aim applies to, or None for all; minimum ratio)
    "storescp": (4, 1.5),
    "storescp --fork": (4, 1.0),
    "storescp --ignore": (None, 0.8),
}
REFERENCES = tuple(AIMS)


@dataclass(frozen=True)
class Receiver:
    name: str  # as printed: "dicomnode sqlite", "storescp --fork", ...
    database: str | None = None  # dicomnode's: "sqlite" | "postgres"
    flags: tuple[str, ...] = ()  # storescp's
    processes: int = 1  # dicomnode's receive.processes


@dataclass(frozen=True)
class Sample:
    seconds: float
    count: int
    megabytes: float
    cpu_seconds: float
    peak_rss_mb: float

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [s.images_per_second for s in self.samples]

    def median_rate(self) -> float:
        return statistics.median(self.rates())


# --- the receiver's processes, from /proc (no psutil in the environment) ------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2:].split()  # the command name may hold spaces


def _cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` plus cutime + cstime of its children it has waited for."""
    fields = _stat_fields(pid)
    return sum(int(value) for value in fields[11:15])


def _descendants(root: int) -> set[int]:
    """Processes under `root` (this kernel has no /proc/<pid>/task/<tid>/children)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _vm_hwm_kb(pid: int) -> int:
    """Peak resident set size; 0 for a process that is gone or a zombie (no memory left)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and every process under it, alive, zombie or already reaped.

    A child its parent reaps between two reads would be counted twice or not at all: the
    read is repeated until the set of processes is the same before and after it.
    """
    for _ in range(20):
        before = _descendants(root)
        try:
            ticks = _cpu_ticks(root) + sum(_cpu_ticks(pid) for pid in before)
        except (OSError, IndexError):
            continue
        if _descendants(root) == before:
            return ticks / CLOCK_TICK
    raise RuntimeError(f"could not read a consistent CPU total for process {root}")


class PeakWatch:
    """Samples VmHWM of a process and its children (storescp --fork) every 50 ms."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-watch", daemon=True)

    def __enter__(self) -> PeakWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        for pid in (self.root, *_descendants(self.root)):
            self.peaks[pid] = max(self.peaks.get(pid, 0), _vm_hwm_kb(pid))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    @property
    def peak_mb(self) -> float:
        return max(self.peaks.values(), default=0) / 1024


def wait_idle(root: int, *, window: float = 0.5, busy_share: float = 0.1,
              timeout: float = 15.0) -> None:
    """Wait until `root`'s tree uses under `busy_share` of a core over `window` seconds
    (start-up finished; the burst's after-work, e.g. completeness, done)."""
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(root)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = tree_cpu_seconds(root)
        if now - last < busy_share * window:
            return
        last = now


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"receiver did not listen on port {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the burst and the senders --------------------------------------------------------


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


def send(args: argparse.Namespace, port: int, called: str, files: list[Path],
         senders: int) -> float:
    """Send `files` with `senders` parallel storescu processes; return wall seconds."""
    chunks = [files[i::senders] for i in range(senders)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen([args.storescu, "-aet", "BENCH", "-aec", called,
                          "--max-pdu", str(args.max_pdu), "--max-send-pdu", str(args.max_pdu),
                          # storescp takes one association at a time: the others wait their
                          # turn for the A-ASSOCIATE-AC (30 s by default).
                          "--acse-timeout", "600",
                          "127.0.0.1", str(port), *map(str, chunk)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for chunk in chunks if chunk
    ]
    errors = [proc.communicate()[1].decode(errors="replace") for proc in procs]
    seconds = time.perf_counter() - start
    failed = [err for proc, err in zip(procs, errors, strict=True) if proc.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-2000:]}")
    return seconds


def measure(args: argparse.Namespace, proc: subprocess.Popen[bytes], port: int, called: str,
            files: list[Path], senders: int, megabytes: float,
            servers: Callable[[], set[int]] = set) -> Sample:
    """One burst to a listening receiver, with its CPU and peak memory. `servers` lists
    processes outside the receiver's tree that work for it (its PostgreSQL backends)."""
    wait_idle(proc.pid)
    with PeakWatch(proc.pid) as peaks:
        cpu_before = tree_cpu_seconds(proc.pid)
        servers_before = _ticks_of(servers())
        seconds = send(args, port, called, files, senders)
        wait_idle(proc.pid)
        cpu = tree_cpu_seconds(proc.pid) - cpu_before
        servers_after = _ticks_of(servers())
    # A backend that ended during the burst is missed; the node's pool keeps them open.
    cpu += sum(ticks - servers_before.get(pid, 0)
               for pid, ticks in servers_after.items()) / CLOCK_TICK
    return Sample(seconds, len(files), megabytes, cpu, peaks.peak_mb)


def _ticks_of(pids: set[int]) -> dict[int, int]:
    ticks: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            ticks[pid] = _cpu_ticks(pid)
    return ticks


# --- the receivers ---------------------------------------------------------------------


def run_storescp(args: argparse.Namespace, receiver: Receiver, files: list[Path],
                 senders: int, work: Path, megabytes: float) -> Sample:
    port = free_port()
    out = work / "out"
    out.mkdir()
    proc = subprocess.Popen([args.storescp, "-aet", "STORESCP", "-od", str(out),
                             "--max-pdu", str(args.max_pdu), *receiver.flags, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        sample = measure(args, proc, port, "STORESCP", files, senders, megabytes)
    finally:
        stop(proc, timeout=30)
    stored = len(list(out.iterdir()))
    expected = 0 if "--ignore" in receiver.flags else len(files)
    if stored != expected:
        raise RuntimeError(f"{receiver.name} stored {stored} files, expected {expected}")
    return sample


@dataclass(frozen=True)
class NodeDatabase:
    url: str
    backends: Callable[[], set[int]] = set  # the server processes working for the node


@contextlib.contextmanager
def fresh_database(kind: str, work: Path) -> Iterator[NodeDatabase]:
    """A new, empty database for one run: a SQLite file, or a PostgreSQL database dropped
    afterwards (its name keeps clear of the tests' dicomnode_test_* databases)."""
    if kind == "sqlite":
        yield NodeDatabase(f"sqlite:///{work / 'dicomnode.db'}")
        return
    import psycopg

    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"dicomnode_bench_{os.getpid()}_{time.monotonic_ns()}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise SystemExit(f"PostgreSQL not reachable at {admin} ({exc}); "
                         "run with --databases sqlite to leave it out") from exc

    def backends() -> set[int]:
        # Only meaningful where the server runs on this machine (its /proc is ours).
        with psycopg.connect(admin, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                (name,)).fetchall()
        return {int(row[0]) for row in rows}

    try:
        yield NodeDatabase(f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}", backends)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_dicomnode(args: argparse.Namespace, receiver: Receiver, files: list[Path],
                  senders: int, work: Path, megabytes: float) -> Sample:
    assert receiver.database is not None
    port = free_port()
    config = work / "dicomnode.yaml"
    log_path = work / "dicomnode.log"
    with fresh_database(receiver.database, work) as database:
        config.write_text(yaml.safe_dump({
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port,
                     "max_pdu": args.max_pdu},
            "receive": {"processes": receiver.processes},
            "storage": {"path": str(work / "storage")},
            "database": {"url": database.url},
            # No models and no presets (not the repository's, whatever the working folder):
            # ingest alone, with nothing routed to inference.
            "registry": {"path": str(empty_folder(work / "model_registry"))},
            "presets": {"path": str(empty_folder(work / "presets"))},
            "logging": {"level": "INFO"},
            # The console runs, as by default, on a port the system picks (never a fixed
            # 8080 that another node or test may hold).
            "web": {"enabled": True, "port": 0},
        }))
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve",
                                     "--config", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=log, cwd=work)
        try:
            wait_listening(port, proc)
            sample = measure(args, proc, port, "DICOMNODE", files, senders, megabytes,
                             servers=database.backends)
        finally:
            stop(proc)
    log_text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"dicomnode exited with {proc.returncode}:\n{log_text[-3000:]}")
    problems = [line for line in log_text.splitlines()
                if " ERROR " in line or (" WARNING " in line and "callers is empty" not in line)]
    for line in problems[:10]:
        print(f"    dicomnode log: {line}")
    stored = len(list((work / "storage").rglob("*.dcm")))
    if stored != len(files):
        raise RuntimeError(f"dicomnode stored {stored} of {len(files)} files")
    return sample


def empty_folder(path: Path) -> Path:
    path.mkdir()
    return path


def run_one(args: argparse.Namespace, receiver: Receiver, files: list[Path], senders: int,
            work: Path, megabytes: float) -> Sample:
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    try:
        runner = run_dicomnode if receiver.database is not None else run_storescp
        return runner(args, receiver, files, senders, run_dir, megabytes)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        # storescp leaves its files to the page cache: write back now, not during the next
        # receiver's burst.
        os.sync()


# --- the report ------------------------------------------------------------------------


def print_table(results: dict[tuple[str, int], Series], receivers: list[Receiver],
                senders_list: list[int]) -> None:
    print()
    print(f"{'senders':>7}  {'receiver':<20}{'images/s min':>13}{'median':>8}{'max':>8}"
          f"{'MB/s':>7}{'CPU ms/img':>12}{'peak RSS MB':>13}")
    for senders in senders_list:
        for receiver in receivers:
            series = results[(receiver.name, senders)]
            rates = series.rates()
            median = statistics.median(rates)
            mb_per_s = statistics.median(s.megabytes / s.seconds for s in series.samples)
            cpu_ms = statistics.median(1000 * s.cpu_seconds / s.count for s in series.samples)
            rss = max(s.peak_rss_mb for s in series.samples)
            print(f"{senders:>7}  {receiver.name:<20}{min(rates):>13.1f}{median:>8.1f}"
                  f"{max(rates):>8.1f}{mb_per_s:>7.0f}{cpu_ms:>12.1f}{rss:>13.0f}")


def print_ratios(results: dict[tuple[str, int], Series], nodes: list[Receiver],
                 senders_list: list[int]) -> None:
    print()
    print("ratio = images/s of dicomnode / images/s of the reference: the ratio of the medians "
          "(and the range of the per-repetition ratios)")
    print(f"{'ratio':<6}{'database':<10}{'senders':>7}  {'dicomnode / reference':<34}"
          f"{'median':>7}  {'range':<13}{'aim':<7}{'met'}")
    for receiver in nodes:
        database = receiver.name.removeprefix("dicomnode ")
        for senders in senders_list:
            node = results[(receiver.name, senders)]
            for reference in REFERENCES:
                ref = results[(reference, senders)]
                ratio = node.median_rate() / ref.median_rate()
                paired = [n / r for n, r in zip(node.rates(), ref.rates(), strict=True)]
                aim_senders, aim = AIMS[reference]
                applies = aim_senders is None or aim_senders == senders
                aim_text = f">={aim:.1f}x" if applies else "-"
                met = ("yes" if ratio >= aim else "no") if applies else ""
                span = f"{min(paired):.2f}-{max(paired):.2f}"
                print(f"{'ratio':<6}{database:<10}{senders:>7}  "
                      f"{'dicomnode / ' + reference:<34}{ratio:>6.2f}x  {span:<13}"
                      f"{aim_text:<7}{met}")


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=None, help="images in the burst (40)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (2000: 12 MB of RGB)")
    parser.add_argument("--repetitions", type=int, default=None,
                        help="runs of every (receiver, senders) pair (3)")
    parser.add_argument("--senders", default="1,4",
                        help="parallel storescu processes sharing the burst, a list (1,4)")
    parser.add_argument("--databases", default="sqlite,postgres",
                        help="dicomnode's databases, a list of sqlite and postgres")
    parser.add_argument("--processes", default="1",
                        help="dicomnode's receive.processes, a list: one dicomnode receiver "
                             "per value and database, e.g. 1,2 (1)")
    parser.add_argument("--max-pdu", type=int, default=MAX_PDU,
                        help=f"maximum PDU of every receiver and sender ({MAX_PDU})")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the shuffled order (default: a new one, printed)")
    parser.add_argument("--quick", action="store_true",
                        help="4 images of 256x256, 1 repetition: checks the bench runs")
    parser.add_argument("--only-dicomnode", action="store_true",
                        help="leave the storescp references out (for profiling): no ratios")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where files go (default: a temporary folder, removed after)")
    # DCMTK's tools, not the same-named pynetdicom console scripts of an activated venv.
    parser.add_argument("--storescu", default=system_tool("storescu") or "storescu")
    parser.add_argument("--storescp", default=system_tool("storescp") or "storescp")
    args = parser.parse_args()
    count = args.count or (4 if args.quick else 40)
    size = args.size or (256 if args.quick else 2000)
    repetitions = args.repetitions or (1 if args.quick else 3)
    senders_list = [int(n) for n in parse_list(args.senders)]
    databases = parse_list(args.databases)
    if not set(databases) <= {"sqlite", "postgres"} or not databases:
        parser.error("--databases: a list of sqlite and postgres")
    if not 4096 <= args.max_pdu <= MAX_PDU:
        parser.error(f"--max-pdu: 4096..{MAX_PDU} (storescp's range)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)

    processes_list = [int(n) for n in parse_list(args.processes)]
    if not processes_list or min(processes_list) < 1:
        parser.error("--processes: a list of numbers >= 1")
    # "dicomnode sqlite" (one process, the default) or "dicomnode sqlite p2" (two).
    nodes = [Receiver(f"dicomnode {db}" + (f" p{n}" if n > 1 else ""), database=db,
                      processes=n)
             for db in databases for n in processes_list]
    receivers = list(nodes)
    if not args.only_dicomnode:
        receivers += [Receiver("storescp"), Receiver("storescp --fork", flags=("--fork",)),
                      Receiver("storescp --ignore", flags=("--ignore",))]
    results = {(r.name, n): Series() for r in receivers for n in senders_list}
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    try:
        print(f"making {count} OP images of {size}x{size} RGB in {work} ...", flush=True)
        files = make_burst(work / "burst", count, size)
        megabytes = sum(path.stat().st_size for path in files) / 1e6
        print(f"burst: {count} files, {megabytes:.0f} MB; max PDU {args.max_pdu} bytes "
              f"everywhere; {repetitions} repetition(s); seed {seed}", flush=True)
        rng = random.Random(seed)
        for rep in range(1, repetitions + 1):
            pairs = [(r, n) for r in receivers for n in senders_list]
            rng.shuffle(pairs)
            print(f"repetition {rep} order: "
                  + ", ".join(f"{r.name} x{n}" for r, n in pairs), flush=True)
            for receiver, senders in pairs:
                sample = run_one(args, receiver, files, senders, work, megabytes)
                results[(receiver.name, senders)].samples.append(sample)
                print(f"  {receiver.name:<20} {senders} sender(s): {sample.seconds:6.2f} s, "
                      f"{sample.images_per_second:6.1f} images/s, "
                      f"{1000 * sample.cpu_seconds / sample.count:6.1f} CPU ms/image, "
                      f"peak RSS {sample.peak_rss_mb:.0f} MB", flush=True)
        print_table(results, receivers, senders_list)
        if not args.only_dicomnode:
            print_ratios(results, nodes, senders_list)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
