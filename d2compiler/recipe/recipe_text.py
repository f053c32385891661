"""Recipe text: TOML/JSON parsing with a depth limit, reading a recipe file, and `--set` overrides,
each problem a located `RecipeError`."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import tomllib

from d2compiler.errors import RecipeError

MAX_DEPTH = 32
_ECHO = 80


def shorten(text: str) -> str:
    """A user's value as echoed in an error: at most 80 characters."""
    return text if len(text) <= _ECHO else f"{text[:_ECHO]}... ({len(text)} characters)"


def _depth(value: Any) -> int:
    """Nesting depth of parsed data, computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_text(text: str, source: str) -> dict[str, Any]:
    """Parse recipe text as TOML or JSON (by the file suffix; JSON when it starts with '{')."""
    is_json = source.endswith(".json") or (not source.endswith(".toml") and text.lstrip().startswith("{"))
    try:
        data = json.loads(text) if is_json else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(source, [("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(source, [("", f"invalid TOML: {shorten(str(exc))}")]) from None
    except RecursionError:
        raise RecipeError(source, [("", f"nested too deeply (a recipe is at most {MAX_DEPTH} levels deep)")]) from None
    if not isinstance(data, dict):
        raise RecipeError(source, [("", f"a recipe must be a table/object, got {type(data).__name__}")])
    if _depth(data) > MAX_DEPTH:
        raise RecipeError(source, [("", f"nested more than {MAX_DEPTH} levels deep; a recipe is at most {MAX_DEPTH}")])
    return data


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read and parse a recipe file, with a located error for a missing or unreadable file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(str(path), [("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(str(path), [("", f"cannot read: {exc}")]) from None
    return parse_text(text, str(path))


def _override_loc(key: str) -> str:
    """How an override's key is named in errors: `--set passes.1.sparsity` (quoted if unusual)."""
    return f"--set {key}" if re.fullmatch(r"[\w.-]+", key) else f"--set {json.dumps(key)}"


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str,
                    values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (list indices as numbers: `passes.1.sparsity=0.6`).
    Values are parsed as TOML values when possible (`0.6`, `true`, `"x"`, `[1, 2]`), else taken
    as plain strings. `values` sets dotted keys to Python values as they are (no parsing: paths
    from the command line keep every character)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(source, [(_override_loc(item), "an override must look like dotted.key=value")])
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        _assign(data, key, value, source)
    for key, value in (values or {}).items():
        _assign(data, key, value, source)
    return data


def _assign(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise RecipeError(source, [(_override_loc(key), "empty key segment in override")])
    node: Any = data
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise RecipeError(source, [(_override_loc(where), f"no list item {k} (the list has {len(node)})")])
            if last:
                node[int(k)] = value
            else:
                node = node[int(k)]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                node = node.setdefault(k, {})
        else:
            raise RecipeError(source, [(_override_loc(where), "cannot set a key inside a non-table value")])
