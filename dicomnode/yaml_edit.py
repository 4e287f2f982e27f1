"""Edit a YAML file's text so that only what changed changes (ruamel.yaml round trip).

A preset saved from the console, or a manifest that `evaluate --record` adds a metric to, was
often written by a person: comments, key order, flow or block style and quoting are theirs.
`merge` walks the old document and the new data together and touches only the values that
differ: equal values keep their original spelling (`modality: OP` stays, although it reads as
`[OP]`), changed scalars are replaced in place, lists of scalars are edited item by item (the
comments of the items that stay are kept), keys that are gone are removed, new keys are added
at the end of their mapping.
"""

from __future__ import annotations

import difflib
import io
import itertools
import re
from collections.abc import Mapping
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

_KEY_LINE = re.compile(r"^(\s*)[^\s#][^:#]*:\s*(#.*)?$")
_ITEM_LINE = re.compile(r"^(\s*)- ")


def _indents(text: str) -> tuple[int, int, int]:
    """(mapping, sequence, offset) as the text writes its first block list (default 2/4/2)."""
    lines = text.splitlines()
    for above, below in itertools.pairwise(lines):
        key, item = _KEY_LINE.match(above), _ITEM_LINE.match(below)
        if key and item:
            offset = max(0, len(item.group(1)) - len(key.group(1)))
            return 2, offset + 2, offset
    return 2, 4, 2


def round_trip(text: str) -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a person's long lines
    mapping, sequence, offset = _indents(text)
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml


def load(text: str) -> tuple[YAML, Any]:
    yaml = round_trip(text)
    return yaml, yaml.load(text)


def dump(yaml: YAML, document: Any) -> str:
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def _scalars(value: Any) -> bool:
    return isinstance(value, list) and all(not isinstance(v, dict | list) for v in value)


def _edit_list(node: CommentedSeq, old: list[Any], new: list[Any]) -> None:
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    # From the end, so the indexes of what is still to edit do not move.
    for tag, i1, i2, j1, j2 in reversed(matcher.get_opcodes()):
        if tag == "equal":
            continue
        for index in range(i2 - 1, i1 - 1, -1):
            del node[index]
        for index, value in enumerate(new[j1:j2]):
            node.insert(i1 + index, value)


def merge(node: CommentedMap, old: Mapping[str, Any], new: Mapping[str, Any],
          minimal: Mapping[str, Any] | None = None) -> None:
    """Make `node` (the old document) say `new`.

    `old` is what the node means, normalised the way `new` is (so that `OP` and `[OP]` compare
    equal); a key the node lacks is added only if `minimal` (the new data without defaults;
    all of `new` when None) has it, so defaults the file never spelled out stay unspelled.
    """
    minimal = new if minimal is None else minimal
    for key in list(node.keys()):
        if key not in new:
            del node[key]
    for key, value in new.items():
        if key not in node:
            if key in minimal:
                node[key] = minimal[key]
            continue
        before = old.get(key)
        if before == value:
            continue  # unchanged: keep the original spelling
        current = node[key]
        if isinstance(current, CommentedMap) and isinstance(value, dict) and isinstance(
                before, dict):
            merge(current, before, value, minimal.get(key) or {})
        elif (isinstance(current, CommentedSeq) and isinstance(before, list)
              and _scalars(value) and _scalars(before)
              and [str(v) for v in current] == [str(v) for v in before]):
            _edit_list(current, list(before), list(value))
        else:
            node[key] = value
