"""`dicomnode export-triton DIR`: every shipped model gets a config.pbtxt that Triton's own
ModelConfig protobuf parses (tritonclient's model_config_pb2, in the MLServer venv), naming each
ONNX input and output with its type and dims, beside a copy of the ONNX file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import onnx

from dicomnode.cli import main
from dicomnode.registry import load_registry
from tests.support.mlserver import find_mlserver

ROOT = Path(__file__).resolve().parents[2]
# Parses each config with Triton's ModelConfig message and prints it back as JSON.
_PARSE = """
import json, sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
out = {}
for path in sys.argv[1:]:
    config = text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())
    out[path] = json_format.MessageToDict(config)
print(json.dumps(out))
"""


def test_export_triton_writes_a_parsable_repository(tmp_path: Path) -> None:
    folder = tmp_path / "triton"
    assert main(["export-triton", str(folder), "--config",
                 str(ROOT / "config" / "dicomnode.yaml")]) == 0
    registry = load_registry(ROOT / "model_registry")
    entries = registry.latest_entries()
    assert sorted(p.name for p in folder.iterdir()) == sorted(e.id for e in entries)
    configs = [str(folder / e.id / "config.pbtxt") for e in entries]
    python = Path(find_mlserver()).parent / "python"
    answer = subprocess.run([str(python), "-c", _PARSE, *configs], capture_output=True,
                            text=True, timeout=60, check=True)
    parsed = json.loads(answer.stdout)
    for entry in entries:
        assert entry.onnx_path is not None
        copy = folder / entry.id / "1" / "model.onnx"
        assert copy.read_bytes() == entry.onnx_path.read_bytes()
        config = parsed[str(folder / entry.id / "config.pbtxt")]
        assert config["name"] == entry.id and config["platform"] == "onnxruntime_onnx"
        model = onnx.load(str(copy))
        initialisers = {i.name for i in model.graph.initializer}
        batch = int(config.get("maxBatchSize", 0))
        for section, values in (("input", [v for v in model.graph.input
                                           if v.name not in initialisers]),
                                ("output", list(model.graph.output))):
            declared = {t["name"]: t for t in config[section]}
            assert sorted(declared) == sorted(v.name for v in values), (entry.id, section)
            for value in values:
                dims = [d.dim_value if d.HasField("dim_value") else -1
                        for d in value.type.tensor_type.shape.dim]
                expected = dims[1:] if batch else dims
                assert [int(d) for d in declared[value.name]["dims"]] == expected
                assert declared[value.name]["dataType"] == "TYPE_FP32"
        # Manifest batch "dynamic" (all shipped models): Triton may batch up to max_batch.
        assert batch == 16 and "dynamicBatching" in config
