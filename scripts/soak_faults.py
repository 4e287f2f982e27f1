#!/usr/bin/env python3
"""Soak under faults (issue 14's "done when"): a node fed thousands of mutated instances over
real associations, interleaved with good studies, while idle sockets hold connections open
and PostgreSQL cuts the node's database connections every few seconds.

    python scripts/soak_faults.py                      # 4,000 mutants, PostgreSQL
    python scripts/soak_faults.py --count 50           # a quick smoke run
    python scripts/soak_faults.py --database sqlite    # no flapping (nothing to cut)

Parts, all real: `dicomnode serve` in its own process with tiny fixture models (a
segmentation -> SEG + SR, delivered), DCMTK storescp as the PACS, pynetdicom senders that send
the mutants' bytes as they are (seeded `random_mutant` variants of a synthetic OP image, each
under its own study), DCMTK storescu sending a good two-eye study every `--good-every`
mutants, `--idle-sockets` TCP connections that send two bytes and go silent (reopened when
the node closes them), and `pg_terminate_backend` on every connection of the node's database
each `--flap-seconds`.

When everything is sent, the faults go on until the node has settled (every study final,
every delivery sent or failed) or `--settle-minutes` pass. Then it checks:
- every good study is `done` and each of its result objects reached the PACS;
- every mutant ended visibly: refused with a failure status, or stored and its study final
  (done, partial; failed or not-routed with a reason in the audit trail);
  none acknowledged and then lost, none left in a non-final state;
- no synthetic patient name in the node's log;
and prints a summary (exit status 1 if a check failed). The work folder is removed unless
`--keep` names one.
"""

from __future__ import annotations

import argparse
import random
import select as select_module
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from sqlalchemy import func, or_, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fixture models and peers live in tests/support

from dicomnode.db.engine import Database  # noqa: E402
from dicomnode.db.models import (  # noqa: E402
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    ResultSet,
    ResultSetState,
    Study,
)
from tests.support.databases import POSTGRES_ADMIN_URL  # noqa: E402
from tests.support.dicom_files import dataset_bytes, write_op, write_study  # noqa: E402
from tests.support.executor_fixtures import write_fuzz_screening  # noqa: E402
from tests.support.mutate import random_mutant  # noqa: E402
from tests.support.node import NODE_AE, NodeProcess, write_config  # noqa: E402
from tests.support.peers import free_port, system_tool  # noqa: E402
from tests.support.storescp import STORESCP_AET, StoreScp  # noqa: E402

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
FUZZ_NAME = "Soakfuzz^Patient"
GOOD_NAME = "Soakgood^Patient"
FINAL = {"done", "partial", "failed", "not-routed"}
# Audit kinds that say why a study was not (fully) processed.
NO_ASSOCIATION = "no association in 20 tries"
REASON_KINDS = ("job-failed", "not-processed", "not-routed", "results-failed", "job-partial")


@dataclass
class Mutant:
    index: int
    study_uid: str
    sop_uid: str
    path: Path
    status: int | None = None  # None: no answer (association aborted or lost)
    error: str | None = None


@dataclass
class Tally:
    mutants: list[Mutant] = field(default_factory=list)
    good: list[tuple[str, list[Path]]] = field(default_factory=list)
    good_send_failures: list[str] = field(default_factory=list)
    reassociations: int = 0
    association_failures: int = 0
    idle_opened: int = 0
    idle_closed_by_node: int = 0
    backends_killed: int = 0
    flaps: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


# -- peers and fixtures ------------------------------------------------------------------------


@contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg

    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"dicomnode_soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flap_database(db_name: str, every: float, stop: threading.Event, tally: Tally) -> None:
    """Terminate every connection to the node's database each `every` seconds."""
    import psycopg

    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        while not stop.wait(every):
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", [db_name]).fetchone()
            with tally.lock:
                tally.flaps += 1
                tally.backends_killed += int(row[0]) if row else 0


def idle_sockets(port: int, count: int, stop: threading.Event, tally: Tally) -> None:
    """Keep `count` connections open that sent two bytes and nothing more; reopen each one
    the node closes (it must, after node.association_request_timeout_seconds)."""
    open_sockets: list[socket.socket] = []

    def open_one() -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"\x01\x00")  # the start of an A-ASSOCIATE-RQ, then silence
            open_sockets.append(sock)
            with tally.lock:
                tally.idle_opened += 1
        except OSError:
            pass

    while not stop.is_set():
        while len(open_sockets) < count and not stop.is_set():
            open_one()
        readable, _, _ = select_module.select(open_sockets, [], [], 0.5)
        for sock in readable:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:  # closed by the node
                open_sockets.remove(sock)
                sock.close()
                with tally.lock:
                    tally.idle_closed_by_node += 1
    for sock in open_sockets:
        sock.close()


# -- the senders -------------------------------------------------------------------------------


