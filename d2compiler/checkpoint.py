"""Per-block checkpoints, so a killed run resumes where it stopped.

The work folder sits beside the output (`.<name>.d2c-work`, never at the output path itself) and
holds, after block k has finished:

- `block-0000.safetensors` ... `block-k.safetensors`: each finished block's parameters;
- `hidden.safetensors`: the hidden states that enter block k+1 (one tensor per calibration window);
- `state.json`: the fingerprint of what the run depends on (model, calibration data, passes), the
  number of finished blocks and their reports.

Every file is written to a temporary name and renamed, and `state.json` is replaced last, so a kill
at any instant leaves the previous consistent state. Re-running the same recipe loads the finished
blocks and hidden states and continues with the next block; because all of these are stored
exactly (safetensors, fp32 stays fp32) the final weights are byte-identical to an uninterrupted run.
A folder whose fingerprint differs (another recipe) is discarded with a warning. The folder is
removed once the output is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import OutputError
from .graph import weight_is_transposed
from .packing import Packed24Linear

log = logging.getLogger(__name__)

FORMAT = 1


def work_dir_for(output: Path) -> Path:
    """The work folder of an output path."""
    return output.parent / f".{output.name}.d2c-work"


def fingerprint(payload: Any) -> str:
    """A stable hash of a JSON-serialisable description of what a run's blocks depend on."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Resumed:
    """What a previous run left: finished block count, their reports and the next block's hidden states."""

    blocks_done: int
    reports: list[dict[str, Any]]
    hidden: list[torch.Tensor]


class CheckpointStore:
    """Reads and writes a run's work folder (see the module docstring)."""

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        self.key = key

    def _write_atomic(self, name: str, write: Any) -> None:
        tmp = self.folder / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, self.folder / name)

    def _state(self) -> dict[str, Any] | None:
        path = self.folder / "state.json"
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return state if isinstance(state, dict) and state.get("format") == FORMAT else None

    def start(self) -> Resumed | None:
        """Open the work folder. Returns what an earlier run of the same job finished, or None
        (a stale folder from another job is discarded)."""
        state = self._state()
        if state is not None and state.get("key") != self.key:
            log.warning("%s: checkpoints of a different recipe or model; starting over", self.folder)
            state = None
        if state is None or not state.get("blocks_done"):
            self.discard()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot create the work folder: {exc.strerror}") from exc
        if state is None or not state.get("blocks_done"):
            self._write_atomic("state.json", lambda p: p.write_text(json.dumps({"format": FORMAT, "key": self.key, "blocks_done": 0, "reports": []})))
            return None
        hidden_file = load_file(self.folder / "hidden.safetensors")
        hidden = [hidden_file[f"h{i}"] for i in range(len(hidden_file))]
        return Resumed(int(state["blocks_done"]), list(state["reports"]), hidden)

    def restore_block(self, index: int, block: nn.Module) -> None:
        """Load finished block `index`'s parameters and buffers into `block` (exactly); layers a pass
        replaced by `Packed24Linear` are rebuilt packed."""
        tensors = load_file(self.folder / f"block-{index:04d}.safetensors")
        device = next(block.parameters()).device
        for owner in {k.rpartition(".")[0] for k in tensors if k.endswith(".meta") and k[:-5] + ".values" in tensors}:
            module = block.get_submodule(owner)
            if not isinstance(module, Packed24Linear):  # a pass packed this layer: rebuild it packed
                values, meta = tensors[f"{owner}.values"], tensors[f"{owner}.meta"]
                packed = Packed24Linear(values.shape[1] * 2, values.shape[0], values, meta, getattr(module, "bias", None),
                                        weight_is_transposed(module))
                block.set_submodule(owner, packed.to(device))
        current = block.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name in current:
                    current[name].copy_(tensor.to(current[name].dtype))
                else:  # a buffer a pass added (e.g. quantization scales)
                    owner, _, buffer = name.rpartition(".")
                    module = block.get_submodule(owner) if owner else block
                    module.register_buffer(buffer, tensor.to(device))

    def save_block(self, index: int, block: nn.Module, hidden: list[torch.Tensor], reports: list[dict[str, Any]]) -> None:
        """Record that block `index` is finished, with the hidden states entering the next block."""
        params = {name: t.detach().to("cpu").contiguous().clone() for name, t in block.state_dict().items()}
        self._write_atomic(f"block-{index:04d}.safetensors", lambda p: save_file(params, str(p)))
        states = {f"h{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}
        self._write_atomic("hidden.safetensors", lambda p: save_file(states, str(p)))
        state = {"format": FORMAT, "key": self.key, "blocks_done": index + 1, "reports": reports}
        self._write_atomic("state.json", lambda p: p.write_text(json.dumps(state, default=str)))

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
