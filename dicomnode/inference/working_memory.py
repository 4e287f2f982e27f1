"""How much memory one image costs a model's run: the size of its intermediate tensors.

ONNX Runtime's CPU arena grows to the largest run a session has made and keeps it (the shipped
768 x 768 segmenters take 100-730 MB per image of batch), so the executor sizes each model's
batch from this estimate. ONNX shape inference with the batch dimension set to 1 gives every
intermediate tensor's shape; their sum is an upper bound of what a run holds at once (the
runtime reuses buffers): measured 1.4-3x the arena's real growth for the shipped models.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def activation_bytes_per_image(path: Path) -> int:
    """Bytes of the intermediate tensors of one image's run; 0 when it cannot be told."""
    import onnx  # here, not at module level: onnx (ml_dtypes) costs ~1 s of every node start
    from onnx import shape_inference

    try:
        model = onnx.load(str(path))
        for graph_input in model.graph.input:
            for dim in graph_input.type.tensor_type.shape.dim:
                if dim.dim_param or dim.dim_value <= 0:  # symbolic (the batch): one image
                    dim.dim_value = 1
        inferred = shape_inference.infer_shapes(model)
    except Exception as exc:  # onnx raises its own untyped errors; the batch falls back
        logger.info("%s: no shape inference (%s); batch sized from its inputs", path, exc)
        return 0
    total = 0
    for info in inferred.graph.value_info:
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize \
            if tensor.elem_type else 4
        count = int(np.prod([d.dim_value if d.dim_value > 0 else 1 for d in tensor.shape.dim]))
        total += count * itemsize
    return total
