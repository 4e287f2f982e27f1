"""Several receiving processes (`receive.processes` > 1): the `storescp --fork` lever.

One Python process receives at most one core's worth of DICOM (pynetdicom's receive path
holds the GIL), so with several senders the node spreads associations over worker
processes, as `storescp --fork` spreads them over children. The main process binds the
listening sockets (receive/sockets.py) and starts the workers (spawned: the main process
already runs threads, which a fork would copy mid-flight); each worker runs the ordinary
`Receiver` on those sockets and stores into the same database, with the same promise (file
fsync'd and row committed before the success status). Everything else (study completion,
jobs, results, dispatch, the console) stays in the main process: a worker tells it, over a
pipe, what its receiver would tell the study assembler in a single process node (an
instance stored, an association ended, the studies its open associations are sending).

Supervision: a worker that dies is logged at ERROR, its streamed temporary files (its pid is
in their names) are deleted, and it is started again (after 1 s, doubling up to 30 s while
it keeps dying); the others keep serving meanwhile, and the listening socket keeps the
connections that arrive. `stop` (SIGTERM/SIGINT on the node) tells every worker to stop
accepting and finish its stores, like the single process receiver's `stop`, and waits.
A worker whose main process has gone stops the same way.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from dicomnode.db.engine import Database
from dicomnode.errors import DicomNodeError
from dicomnode.logs import configure_logging
from dicomnode.receive import sockets, streamed
from dicomnode.receive.accept import ReceiveListener
from dicomnode.receive.ae import Listening, Receiver
from dicomnode.receive.tls import server_context
from dicomnode.redact import safe_error
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)

_READY_TIMEOUT = 180.0  # a spawned worker imports the node (slow on a loaded machine)
_FIRST_RESTART_DELAY = 1.0
_MAX_RESTART_DELAY = 30.0
_STABLE_SECONDS = 60.0  # up this long: its next death restarts it after the first delay
_EXIT_GRACE = 20.0  # beyond shutdown_grace_seconds, for stores to finish and exit


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection  # the main process's end of the pipe
    started: float
    restarted: bool = False
    ready: bool = False
    conn_open: bool = True


@dataclass
class PoolHealth:
    processes: int
    running: int
    restarts: int
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.running == self.processes


class ReceiverPool:
    """`Receiver`'s interface for the composition root, over worker processes."""

    def __init__(self, settings: Settings, listener: ReceiveListener | None = None) -> None:
        self.settings = settings
        self.listener = listener
        self._context = multiprocessing.get_context("spawn")
        self._plain: socket.socket | None = None
        self._tls: socket.socket | None = None
        self._workers: dict[int, _Worker] = {}
        self._restarts: dict[int, float] = {}  # index -> when to start it again
        self._delays: dict[int, float] = {}  # index -> the wait before its last restart
        self._receiving: dict[int, frozenset[str]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._restart_count = 0
        self._last_error: str | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        sock = self._plain if self._plain is not None else self._tls
        if sock is None:
            raise RuntimeError("the receiver is not running")
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def tls_address(self) -> tuple[str, int] | None:
        if self._tls is None:
            return None
        host, port = self._tls.getsockname()[:2]
        return str(host), int(port)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        settings = self.settings
        node = settings.node
        settings.storage.path.mkdir(parents=True, exist_ok=True)
        if node.tls is not None:  # a bad certificate stops the start here, before binding
            server_context(node.tls)
            self._tls = sockets.listen(node.host, node.tls.port)
        if node.port is not None:
            self._plain = sockets.listen(node.host, node.port)
        count = settings.receive.processes
        for index in range(count):
            self._workers[index] = self._spawn(index)
        deadline = time.monotonic() + _READY_TIMEOUT
        try:
            for worker in list(self._workers.values()):
                self._await_ready(worker, deadline)
        except BaseException:
            self._stopping.set()
            self._kill_all()
            self._close_sockets()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="receive-supervisor",
                                            daemon=True)
        self._supervisor.start()
        logger.info("%d receiving processes started (pids %s)", count,
                    ", ".join(str(w.process.pid) for w in self._workers.values()))
        return self.address

    def stop(self, grace_seconds: float) -> None:
        """Every worker stops accepting and finishes its stores (as `Receiver.stop`)."""
        if self._stopping.is_set() and self._supervisor is None:
            return
        self._stopping.set()
        with self._lock:
            workers = list(self._workers.values())
            self._restarts.clear()
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.conn.send(("stop",))
        if self._supervisor is not None:
            self._supervisor.join(timeout=grace_seconds + _EXIT_GRACE)
            if self._supervisor.is_alive():
                logger.error("receiving processes still running %.0f s after the stop; "
                             "killing them", grace_seconds + _EXIT_GRACE)
                self._kill_all()
                self._supervisor.join(timeout=10)
            self._supervisor = None
        self._close_sockets()

    def is_receiving(self, study_uid: str) -> bool:
        with self._lock:
            return any(study_uid in studies for studies in self._receiving.values())

    def health(self) -> PoolHealth:
        with self._lock:
            running = sum(1 for w in self._workers.values()
                          if w.ready and w.process.is_alive())
            errors = [self._last_error] if self._last_error else []
            return PoolHealth(self.settings.receive.processes, running, self._restart_count,
                              errors)

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=run_worker, name=f"dicomnode-receive-{index}",
            args=(index, self.settings, self._plain, self._tls, theirs), daemon=True,
        )
        # multiprocessing's resource tracker, started with the first spawned process,
        # UNBLOCKS SIGINT and SIGTERM in the calling thread; `serve` relies on them staying
        # blocked in every thread (its sigwait), or a SIGTERM kills the node mid-write.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        return _Worker(index, process, ours, time.monotonic())

    def _await_ready(self, worker: _Worker, deadline: float) -> None:
        while not worker.ready:
            if worker.conn.poll(0.2):
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    worker.process.join(timeout=5)
                    raise DicomNodeError(
                        f"receiving process {worker.index} ended at start (exit code "
                        f"{worker.process.exitcode})") from None
                if message[0] == "failed":
                    raise DicomNodeError(f"receiving process {worker.index} could not start: "
                                         f"{message[1]}")
                self._handle(worker, message)
            elif not worker.process.is_alive():
                raise DicomNodeError(f"receiving process {worker.index} ended at start "
                                     f"(exit code {worker.process.exitcode})")
            elif time.monotonic() > deadline:
                raise DicomNodeError(f"receiving process {worker.index} did not start "
                                     f"within {_READY_TIMEOUT:.0f} s")

    def _supervise(self) -> None:
        while True:
            with self._lock:
                workers = list(self._workers.values())
                restarts = dict(self._restarts)
            if not workers and (self._stopping.is_set() or not restarts):
                return
            now = time.monotonic()
            for index, due in restarts.items():
                if due <= now and not self._stopping.is_set():
                    self._restart(index)
            waitables: dict[Any, _Worker] = {}
            for worker in workers:
                waitables[worker.process.sentinel] = worker
                if worker.conn_open:
                    waitables[worker.conn] = worker
            for ready in wait(list(waitables), timeout=0.25):
                worker = waitables[ready]
                if ready is worker.conn:
                    self._receive(worker)
                else:
                    while worker.conn_open and worker.conn.poll(0):  # what it said last
                        self._receive(worker)
                    self._ended(worker)

    def _receive(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            worker.conn_open = False  # it is exiting; its sentinel follows
            return
        self._handle(worker, message)

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        listener = self.listener
        try:
            if kind == "stored" and listener is not None:
                study_uid, quiet_until = message[1], message[2]
                listener.instance_stored(study_uid, quiet_until)
            elif kind == "ended" and listener is not None:
                listener.association_ended(set(message[1]))
            elif kind == "receiving":
                with self._lock:
                    self._receiving[worker.index] = message[1]
            elif kind == "ready":
                worker.ready = True
                if worker.restarted:
                    logger.info("receiving process %d serving again (pid %s)", worker.index,
                                worker.process.pid)
            elif kind == "failed":
                self._last_error = f"receiving process {worker.index}: {message[1]}"
                logger.error("receiving process %d could not start: %s", worker.index,
                             message[1])
        except Exception:
            logger.exception("could not pass on a %r report of receiving process %d",
                             kind, worker.index)

    def _ended(self, worker: _Worker) -> None:
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        with contextlib.suppress(OSError):
            worker.conn.close()
        with self._lock:
            self._workers.pop(worker.index, None)
            self._receiving.pop(worker.index, None)
        pid = worker.process.pid
        if pid is not None:
            cut = streamed.discard_unfinished(self.settings.storage.path / streamed.INCOMING,
                                              pid)
            if cut:
                logger.info("%d transfer(s) cut off in receiving process %d discarded "
                            "(never acknowledged)", cut, worker.index)
        if self._stopping.is_set():
            if code != 0:
                logger.warning("receiving process %d ended with exit code %s while stopping",
                               worker.index, code)
            return
        up = time.monotonic() - worker.started
        previous = self._delays.get(worker.index)
        delay = (_FIRST_RESTART_DELAY if previous is None or up > _STABLE_SECONDS
                 else min(previous * 2, _MAX_RESTART_DELAY))
        self._last_error = (f"receiving process {worker.index} (pid {pid}) ended with exit "
                            f"code {code}")
        logger.error("receiving process %d (pid %s) ended with exit code %s after %.0f s; "
                     "restarting it in %.0f s (the other %d keep serving)", worker.index, pid,
                     code, up, delay, len(self._workers))
        with self._lock:
            self._delays[worker.index] = delay
            self._restarts[worker.index] = time.monotonic() + delay

    def _restart(self, index: int) -> None:
        try:
            worker = self._spawn(index)
        except Exception as exc:
            delay = self._delays.get(index, _FIRST_RESTART_DELAY)
            logger.error("could not restart receiving process %d: %s", index, exc)
            with self._lock:
                self._restarts[index] = time.monotonic() + delay
            return
        worker.restarted = True
        with self._lock:
            self._workers[index] = worker
            self._restarts.pop(index, None)
            self._restart_count += 1

    def _kill_all(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            if worker.process.is_alive():
                worker.process.kill()
        for worker in workers:
            worker.process.join(timeout=10)

    def _close_sockets(self) -> None:
        for sock in (self._plain, self._tls):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._plain = self._tls = None


# -- the worker process ------------------------------------------------------------------


class _Forwarder:
    """The study assembler's `ReceiveListener`, in a worker: forwarded to the main process."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send

    def instance_stored(self, study_uid: str, quiet_until: datetime) -> None:
        self._send(("stored", study_uid, quiet_until))

    def association_ended(self, study_uids: set[str]) -> None:
        self._send(("ended", sorted(study_uids)))


class _Prefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_prefixed", False):
            record.msg = f"{self.prefix}{record.msg}"
            record._prefixed = True
        return True


def run_worker(index: int, settings: Settings, plain: socket.socket | None,
               tls: socket.socket | None, conn: Connection) -> None:
    """A receiving worker process's whole life (the target of the spawned process)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C reaches the whole process group: the main process stops the workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # `serve` blocked these before spawning us (the mask is inherited); ours has a handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    configure_logging(settings.logging.level, settings.logging.format, service=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Prefix(f"[receive {index}] "))
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    database: Database | None = None
    try:
        # The main process has migrated the schema; workers only use it.
        database = Database(settings.database.url)
        receiver = Receiver(settings, database, _Forwarder(send), Listening(plain, tls))
        receiver.handlers.receiving_changed = lambda studies: send(("receiving", studies))
        receiver.start()
    except Exception as exc:
        logger.exception("receiving process could not start")
        with contextlib.suppress(OSError):
            send(("failed", safe_error(exc)))
        if database is not None:
            database.dispose()
        raise SystemExit(1) from None
    send(("ready", os.getpid()))
    while not stop.is_set():
        try:
            if conn.poll(0.5) and conn.recv()[0] == "stop":
                break
        except (EOFError, OSError):
            logger.error("the main process has gone; stopping")
            break
    receiver.stop(settings.node.shutdown_grace_seconds)
    database.dispose()
