"""Per-block checkpoints that prove themselves, so a killed run resumes where it stopped and never
resumes into wrong weights.

The work folder sits beside the output (`.<name>.d2c-work`, never at the output path itself) and
holds, after block k has finished:

- `block-0000.safetensors` ... `block-k.safetensors`: each finished block's parameters and buffers,
  under their full names (`model.layers.3.mlp.up_proj.weight`), so that a streaming run's output
  shards are these very files;
- `hidden-k.safetensors`: the hidden states that enter block k+1 (one tensor per calibration batch;
  only the latest is kept: the previous one is deleted once the new state is durable);
- `state.json`: the job fingerprint (see `pipeline.job_fingerprint`), the number of finished blocks,
  their reports, and the sha256 of every file above.

Every file is written to a temporary name and renamed, and `state.json` is replaced last, so a kill
at any instant leaves the previous consistent state. Writes run on one background thread, so the
compute device goes on with the next block; `flush` waits for them.

On resume every file is checked against its recorded sha256. A missing, truncated or altered block
file discards the checkpoints from that block on (with a warning); altered hidden states are
recomputed from the restored blocks. Either way the run continues and the final weights are
byte-identical to an uninterrupted run. A folder whose fingerprint differs (another recipe, model,
calibration data or package version) is discarded with a warning. The folder is removed once the
output is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from d2compiler.errors import OutputError
from d2compiler.execution.streaming import as_stored
from d2compiler.graph.layers import weight_is_transposed
from d2compiler.graph.packing import Packed24Linear

log = logging.getLogger(__name__)

FORMAT = 3
STATE = "state.json"


def work_dir_for(output: Path) -> Path:
    """The work folder of an output path."""
    return output.parent / f".{output.name}.d2c-work"


def fingerprint(payload: Any) -> str:
    """A stable hash of a JSON-serialisable description of what a run's blocks depend on."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def block_file(index: int) -> str:
    return f"block-{index:04d}.safetensors"


def hidden_file(index: int) -> str:
    return f"hidden-{index:04d}.safetensors"


@dataclass
class Resumed:
    """What a previous run left that checked out: the number of verified finished blocks, their
    reports, and the hidden states entering the next block (None: recompute them from the blocks)."""

    blocks_done: int
    reports: list[dict[str, Any]]
    hidden: list[torch.Tensor] | None


