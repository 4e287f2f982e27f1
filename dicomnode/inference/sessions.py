"""ONNX Runtime sessions: one per (model, version) per process, created once, shared.

`onnxruntime-gpu` on a machine without a usable GPU still lists CUDA (and TensorRT) as
available and silently falls back to CPU (PITFALLS.md), so the provider in use is read back
from `session.get_providers()` and recorded, never assumed from what was asked for.
`InferenceSession.run` is thread-safe and releases the GIL, so one session serves every thread.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import onnxruntime as ort

from dicomnode.errors import InferenceError
from dicomnode.inference.remote import RemoteClient, RemoteSession
from dicomnode.inference.working_memory import activation_bytes_per_image
from dicomnode.registry.registry import ModelEntry
from dicomnode.settings import InferenceBackend, InferenceSettings

logger = logging.getLogger(__name__)

_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
_process_setup = threading.Lock()
_process_ready = False


def prepare_process(wants_gpu: bool) -> None:
    """Once per process: quiet ORT's fallback noise; load CUDA/cuDNN from pip packages."""
    global _process_ready
    with _process_setup:
        if _process_ready:
            return
        # The global logger's severity, not the session option, silences the "CUDA libraries
        # missing" message printed at every fallback (PITFALLS.md). It is logged at ERROR (3),
        # so only 4 (FATAL) quiets it; run failures still raise, and the fallback itself is
        # logged by this module from get_providers().
        ort.set_default_logger_severity(4)
        preload = getattr(ort, "preload_dlls", None)
        if wants_gpu and preload is not None:
            # preload_dlls prints "Failed to load ..." to stdout where the libraries are
            # missing, which would corrupt `--json` output: capture it and log it instead.
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    preload()
            except Exception as exc:  # a CPU-only machine lacks the libraries: not fatal
                logger.info("onnxruntime.preload_dlls() failed (%s); CPU fallback likely", exc)
            if printed.getvalue().strip():
                logger.info("onnxruntime.preload_dlls(): %s",
                            " | ".join(printed.getvalue().strip().splitlines()[:4]))
        _process_ready = True


class SessionLike(Protocol):
    """What the executor uses of a session: ORT's `InferenceSession`, or a `RemoteSession`."""

    def run(self, output_names: Any, input_feed: Any) -> Any: ...
    def get_inputs(self) -> Any: ...
    def get_outputs(self) -> Any: ...
    def get_providers(self) -> Any: ...


@dataclass(frozen=True)
class LoadedModel:
    """A ready session and what it really runs on."""

    key: str  # id@version
    session: SessionLike
    requested: tuple[str, ...]
    provider: str  # the first provider the session actually uses
    input_shapes: dict[str, tuple[int | str | None, ...]]
    activation_bytes: int = 0  # intermediate tensors of one image's run (0: unknown)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())


class SessionPool:
    """Lazily created sessions keyed by model@version; safe to use from many threads."""

    def __init__(
        self,
        providers: Sequence[str],
        *,
        intra_op_threads: int = 0,
        spin_wait: bool = False,
        remote: RemoteClient | None = None,
        backend_for: Callable[[str], InferenceBackend] | None = None,
    ) -> None:
        self.requested = tuple(providers) or ("CPUExecutionProvider",)
        self.intra_op_threads = intra_op_threads
        self.spin_wait = spin_wait
        # Which models run on the remote server (model id -> backend); none without a client.
        self.remote = remote
        self.backend_for = backend_for or (lambda _model_id: "onnxruntime")
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._sessions: dict[str, LoadedModel] = {}

    @classmethod
    def for_settings(cls, config: InferenceSettings) -> SessionPool:
        """The pool the settings describe, with a remote client where one is configured."""
        return cls(config.providers, intra_op_threads=config.intra_op_threads,
                   spin_wait=config.spin_wait,
                   remote=RemoteClient(config.remote) if config.remote is not None else None,
                   backend_for=config.backend_for)

    def available_providers(self) -> list[str]:
        return list(ort.get_available_providers())

    def _providers(self) -> list[str]:
        available = set(self.available_providers())
        usable = [p for p in self.requested if p in available]
        missing = [p for p in self.requested if p not in available]
        if missing:
            logger.warning("execution providers not in this onnxruntime build: %s", missing)
        return usable or ["CPUExecutionProvider"]

    def get(self, entry: ModelEntry) -> LoadedModel:
        """The shared session for a registry entry, created on first use."""
        loaded = self._sessions.get(entry.key)
        if loaded is not None:
            return loaded
        with self._lock:
            key_lock = self._key_locks.setdefault(entry.key, threading.Lock())
        # One lock per model: two threads wanting the same model create it once, while a
        # slow model load does not hold up other models.
        with key_lock:
            loaded = self._sessions.get(entry.key)
            if loaded is None:
                loaded = self._create(entry)
                self._sessions[entry.key] = loaded
        return loaded

    def _create(self, entry: ModelEntry) -> LoadedModel:
        path = entry.onnx_path
        if path is None or not Path(path).is_file():
            raise InferenceError(f"{entry.key}: no ONNX file at {path}")
        if self.backend_for(entry.manifest.id) == "remote":
            if self.remote is None:
                raise InferenceError(f"{entry.key}: backend 'remote' but no inference.remote")
            # The ONNX file still gives the signature: names, order and shapes as in-process.
            remote = RemoteSession(self.remote, entry.manifest.id, entry.manifest.version,
                                   Path(path))
            provider = remote.get_providers()[0]
            logger.info("%s: running on %s", entry.key, provider)
            remote_shapes = {arg.name: tuple(arg.shape) for arg in remote.get_inputs()}
            return LoadedModel(entry.key, remote, ("remote",), provider, remote_shapes)
        providers = self._providers()
        prepare_process(bool(_GPU_PROVIDERS & set(providers)))
        options = ort.SessionOptions()
        if self.intra_op_threads:
            options.intra_op_num_threads = self.intra_op_threads
        if not self.spin_wait:
            # Spinning intra-op threads keep the cores busy after each run, starving the
            # pre-processing between runs (and everything else on a small machine).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors; keep the cause
            raise InferenceError(f"{entry.key}: cannot load {path}: {exc}") from exc
        used = session.get_providers()
        provider = used[0] if used else "unknown"
        if provider != providers[0]:
            logger.warning("%s: asked for %s, running on %s", entry.key, providers[0], provider)
        else:
            logger.info("%s: running on %s", entry.key, provider)
        shapes: dict[str, tuple[int | str | None, ...]] = {
            arg.name: tuple(_dim(d) for d in arg.shape) for arg in session.get_inputs()
        }
        return LoadedModel(entry.key, session, tuple(providers), provider, shapes,
                           activation_bytes_per_image(Path(path)))

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return [self._sessions[k] for k in sorted(self._sessions)]


def _dim(value: Any) -> int | str | None:
    return value if isinstance(value, int | str) else None