class Sender:
    """One pynetdicom association at a time that sends files' data set bytes as they are."""

    def __init__(self, port: int, tally: Tally) -> None:
        self.port, self.tally = port, tally
        self.ae = AE(ae_title="FUZZER")
        self.ae.add_requested_context(OP_8BIT, pydicom.uid.ExplicitVRLittleEndian)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 60
        self.assoc: Any = None

    def send(self, mutant: Mutant) -> None:
        for _ in range(20):
            if self.assoc is None or not self.assoc.is_established:
                self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
                with self.tally.lock:
                    self.tally.reassociations += 1
                if not self.assoc.is_established:
                    with self.tally.lock:
                        self.tally.association_failures += 1
                    time.sleep(0.5)
                    continue
            try:
                status = self.assoc.send_c_store(mutant.path)
            except (ValueError, RuntimeError, AttributeError) as exc:
                mutant.error = f"{type(exc).__name__}: {exc}"
                return
            mutant.status = int(status.Status) if status is not None and "Status" in status \
                else None
            return
        mutant.error = NO_ASSOCIATION

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def make_mutant(work: Path, template: Path, index: int, rng: random.Random) -> Mutant:
    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = f"{FUZZ_NAME}{index:04d}"
    clean = work / f"clean-{threading.get_ident()}.dcm"
    ds.save_as(clean, enforce_file_format=True)
    raw = clean.read_bytes()
    body = dataset_bytes(clean)
    path = work / "mutants" / f"{index:05d}.dcm"
    path.write_bytes(raw[:len(raw) - len(body)] + random_mutant(body, rng))
    return Mutant(index, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), path)


def send_good(storescu: str, port: int, work: Path, index: int, tally: Tally) -> None:
    study_uid, files = write_study(work / "good" / f"{index:03d}", size=64,
                                   patient_id=f"GOOD{index:03d}")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName = GOOD_NAME
        ds.save_as(path, enforce_file_format=True)
    for attempt in range(5):  # a camera retries a failed send
        sent = subprocess.run(
            [storescu, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1", str(port),
             *map(str, files)], capture_output=True, text=True, timeout=120)
        if sent.returncode == 0:
            break
        with tally.lock:
            tally.good_send_failures.append(
                f"good study {index} attempt {attempt + 1}: {sent.stderr.strip()[-300:]}")
        time.sleep(1)
    with tally.lock:
        tally.good.append((study_uid, files))


# -- checks ------------------------------------------------------------------------------------


def settled(database: Database) -> tuple[bool, Counter[str], Counter[str]]:
    """Every study final, every finished job's results encoded or failed (a study is `done`
    before its results are made), every delivery sent or failed."""
    with database.transaction() as session:
        studies = Counter(session.scalars(select(Study.state)).all())
        deliveries = Counter(session.scalars(select(Delivery.state)).all())
        unencoded = session.scalar(
            select(func.count()).select_from(Job)
            .outerjoin(ResultSet, ResultSet.job_id == Job.id)
            .where(Job.state.in_(("done", "partial")), Job.output_path.is_not(None),
                   or_(ResultSet.id.is_(None), ResultSet.state == ResultSetState.PENDING)))
    if unencoded:
        studies[f"(finished jobs not yet encoded: {unencoded})"] = 0
    done = (not unencoded and all(s in FINAL for s in studies)
            and all(d in (DeliveryState.SENT, DeliveryState.FAILED) for d in deliveries))
    return done, studies, deliveries