class CheckpointStore:
    """Reads and writes a run's work folder (see the module docstring)."""

    def __init__(self, folder: Path, key: str, processes: int = 1, storage_dtype: torch.dtype | None = None):
        self.folder = folder
        self.key = key
        self.processes = processes  # the run's process count: a resume needs the same
        self.storage_dtype = storage_dtype  # finished blocks' floating tensors are stored in it (None: as they are)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2c-checkpoint")
        self._pending: Future | None = None
        self._files: dict[str, str] = {}

    def _write_atomic(self, name: str, write: Any) -> str:
        """Write `name` through a temporary file; returns its sha256."""
        tmp = self.folder / f".{name}.tmp"
        try:
            write(tmp)
            digest = file_sha256(tmp)
            os.replace(tmp, self.folder / name)
        except OSError as exc:
            raise OutputError(f"{self.folder / name}: cannot write the checkpoint: {exc.strerror or exc}") from None
        except Exception as exc:  # safetensors reports a full disk as its own error type
            raise OutputError(f"{self.folder / name}: cannot write the checkpoint: {exc}") from None
        return digest

    def _write_state(self, blocks_done: int, reports: list[dict[str, Any]]) -> None:
        state = {"format": FORMAT, "key": self.key, "processes": self.processes, "blocks_done": blocks_done,
                 "reports": reports, "files": self._files}
        self._write_atomic(STATE, lambda p: p.write_text(json.dumps(state, default=str)))

    def _state(self) -> dict[str, Any] | None:
        try:
            state = json.loads((self.folder / STATE).read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("format") == FORMAT else None

    def _verified(self, name: str, files: dict[str, str]) -> bool:
        """The file exists and has the recorded sha256; warns otherwise."""
        path = self.folder / name
        expected = files.get(name)
        if not path.is_file() or expected is None:
            log.warning("%s: checkpoint file missing; recomputing from there", path)
            return False
        if file_sha256(path) != expected:
            log.warning("%s: checkpoint file altered or truncated (sha256 mismatch); recomputing from there", path)
            return False
        return True

    def check_processes(self) -> None:
        """Refuse (keeping them) checkpoints of this job written by a run with another process count."""
        state = self._state()
        if state is not None and state.get("key") == self.key and state.get("processes", 1) != self.processes:
            raise OutputError(f"{self.folder}: these checkpoints are from a run with {state.get('processes', 1)} processes and "
                              f"this run has {self.processes}: the split changes how sums are rounded, so resume with "
                              f"--nproc {state.get('processes', 1)}, or start over with --restart")

    def start(self) -> Resumed | None:
        """Open the work folder. Returns what an earlier run of the same job finished and that
        verifies, or None (a folder from another job, or with nothing usable, is discarded)."""
        self.check_processes()
        state = self._state()
        if state is not None and state.get("key") != self.key:
            log.warning("%s: checkpoints of a different recipe, model, calibration data or package version; "
                        "starting over", self.folder)
            state = None
        files = state.get("files", {}) if state is not None else {}
        done = int(state.get("blocks_done", 0)) if state is not None else 0
        valid = next((i for i in range(done) if not self._verified(block_file(i), files)), done)
        if not valid:
            self.discard()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot create the work folder: {exc.strerror}") from exc
        self._files = {block_file(i): files[block_file(i)] for i in range(valid)}
        for stale in self.folder.iterdir():  # files of discarded blocks and temporary files of a killed write
            if stale.name != STATE and stale.name not in self._files and not (valid == done and stale.name == hidden_file(done - 1)):
                stale.unlink(missing_ok=True)
        if not valid:
            self._write_state(0, [])
            return None
        hidden = None
        if valid == done and self._verified(hidden_file(done - 1), files):
            loaded = load_file(self.folder / hidden_file(done - 1))
            hidden = [loaded[f"h{i}"] for i in range(len(loaded))]
            self._files[hidden_file(done - 1)] = files[hidden_file(done - 1)]
        reports = list(state["reports"])[:valid]
        if valid < done or hidden is None:
            self._write_state(valid, reports)
        return Resumed(valid, reports, hidden)

    def path(self, index: int) -> Path:
        """The file of finished block `index`."""
        return self.folder / block_file(index)

    def reader(self, index: int) -> Any:
        """Read block `index`'s tensors by full name (a streaming run loads blocks from here)."""
        from d2compiler.execution.streaming import file_reader

        self.flush()
        return file_reader(self.path(index))

    def restore_block(self, index: int, block: nn.Module, prefix: str = "") -> None:
        """Load finished block `index`'s parameters and buffers (stored under `prefix` + local name)
        into `block` (exactly); layers a pass replaced by `Packed24Linear` are rebuilt packed."""
        self.flush()
        tensors = {k[len(prefix):]: v for k, v in load_file(self.path(index)).items()}
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

    def save_block(self, index: int, block: nn.Module, hidden: list[torch.Tensor], reports: list[dict[str, Any]],
                   prefix: str = "") -> None:
        """Record that block `index` is finished, with the hidden states entering the next block. The
        tensors are taken to the CPU here (a device copy; CPU tensors are referenced, not copied: a
        finished block is never modified again, and the caller may release it at once); the files
        are written on the background thread."""
        params = {prefix + name: as_stored(t.detach().to("cpu"), self.storage_dtype).contiguous() for name, t in block.state_dict().items()}
        states = {f"h{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}
        self.flush()
        self._pending = self._writer.submit(self._save, index, params, states, list(reports))

    def adopt_block(self, index: int, written: Path, hidden: list[torch.Tensor], reports: list[dict[str, Any]]) -> None:
        """`save_block` for a block whose file is already written (`experts_by_group`: never whole in
        memory): `written` becomes the block's file."""
        states = {f"h{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}
        self.flush()
        self._pending = self._writer.submit(self._save, index, written, states, list(reports))

    def _save(self, index: int, params: dict[str, torch.Tensor] | Path, states: dict[str, torch.Tensor],
              reports: list[dict[str, Any]]) -> None:
        write = (lambda p: os.replace(params, p)) if isinstance(params, Path) else \
            (lambda p: save_file(params, str(p), metadata={"format": "pt"}))
        self._files[block_file(index)] = self._write_atomic(block_file(index), write)
        self._files[hidden_file(index)] = self._write_atomic(hidden_file(index), lambda p: save_file(states, str(p)))
        previous = hidden_file(index - 1)
        self._files.pop(previous, None)
        self._write_state(index + 1, reports)
        (self.folder / previous).unlink(missing_ok=True)  # only after the new state is durable

    def flush(self) -> None:
        """Wait for the pending write; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def discard(self) -> None:
        try:
            self.flush()
        except OutputError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
