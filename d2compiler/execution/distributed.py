"""The processes of a run: one, or several started by torchrun (`torch.distributed`: gloo on the
CPU, NCCL on GPUs).

`Group` is what the rest of the compiler sees: its `rank` and `size`, sums across processes
(`all_reduce`), copies from one process to the others (`broadcast`, `broadcast_json`), and who
does what: contiguous shares of the calibration windows (`share`) and the layers of a block spread
by their cost (`owners`). With one process every operation is the identity, so the single-process
code path is the distributed one with N = 1.

Only JSON and raw tensors cross process boundaries (`broadcast_json` sends UTF-8 bytes); nothing is
pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from d2compiler.errors import D2Error
from d2compiler.lifetime import die_with_parent

TIMEOUT = timedelta(minutes=30)  # a collective that waits longer than this fails (a rank stalled)


def launched_size() -> int:
    """How many processes torchrun started for this run (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class Group:
    """One run's processes (see the module docstring). `device`: where collectives' tensors live (the
    compute device: NCCL needs CUDA tensors)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bytes_reduced: int = 0  # all-reduced bytes so far (for benchmarks)
    bytes_broadcast: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the processes, in place; returns it."""
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        moved = tensor.to(self.device)
        dist.all_reduce(moved)
        self.bytes_reduced += moved.numel() * moved.element_size()
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def total(self, value: float) -> float:
        """`value` summed over the processes (float64)."""
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64)).item()) if self.size > 1 else value

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Process `src`'s `tensor` on every process, in place (same shape and dtype everywhere)."""
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        moved = tensor.to(self.device)
        wire = moved.view(torch.uint8) if moved.dtype == torch.bool else moved
        dist.broadcast(wire, src)
        self.bytes_broadcast += moved.numel() * moved.element_size()
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def broadcast_json(self, value: Any, src: int) -> Any:
        """Process `src`'s JSON-serialisable `value` on every process."""
        if self.size == 1:
            return value
        data = json.dumps(value).encode() if self.rank == src else b""
        length = self.broadcast(torch.tensor([len(data)], dtype=torch.int64), src)
        buffer = torch.zeros(int(length.item()), dtype=torch.uint8)
        if self.rank == src:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return json.loads(bytes(self.broadcast(buffer, src).cpu().numpy()).decode())

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def share(self, count: int) -> range:
        """This process's contiguous share of `count` items (sizes differ by at most one)."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The process that handles each item: largest cost first, each to the least loaded process
        (ties: the lowest rank). The same answer on every process."""
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            owner[i] = rank
            load[rank] += costs[i]
        return owner


SINGLE = Group()


def join(device: torch.device) -> Group:
    """The group of this process: joins torchrun's process group when torchrun started several (NCCL
    on CUDA, each process on its local GPU; gloo on the CPU); else a group of one."""
    size = launched_size()
    if size == 1:
        return Group(device=device)
    import torch.distributed as dist

    die_with_parent()
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise D2Error(f"process {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Group(rank=rank, size=size, device=device)


def leave(group: Group) -> None:
    """Wait for every process, then leave the process group (if one was joined)."""
    if group.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