def mutated_uids(path: Path) -> tuple[str | None, str | None]:
    """The Study and SOP Instance UIDs a mutant carries (a mutation may have hit them)."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return str(ds.get("StudyInstanceUID", "")) or None, str(ds.get("SOPInstanceUID", ""))
    except Exception:  # a mutant pydicom cannot read at all
        return None, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="mutated instances")
    parser.add_argument("--good-every", type=int, default=200,
                        help="a good two-eye study after this many mutants")
    parser.add_argument("--senders", type=int, default=3, help="parallel mutant senders")
    parser.add_argument("--idle-sockets", type=int, default=6)
    parser.add_argument("--flap-seconds", type=float, default=3.0)
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--settle-minutes", type=float, default=30.0)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp one)")
    args = parser.parse_args()

    storescu = system_tool("storescu")
    if storescu is None or system_tool("storescp") is None:
        print("DCMTK storescu/storescp not found (apt-get install dcmtk)", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="dicomnode-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "mutants").mkdir(exist_ok=True)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the mutants' bytes as they are
    tally = Tally()
    started = time.monotonic()
    with (postgres_database() if args.database == "postgres" else _sqlite(work)) as db_name:
        db_url = (f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{db_name}"
                  if args.database == "postgres" else db_name)
        pacs = StoreScp(work / "pacs", free_port()).start()
        registry, presets = write_fuzz_screening(work, "soak")
        config = write_config(
            work, db_url,
            node={"association_request_timeout_seconds": 5, "max_associations": 16},
            callers=[{"ae_title": "FUZZER"}, {"ae_title": "CAM1"}],
            completeness={"quiet_seconds": 1, "sweep_seconds": 1},
            destinations={"pacs": {"ae_title": STORESCP_AET, "host": "127.0.0.1",
                                   "port": pacs.port}},
            registry={"path": str(registry)}, presets={"path": str(presets)},
            inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.5},
            results={"retry_seconds": 2},
            dispatch={"poll_seconds": 0.5, "first_delay_seconds": 0.5, "factor": 1.5,
                      "max_delay_seconds": 5, "max_attempts": 1000},
        )
        node = NodeProcess(config).start(timeout=120)
        stop_faults = threading.Event()
        faults = [threading.Thread(target=idle_sockets, daemon=True,
                                   args=(node.port, args.idle_sockets, stop_faults, tally))]
        if args.database == "postgres":
            faults.append(threading.Thread(target=flap_database, daemon=True,
                                           args=(db_name, args.flap_seconds, stop_faults,
                                                 tally)))
        for thread in faults:
            thread.start()
        template = write_op(work / "template.dcm", size=64)
        indexes = iter(range(args.count))
        index_lock = threading.Lock()

        def mutant_sender(worker: int) -> None:
            rng = random.Random(args.seed * 1000 + worker)
            sender = Sender(node.port, tally)
            try:
                while True:
                    with index_lock:
                        index = next(indexes, None)
                    if index is None:
                        return
                    mutant = make_mutant(work, template, index, rng)
                    sender.send(mutant)
                    with tally.lock:
                        tally.mutants.append(mutant)
                    if index % args.good_every == args.good_every - 1:
                        send_good(storescu, node.port, work, index // args.good_every, tally)
            finally:
                sender.close()

        senders = [threading.Thread(target=mutant_sender, args=(w,), daemon=True)
                   for w in range(args.senders)]
        for thread in senders:
            thread.start()
        database = Database(db_url)
        last = 0.0
        while any(t.is_alive() for t in senders):
            time.sleep(1)
            if time.monotonic() - last > 30:
                last = time.monotonic()
                print(f"[{time.monotonic() - started:6.0f} s] sent {len(tally.mutants)} "
                      f"mutants, {len(tally.good)} good studies; node alive: "
                      f"{node.proc is not None and node.proc.poll() is None}", flush=True)
        send_done = time.monotonic()
        send_good(storescu, node.port, work, 999, tally)  # one more, after all mutants
        deadline = time.monotonic() + args.settle_minutes * 60
        while time.monotonic() < deadline:
            try:
                done, studies, deliveries = settled(database)
            except Exception as exc:  # the flapping also cuts this script's connection
                print(f"  (settle check failed: {type(exc).__name__}; again)", flush=True)
                time.sleep(2)
                continue
            if done:
                break
            if time.monotonic() - last > 30:
                last = time.monotonic()
                print(f"[{time.monotonic() - started:6.0f} s] settling: studies "
                      f"{dict(studies)}, deliveries {dict(deliveries)}", flush=True)
            time.sleep(2)
        settle_done = time.monotonic()
        stop_faults.set()
        for thread in faults:
            thread.join(10)
        alive = node.proc is not None and node.proc.poll() is None
        time.sleep(2)
        ok = report(args, tally, database, node, pacs, alive,
                    send_s=send_done - started, settle_s=settle_done - send_done)
        database.dispose()
        if alive:
            node.terminate(timeout=60)
        pacs.stop()
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


@contextmanager
def _sqlite(work: Path) -> Iterator[str]:
    yield f"sqlite:///{work / 'node.db'}"


def report(args: argparse.Namespace, tally: Tally, database: Database, node: NodeProcess,
           pacs: StoreScp, alive: bool, *, send_s: float, settle_s: float) -> bool:
    with database.transaction() as session:
        study_state = dict(session.execute(select(Study.study_uid, Study.state)).all())
        held = dict(session.execute(
            select(Instance.sop_instance_uid, Study.study_uid).join(Study)).all())
        reasons: dict[str, list[str]] = {}
        for uid, kind, detail in session.execute(
                select(AuditEvent.study_uid, AuditEvent.kind, AuditEvent.detail)
                .where(AuditEvent.kind.in_(REASON_KINDS))):
            reasons.setdefault(str(uid), []).append(f"{kind}: {detail or ''}")
        deliveries: dict[str, list[tuple[str, str]]] = {}
        for study_uid, sop_uid, state in session.execute(
                select(Delivery.study_uid, Delivery.sop_instance_uid, Delivery.state)):
            deliveries.setdefault(str(study_uid), []).append((str(sop_uid), str(state)))
        refusals = session.scalar(select(AuditEvent.id).where(AuditEvent.kind == "refused")
                                  .order_by(AuditEvent.id.desc()).limit(1))
        refused_rows = len(session.scalars(select(AuditEvent.id)
                                           .where(AuditEvent.kind == "refused")).all())
        retries = len(session.scalars(select(AuditEvent.id)
                                      .where(AuditEvent.kind == "database-retry")).all())
    received = pacs.receptions()
    problems: list[str] = []

    outcome: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for m in tally.mutants:
        if m.status is None:
            statuses[m.error or "none"] += 1
            if m.error == NO_ASSOCIATION:  # the node would not take it at all
                outcome["NOT SENT: NO ASSOCIATION"] += 1
                problems.append(f"mutant {m.index}: {NO_ASSOCIATION}")
            else:
                outcome["no answer (association aborted)"] += 1
            continue
        statuses[f"0x{m.status:04X}"] += 1
        if m.status != 0x0000 and m.status not in (0xB000, 0xB006, 0xB007):
            outcome["refused with a failure status"] += 1
            continue
        study_uid = held.get(m.sop_uid)
        if study_uid is None:  # the mutation may have hit the UIDs themselves
            mutated_study, mutated_sop = mutated_uids(m.path)
            study_uid = held.get(mutated_sop or "") or (
                mutated_study if mutated_study in study_state else None)
        if study_uid is None:
            outcome["ACKNOWLEDGED BUT NOT HELD"] += 1
            problems.append(f"mutant {m.index} acknowledged 0x{m.status:04X} but not held")
            continue
        state = study_state.get(study_uid, "?")
        if state not in FINAL:
            outcome[f"STUCK ({state})"] += 1
            problems.append(f"mutant {m.index}: study {study_uid} left {state}")
        elif state in ("failed", "not-routed") and not reasons.get(study_uid):
            outcome[f"{state} WITHOUT A REASON"] += 1
            problems.append(f"mutant {m.index}: study {study_uid} {state} with no reason")
        else:
            sent = all(s == DeliveryState.SENT for _, s in deliveries.get(study_uid, []))
            outcome[f"stored, study {state}" + ("" if sent else ", NOT ALL DELIVERED")] += 1
            if not sent:
                problems.append(f"mutant {m.index}: study {study_uid} results not delivered")

    good_ok = 0
    for good_uid, _files in tally.good:
        objects = deliveries.get(good_uid, [])
        good_state = study_state.get(good_uid)
        at_pacs = bool(objects) and all(s == DeliveryState.SENT and received[uid] >= 1
                                        for uid, s in objects)
        if good_state == "done" and at_pacs:
            good_ok += 1
        else:
            problems.append(f"good study {good_uid}: {good_state}, deliveries {objects}")
    log = node.log()
    leaked = sum(log.count(name) for name in (FUZZ_NAME, GOOD_NAME, "Soakfuzz", "Soakgood"))
    if leaked:
        problems.append(f"synthetic patient names appear {leaked} time(s) in the node log")
    if not alive:
        problems.append("the node process died")
    twice = sum(1 for n in received.values() if n > 1)

    print("\n=== soak_faults summary ===")
    print(f"database {args.database}; {len(tally.mutants)} mutants (seed {args.seed}), "
          f"{len(tally.good)} good studies, {args.senders} senders, {args.idle_sockets} idle "
          f"sockets; sending {send_s:.0f} s, settling {settle_s:.0f} s")
    print(f"faults: {tally.flaps} database flaps ({tally.backends_killed} connections "
          f"terminated), {tally.idle_opened} idle sockets opened, "
          f"{tally.idle_closed_by_node} closed by the node")
    print(f"senders: {tally.reassociations} associations, {tally.association_failures} "
          f"refused or failed; good-study send failures retried: "
          f"{len(tally.good_send_failures)}")
    print(f"node: alive {alive}; {retries} database-retry audit rows; {refused_rows} "
          f"'refused' audit rows (last id {refusals})")
    print("mutant outcomes:")
    for name, n in sorted(outcome.items(), key=lambda kv: -kv[1]):
        print(f"  {n:6d}  {name}")
    print("answers: " + ", ".join(f"{k} x{n}" for k, n in statuses.most_common()))
    print(f"good studies done and delivered: {good_ok} of {len(tally.good)}")
    print(f"PACS: {sum(received.values())} receptions of {len(received)} objects; "
          f"{twice} object(s) received more than once")
    for line in tally.good_send_failures[:5]:
        print(f"  good send failure: {line}")
    if problems:
        print(f"PROBLEMS ({len(problems)}):")
        for line in problems[:40]:
            print(f"  {line}")
    else:
        print("no problems: every good study delivered, every mutant ended visibly")
    return not problems


if __name__ == "__main__":
    sys.exit(main())
