#!/usr/bin/env python3
"""Profile the receive path with cProfile in every thread: a `storescu` burst into an
in-process receiver (durable defaults, SQLite or PostgreSQL), then the top functions.

    python scripts/profile_ingest.py                       # 20 OP images of 2000x2000, 4 senders
    python scripts/profile_ingest.py --count 8 --size 512 --senders 2 --sort cumulative

pynetdicom runs each association on two threads (its DUL reactor and the association's own);
cProfile only sees the thread that enabled it, so every thread started during the burst gets
its own profiler and their statistics are merged at the end. The CPU time of the process
over the burst (from `os.times`) is printed too: cProfile itself slows Python code down, so
read the table for where the time goes, not for how much there is.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # its siblings as top-level modules, as elsewhere

from bench_ingest import make_burst  # noqa: E402

from dicomnode.db import open_database  # noqa: E402
from dicomnode.receive.ae import Receiver  # noqa: E402
from dicomnode.settings import (  # noqa: E402
    DatabaseSettings,
    NodeSettings,
    Settings,
    StorageSettings,
)
from tests.support.databases import database_url  # noqa: E402
from tests.support.peers import system_tool  # noqa: E402

_profiles: list[cProfile.Profile] = []
_profiles_lock = threading.Lock()
_original_run = threading.Thread.run


def _profiled_run(self: threading.Thread) -> None:
    profile = cProfile.Profile(time.thread_time)  # CPU, not wall: sleeps cost little
    profile.enable()
    try:
        _original_run(self)
    finally:
        profile.disable()
        with _profiles_lock:
            _profiles.append(profile)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--max-pdu", type=int, default=131072)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--no-profile", action="store_true",
                        help="only the CPU time per image, without cProfile's overhead")
    args = parser.parse_args()
    storescu = system_tool("storescu") or "storescu"
    with tempfile.TemporaryDirectory(prefix="profile-ingest-") as tmp:
        work = Path(tmp)
        files = make_burst(work / "burst", args.count, args.size)
        with database_url(args.database, work) as url:
            settings = Settings(
                node=NodeSettings(host="127.0.0.1", port=_free_port(), max_pdu=args.max_pdu),
                storage=StorageSettings(path=work / "storage", min_free_mb=1),
                database=DatabaseSettings(url=url),
            )
            database = open_database(url)
            receiver = Receiver(settings, database)
            if not args.no_profile:
                threading.Thread.run = _profiled_run  # type: ignore[method-assign]
            _host, port = receiver.start()
            chunks = [files[i::args.senders] for i in range(args.senders)]
            before = os.times()
            start = time.perf_counter()
            procs = [subprocess.Popen([storescu, "-aet", "PROFILE", "-aec", "DICOMNODE",
                                       "--max-pdu", str(args.max_pdu),
                                       "--max-send-pdu", str(args.max_pdu),
                                       "127.0.0.1", str(port), *map(str, chunk)])
                     for chunk in chunks if chunk]
            for proc in procs:
                if proc.wait() != 0:
                    raise SystemExit("storescu failed")
            seconds = time.perf_counter() - start
            receiver.stop(5)
            after = os.times()
            threading.Thread.run = _original_run  # type: ignore[method-assign]
            database.dispose()
    cpu = (after.user - before.user) + (after.system - before.system)
    print(f"{args.count} images, {args.senders} sender(s): {seconds:.2f} s, "
          f"{1000 * cpu / args.count:.1f} CPU ms/image (user "
          f"{1000 * (after.user - before.user) / args.count:.1f}, system "
          f"{1000 * (after.system - before.system) / args.count:.1f})"
          + ("" if args.no_profile else ", under cProfile"))
    if args.no_profile:
        return 0
    with _profiles_lock:
        profiles = list(_profiles)
    out = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=out)
    for profile in profiles[1:]:
        stats.add(profile)
    stats.sort_stats(args.sort).print_stats(args.top)
    print(out.getvalue())
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
