"""Is there a device behind each execution provider? A probe session answers.

`onnxruntime.get_available_providers()` says what the installed package was built with:
onnxruntime-gpu lists CUDA and TensorRT on a machine with no GPU at all (PITFALLS.md). A tiny
session created with the provider requested, then `get_providers()` read back, says whether
the provider really works here (device and libraries found) or fell back to the CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import onnxruntime as ort

from dicomnode.inference.sessions import prepare_process

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
DeviceWord = Literal["found", "not found", "not probed"]


@dataclass(frozen=True)
class ProviderStatus:
    name: str
    in_package: bool  # the installed onnxruntime lists it
    device: DeviceWord  # a probe session actually ran on it
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _identity_model() -> bytes:
    """A one-node ONNX model (float Identity), built in memory: nothing to ship."""
    from onnx import TensorProto, helper  # lazily: onnx costs ~1 s of every node start

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # old enough for every onnxruntime the package allows
    return bytes(model.SerializeToString())


def _probe(provider: str) -> ProviderStatus:
    # onnxruntime prints "EP Error ... Falling back" on stdout where a provider's libraries
    # are missing; that would corrupt `--json` output, so it is captured and logged instead.
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            session = ort.InferenceSession(_identity_model(), providers=[provider, CPU])
    except Exception as exc:  # ORT's own untyped errors: the provider is unusable here
        return ProviderStatus(provider, True, "not found", f"session failed: {exc}"[:300])
    finally:
        if printed.getvalue().strip():
            logger.debug("probe of %s printed: %s", provider, printed.getvalue().strip())
    used = list(session.get_providers())
    if provider in used:
        return ProviderStatus(provider, True, "found")
    return ProviderStatus(provider, True, "not found",
                          f"asked for {provider}, the session runs on {used[0] if used else '?'}")


@lru_cache(maxsize=1)
def probe_devices() -> tuple[ProviderStatus, ...]:
    """Every provider the package has, probed once per process (a CUDA context is not free)."""
    available = list(ort.get_available_providers())
    prepare_process(any(p != CPU for p in available))
    import onnx

    onnx.checker.check_model(onnx.load_from_string(_identity_model()))
    statuses = []
    for provider in available:
        status = ProviderStatus(CPU, True, "found") if provider == CPU else _probe(provider)
        logger.info("execution provider %s: device %s %s", provider, status.device,
                    status.detail)
        statuses.append(status)
    return tuple(statuses)


def provider_statuses(probe: bool) -> list[ProviderStatus]:
    """The package's providers; with `probe`, whether each really runs here."""
    if probe:
        return list(probe_devices())
    return [ProviderStatus(p, True, "found" if p == CPU else "not probed")
            for p in ort.get_available_providers()]
