"""Run a model selection through the real resolver and executor, as a job would."""

from __future__ import annotations

from dicomnode.graph import Selection, resolve
from dicomnode.inference.executor import GraphExecutor, GraphResult
from dicomnode.inference.preprocess import SourceImage
from dicomnode.registry import Registry


def run_graph(executor: GraphExecutor, registry: Registry, models: list[str],
              images: list[SourceImage]) -> GraphResult:
    """The resolved graph of `models` (OP) run on `images`; every model must succeed."""
    graph = resolve(Selection.of(models, modality="OP"), registry)
    result = executor.run(graph, images)
    assert result.outcome == "done", result.problems()
    return result
