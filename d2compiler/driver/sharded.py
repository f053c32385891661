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
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from d2compiler.export.hf import write_metadata
from d2compiler.export.output_dir import atomic_output_dir
from d2compiler.weight_index import INDEX

Layout = tuple[Collection[str], Callable[[dict[str, Any]], dict[str, Any]]]  # (converted names, model -> checkpoint names)


def _as_is(tensors: dict[str, Any]) -> dict[str, Any]:
    return tensors


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_sharded_output(path: Path, outside: dict[str, torch.Tensor], block_files: list[Path], config: Any,
                         generation_config: Any, tokenizer: Any, record: dict[str, Any], *, overwrite: bool,
                         protected: Iterable[Path] = (), layout: Layout | None = None) -> Path:
    """Write the output folder from the tensors outside the blocks and the run's block files;
    nothing appears at `path` until complete. With `layout` ((the model tensors the source
    checkpoint stores in its own layout, the function that splits tensors into that layout), see
    `StreamedModel.in_checkpoint_layout`), those tensors are written as the checkpoint stores them (a
    block file holding one is rewritten, not linked)."""
    converted, split = layout or (frozenset(), _as_is)
    with atomic_output_dir(path, overwrite, protected) as tmp:
        names = shard_names(len(block_files) + 1)
        outside = split({k: v.detach().to("cpu") for k, v in outside.items()})
        save_file({k: v.contiguous() for k, v in outside.items()}, str(tmp / names[0]), metadata={"format": "pt"})
        weight_map = dict.fromkeys(outside, names[0])
        for file, name in zip(block_files, names[1:]):
            with safe_open(str(file), "pt") as f:
                if converted.intersection(f.keys()):
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
