"""Which file holds each tensor of a safetensors model folder: the one check every loader uses
(in-memory loading, streaming, `d2c eval --streaming`, the output's protection of its source).

A folder has `model.safetensors`, or shards listed by `model.safetensors.index.json`. Every shard
the index names must be a relative path inside the folder (no `..`, not absolute) and must exist;
each tensor is then read from the shard that actually holds it (as transformers does), so an index
that names the wrong shard for a tensor still loads, and a tensor that no shard holds is named."""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath

from d2compiler.errors import ModelLoadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
log = logging.getLogger(__name__)


def index_shards(folder: Path) -> tuple[dict[str, str], list[Path]]:
    """The index's weight map and the shard files it names (checked to lie inside `folder` and to
    exist). ({}, []) when the folder has no index."""
    index = folder / INDEX
    if not index.is_file():
        return {}, []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index}: unreadable index ({exc})") from None
    shards: list[Path] = []
    for key, name in weight_map.items():
        pure = PurePosixPath(name.replace("\\", "/"))
        if not name or pure.is_absolute() or ".." in pure.parts or Path(name).is_absolute():
            raise ModelLoadError(f"{index}: tensor {key} is in shard {name!r}, outside the model folder; an index may "
                                 "name only files inside its folder")
        path = folder / pure
        if path not in shards:
            if not path.is_file():
                raise ModelLoadError(f"{index}: shard {name} (of tensor {key}) does not exist in {folder}")
            shards.append(path)
    return weight_map, shards


def tensor_files(folder: Path) -> dict[str, Path]:
    """Each tensor name -> the safetensors file that holds it (see the module docstring); {} when the
    folder has neither an index nor `model.safetensors`."""
    from safetensors import safe_open

    weight_map, shards = index_shards(folder)
    if not shards:
        shards = [folder / SINGLE] if (folder / SINGLE).is_file() else []
    held: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), "pt") as f:
                held.update(dict.fromkeys(f.keys(), shard))
        except Exception as exc:  # safetensors raises its own error type for every kind of damage
            raise ModelLoadError(f"{shard}: not a valid safetensors file ({str(exc)[:200]})") from None
    missing = sorted(set(weight_map) - set(held))
    if missing:
        raise ModelLoadError(f"{folder / INDEX}: tensor {missing[0]} is in none of the shards it names (the index puts it in "
                             f"{weight_map[missing[0]]})" + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    moved = [key for key, name in weight_map.items() if held[key] != folder / PurePosixPath(name.replace("\\", "/"))]
    if moved:
        log.warning("%s: %d tensor(s) are not in the shard the index names (e.g. %s is in %s); reading each from the "
                    "shard that holds it", folder / INDEX, len(moved), moved[0], held[moved[0]].name)
    return held
