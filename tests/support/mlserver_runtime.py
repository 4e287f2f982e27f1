"""An MLServer runtime that serves an ONNX file with ONNX Runtime (CPU).

Loaded by the `mlserver` process (its own virtual environment: MLServer pins an older
FastAPI than the node's), so it imports only mlserver, onnxruntime and numpy.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        self._session = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {item.name: NumpyCodec.decode_input(item) for item in payload.inputs}
        names = ([o.name for o in payload.outputs] if payload.outputs
                 else [o.name for o in self._session.get_outputs()])
        values = self._session.run(names, feeds)
        return InferenceResponse(
            model_name=self.name, model_version=self.version,
            outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(names, values, strict=True)],
        )
