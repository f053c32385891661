"""What a recipe's `targets` / `ignore` patterns mean: the one place that checks a pattern and
decides which layers it names.

A pattern is a class name (`Linear` matches every linear, GPT-2's `Conv1D` included, but not a
router), an exact module name (a fused linear's name covers its slices), a role (`role:q`), or a
regular expression on the full module name (`re:`, matched from the start as in llm-compressor).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from d2compiler.graph.layers import LinearLayer


def check_pattern(pattern: str) -> str:
    """`pattern` itself, or ValueError saying why it can name no layer (a bad `re:`, an empty one)."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"bad regular expression {pattern!r}: {exc}") from exc
    elif not pattern.strip():
        raise ValueError("empty pattern")
    return pattern


def matches(layer: LinearLayer, patterns: Iterable[str]) -> bool:
    """Whether a layer matches any targets/ignore pattern (class name, exact name, role:, re:)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], layer.name):
                return True
        elif pattern.startswith("role:"):
            if layer.role == pattern[5:]:
                return True
        elif pattern in ("Linear", type(layer.module).__name__) and layer.role == "router":
            continue  # a routing score is not pruned by a class pattern: name it, or use role:router
        elif pattern in (type(layer.module).__name__, layer.name, layer.local_name, layer.owner, layer.whole().name):
            return True
        elif pattern == "Linear":  # every linear, as in llm-compressor, where transformers' Conv1D is one too
            return True
    return False


def select_layers(layers: list[LinearLayer], targets: list[str], ignore: list[str]) -> list[LinearLayer]:
    """The layers `targets` name and `ignore` does not (ignore wins)."""
    return [layer for layer in layers if matches(layer, targets) and not matches(layer, ignore)]


def names_parameter(module_name: str, param_name: str, patterns: Iterable[str]) -> bool:
    """Whether an ignore pattern names a parameter that is not a linear layer's (exact module or
    parameter name, or `re:` matched from the start of either)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module_name) or re.match(pattern[3:], param_name):
                return True
        elif pattern in (module_name, param_name):
            return True
    return False
