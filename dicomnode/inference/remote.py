"""Remote inference over the Open Inference Protocol (KServe v2 REST): Triton, KServe,
Seldon MLServer, OpenVINO Model Server.

Only `session.run()` goes remote: pre- and post-processing stay in the node, so a model's
outputs are those of the in-process session. `RemoteSession` has the surface the executor uses
(`run`, `get_inputs`, `get_outputs`, `get_providers`); names, order and shapes of inputs and
outputs come from the model's own ONNX file, so the node never depends on the server's view.

A refused connection, a timeout or a 429/502/503/504 answer is transient: retried with
exponential backoff, then `InferenceUnavailableError` (the job goes back to the queue). Any
other error answer is the model's failure (`InferenceError`), as in-process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from numpy.typing import NDArray

from dicomnode.errors import InferenceError, InferenceUnavailableError
from dicomnode.settings import RemoteInferenceSettings

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

_TRANSIENT_STATUS = {429, 502, 503, 504}
# numpy dtype <-> KServe v2 datatype.
_DATATYPES: dict[str, str] = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
    "uint64": "UINT64", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
_DTYPES = {v: k for k, v in _DATATYPES.items()}


@dataclass(frozen=True)
class TensorArg:
    """An input or output as `InferenceSession.get_inputs()` describes it."""

    name: str
    shape: list[int | str | None]
    type: str


def datatype(array: NDArray[Any]) -> str:
    try:
        return _DATATYPES[array.dtype.name]
    except KeyError:
        raise InferenceError(f"no Open Inference Protocol datatype for {array.dtype}") from None


def encode_tensor(name: str, array: NDArray[Any]) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "datatype": datatype(array),
            "data": array.ravel().tolist()}


def decode_tensor(item: dict[str, Any]) -> NDArray[Any]:
    try:
        dtype = _DTYPES[str(item["datatype"])]
        return np.asarray(item["data"], dtype=dtype).reshape([int(d) for d in item["shape"]])
    except (KeyError, ValueError, TypeError) as exc:
        raise InferenceError(f"unreadable output tensor {item.get('name')!r}: {exc}") from exc


class RemoteClient:
    """One HTTP client per node, shared by every model; records the server's recent state."""

    def __init__(self, settings: RemoteInferenceSettings, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self._http = httpx.Client(base_url=settings.url, timeout=settings.timeout_seconds,
                                  transport=transport)
        self._lock = threading.Lock()
        self.failing_since: datetime | None = None
        self.last_error: str | None = None
        self.retries = 0  # transient failures retried since the last success

    def close(self) -> None:
        self._http.close()

    def model_path(self, model_id: str, version: str) -> str:
        name = self.settings.model_names.get(model_id, model_id)
        path = f"/v2/models/{name}"
        return f"{path}/versions/{version}" if self.settings.send_version else path

    # -- readiness ---------------------------------------------------------------------------

    def _ready(self, path: str) -> bool | str:
        """True, or why not (readiness probes are answered, never retried)."""
        try:
            answer = self._http.get(path, timeout=min(self.settings.timeout_seconds, 5.0))
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return True if answer.status_code == 200 else f"HTTP {answer.status_code}"

    def status(self, models: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """For health: server readiness, each model's, and the recent transient failures."""
        server = self._ready("/v2/health/ready")
        report: dict[str, Any] = {
            "url": self.settings.url,
            "ready": server is True,
            "error": None if server is True else server,
            "models": {},
        }
        for model_id, version in models:
            ready = self._ready(f"{self.model_path(model_id, version)}/ready")
            report["models"][f"{model_id}@{version}"] = (
                {"ready": True} if ready is True else {"ready": False, "error": ready})
        with self._lock:
            report["failing_since"] = (
                self.failing_since.isoformat() if self.failing_since else None)
            report["last_error"] = self.last_error
            report["retries"] = self.retries
        return report

    # -- inference ---------------------------------------------------------------------------

    def infer(self, model_id: str, version: str, feeds: dict[str, NDArray[Any]],
              outputs: Sequence[str]) -> dict[str, NDArray[Any]]:
        """POST .../infer with JSON tensors; retry transient failures, then raise."""
        body = {
            "inputs": [encode_tensor(name, np.ascontiguousarray(v)) for name, v in feeds.items()],
            "outputs": [{"name": name} for name in outputs],
        }
        # Serialised once: a retry resends the same bytes.
        content = json.dumps(body).encode()
        path = f"{self.model_path(model_id, version)}/infer"
        key = f"{model_id}@{version}"
        delay = self.settings.retry_delay_seconds
        deadline = time.monotonic() + self.settings.retry_total_seconds
        while True:
            try:
                answer = self._http.post(
                    path, content=content, headers={"Content-Type": "application/json"})
                if answer.status_code not in _TRANSIENT_STATUS:
                    break
                problem = f"HTTP {answer.status_code}: {answer.text[:200]}"
            except httpx.TransportError as exc:  # refused, reset, timed out
                problem = f"{type(exc).__name__}: {exc}"
            self._note_failure(problem)
            if time.monotonic() + delay > deadline:
                raise InferenceUnavailableError(
                    f"{key}: inference server {self.settings.url} unavailable: {problem}")
            logger.warning("%s: inference server unavailable (%s); retrying in %.1f s",
                           key, problem, delay)
            time.sleep(delay)
            delay = min(max(delay * 2, 0.05), self.settings.retry_max_delay_seconds)
        if answer.status_code != 200:
            raise InferenceError(f"{key}: inference server answered HTTP {answer.status_code}: "
                                 f"{answer.text[:500]}")
        self._note_success()
        try:
            items = answer.json()["outputs"]
        except (ValueError, KeyError) as exc:
            raise InferenceError(f"{key}: unreadable answer from the server: {exc}") from exc
        found = {str(item.get("name")): decode_tensor(item) for item in items}
        missing = [name for name in outputs if name not in found]
        if missing:
            raise InferenceError(f"{key}: the server's answer lacks outputs {missing}")
        return found

    def _note_failure(self, problem: str) -> None:
        with self._lock:
            self.failing_since = self.failing_since or datetime.now(UTC)
            self.last_error = problem
            self.retries += 1

    def _note_success(self) -> None:
        with self._lock:
            self.failing_since = None
            self.retries = 0


class RemoteSession:
    """A session-like object whose `run()` is answered by the inference server."""

    def __init__(self, client: RemoteClient, model_id: str, version: str, onnx_path: Path
                 ) -> None:
        self.client = client
        self.model_id = model_id
        self.version = version
        self._inputs, self._outputs = _signature(onnx_path)

    def get_inputs(self) -> list[TensorArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorArg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"remote:{self.client.settings.url}"]

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]
            ) -> list[NDArray[Any]]:
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        found = self.client.infer(self.model_id, self.version, input_feed, names)
        return [found[name] for name in names]


def _signature(path: Path) -> tuple[list[TensorArg], list[TensorArg]]:
    """Inputs (less initialisers) and outputs of an ONNX file, in the file's order."""
    import onnx  # here, not at module level: onnx (ml_dtypes) costs ~1 s of every node start

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others; keep the cause
        raise InferenceError(f"cannot read {path}: {exc}") from exc
    initialisers = {i.name for i in model.graph.initializer}

    def arg(value: onnx.ValueInfoProto) -> TensorArg:
        tensor = value.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        ]
        elem = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return TensorArg(value.name, dims, f"tensor({elem})")

    inputs = [arg(v) for v in model.graph.input if v.name not in initialisers]
    return inputs, [arg(v) for v in model.graph.output]
