"""The output of a streaming run, assembled shard by shard: the run's block files (already the pruned
blocks' tensors under their full names) become `model-0000K-of-0000N.safetensors` (hard-linked when
the file system allows, else copied), the tensors outside the blocks go into the first shard, and
`model.safetensors.index.json` maps every tensor to its shard, as transformers writes a sharded
checkpoint. A model whose source checkpoint stores some tensors in its own layout (Mixture-of-Experts
banks saved one tensor per expert, `graph.checkpoint_layout`) gets them written back in that
layout, as `save_pretrained` does. The folder loads with `from_pretrained`."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from math import prod
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from d2compiler.errors import OutputError
from d2compiler.export.hf import write_metadata
from d2compiler.export.output_dir import atomic_output_dir
from d2compiler.graph.checkpoint_layout import Piece, pieces_of
from d2compiler.tensor_file import DTYPES, TensorFileWriter
from d2compiler.weight_index import INDEX

Layout = tuple[Collection[str], Callable[[dict[str, Any]], dict[str, Any]]]  # (converted names, model -> checkpoint names)
PiecesOf = Callable[[str], "list[Piece] | None"]  # a model tensor's pieces in the checkpoint's layout; None: stored as is
STORED = {code: dtype for dtype, code in DTYPES.items()}  # safetensors dtype names -> torch


def _as_is(tensors: dict[str, Any]) -> dict[str, Any]:
    return tensors


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def split_by_expert(src: Path, dst: Path, pieces_of_name: PiecesOf) -> None:
    """`src` rewritten as `dst` in the checkpoint's own layout, one expert at a time: each tensor that
    `pieces_of_name` converts ([E, ...] banks) is read expert by expert and written as its pieces;
    the others are copied (by first-dimension entry when they have three dimensions)."""
    writer = TensorFileWriter(dst, header_bytes=None)
    plan: list[tuple[str, list[Piece] | None, tuple[int, ...]]] = []
    with safe_open(str(src), "pt") as f:
        for key in sorted(f.keys()):
            part = f.get_slice(key)
            shape, dtype = tuple(part.get_shape()), STORED[part.get_dtype()]
            pieces = pieces_of_name(key)
            for name, piece_shape in ([(key, shape)] if pieces is None else [(pc.key, pc.shape()) for pc in pieces]):
                writer.declare(name, dtype, piece_shape)
            plan.append((key, pieces, shape))
        for key, pieces, shape in plan:
            if len(shape) < 3:  # not a bank: small, converted whole
                parts = {key: f.get_tensor(key)} if pieces is None else pieces_of(f.get_tensor(key), pieces)
                for name, tensor in parts.items():
                    writer.write(name, tensor)
                continue
            width = 1 if pieces is None else pieces[0].width
            per = prod(shape[1:]) // width  # rows (as (-1, width)) in one expert
            owner = {} if pieces is None else {id(pc): int(pc.rows.min()) // per for pc in pieces}
            if pieces is not None and any(int(pc.rows.max()) // per != owner[id(pc)] for pc in pieces):
                raise OutputError(f"{key}: a checkpoint tensor of it holds rows of several experts; it cannot be written "
                                  "expert by expert")
            for e in range(shape[0]):
                expert = f.get_slice(key)[e : e + 1][0]
                if pieces is None:
                    writer.write_entry(key, e, expert)
                    continue
                mine = [replace(pc, rows=pc.rows - e * per) for pc in pieces if owner[id(pc)] == e]  # rows within the expert
                for name, tensor in pieces_of(expert, mine).items():
                    writer.write(name, tensor)
    writer.close()


def shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_sharded_output(path: Path, outside: dict[str, torch.Tensor], block_files: list[Path], config: Any,
                         generation_config: Any, tokenizer: Any, record: dict[str, Any], *, overwrite: bool,
                         protected: Iterable[Path] = (), layout: Layout | None = None, by_expert: PiecesOf | None = None) -> Path:
    """Write the output folder from the tensors outside the blocks and the run's block files;
    nothing appears at `path` until complete. With `layout` ((the model tensors the source
    checkpoint stores in its own layout, the function that splits tensors into that layout), see
    `StreamedModel.in_checkpoint_layout`), those tensors are written as the checkpoint stores them (a
    block file holding one is rewritten, not linked); with `by_expert` (a tensor name -> its pieces),
    rewritten one expert at a time (`split_by_expert`), never whole."""
    converted, split = layout or (frozenset(), _as_is)
    with atomic_output_dir(path, overwrite, protected) as tmp:
        names = shard_names(len(block_files) + 1)
        outside = split({k: v.detach().to("cpu") for k, v in outside.items()})
        save_file({k: v.contiguous() for k, v in outside.items()}, str(tmp / names[0]), metadata={"format": "pt"})
        weight_map = dict.fromkeys(outside, names[0])
        for file, name in zip(block_files, names[1:]):
            with safe_open(str(file), "pt") as f:
                held = converted.intersection(f.keys())
                if held and by_expert is not None:
                    split_by_expert(file, tmp / name, by_expert)
                elif held:
                    save_file(split({k: f.get_tensor(k) for k in f.keys()}), str(tmp / name), metadata={"format": "pt"})
            if not (tmp / name).exists():
                _link_or_copy(file, tmp / name)
            with safe_open(str(tmp / name), "pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), name))
        total = sum((tmp / n).stat().st_size for n in names)
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                            indent=2) + "\n")
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        write_metadata(tmp, tokenizer, record)
    return path
