"""Selection -> resolved DAG of models (dependencies, exclusions, stages)."""

from dicomnode.graph.model import Edge, ResolvedGraph
from dicomnode.graph.resolver import resolve
from dicomnode.graph.selectable import Choice, selectable
from dicomnode.graph.selection import Selection

__all__ = ["Choice", "Edge", "ResolvedGraph", "Selection", "resolve", "selectable"]
