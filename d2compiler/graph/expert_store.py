"""Experts held one group at a time: a bank whose parameter stays on the meta device (never whole in
memory) and whose experts are read when a group of them is needed.

An `ExpertStore` is attached to the module that owns the banks (`attach_store`). It holds the
*resident* experts — one [out, in] tensor per (bank, expert), in the compute dtype on the compute
device — read through its `read(attr, expert)` (e.g. `StreamedModel.read_source_expert`). While
the owner runs (`graph.experts`' wrapped forward), `ExpertCalls` serves `bank[e]` from the store:
a resident expert's products run through its `ExpertSlice` as usual, and the product of an expert
that is not resident is zeros (nothing is read or computed for it). `ExpertSlice.weight` is the
resident tensor, so a pass reads and writes it in place as it would a view of the bank.

Giving the owner routing weights of zero for the tokens of the experts that are not resident
(`group_call`) makes its output the contribution of the resident experts alone: the outputs of the
transformers-5 experts interface are sums over the routed (token, expert) pairs of weight × expert
output, so the sum of the group outputs over groups that cover every expert is the whole output.
To keep that sum in the module's own order (the same bits as one call over all experts), a group's
call can start from the sum so far (`start`): the module's `zeros_like(hidden)` accumulator is then
that tensor, to which the other experts add exact zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from d2compiler.errors import D2Error, PassError

ReadExpert = Callable[[str, int], torch.Tensor]  # (bank attribute, expert) -> [out, in] as stored


class ExpertStore:
    """The resident experts of one owner's banks (see the module docstring)."""

    def __init__(self, attrs: Iterable[str], read: ReadExpert, dtype: torch.dtype, device: torch.device,
                 group_size: int | None = None):
        self.attrs = sorted(attrs)
        self.read, self.dtype, self.device = read, dtype, device
        self.group_size = group_size  # experts resident at once in a plain forward (None: all)
        self.start: torch.Tensor | None = None  # the accumulator the owner's next output call adds into (`ExpertCalls`)
        self.started = False  # whether the last output call took it
        self.resident: dict[tuple[str, int], torch.Tensor] = {}

    def load(self, experts: Iterable[int]) -> None:
        """Make `experts` resident in every bank (read once; an expert already resident is kept as it is)."""
        for e in experts:
            for attr in self.attrs:
                if (attr, e) not in self.resident:
                    # a copy: a tensor read from a file may be a misaligned view of its mapping, and matrix
                    # products round differently on misaligned operands than on the model's own tensors
                    tensor = self.read(attr, e).to(device=self.device, dtype=self.dtype, copy=True)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise PassError(f"expert {e} of bank {attr}: the weights hold NaN or Inf")
                    self.resident[(attr, e)] = tensor

    def experts(self) -> list[int]:
        """The resident experts, in order."""
        return sorted({e for _attr, e in self.resident})

    def get(self, attr: str, expert: int) -> torch.Tensor | None:
        return self.resident.get((attr, expert))

    def weight(self, attr: str, expert: int) -> torch.Tensor:
        """The resident tensor of expert `expert` of bank `attr`; an error when it is not resident."""
        tensor = self.resident.get((attr, expert))
        if tensor is None:
            raise D2Error(f"expert {expert} of bank {attr} is not loaded (experts are held one group at a time); "
                          f"loaded: {self.experts()[:8]}")
        return tensor

    def drop(self) -> None:
        """Forget every resident expert (their memory is freed once no one else holds them)."""
        self.resident.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.resident.values())


def attach_store(owner: nn.Module, store: ExpertStore | None) -> None:
    """Serve `owner`'s banks from `store` (None: from the parameters again)."""
    object.__setattr__(owner, "_d2c_expert_store", store)


def store_of(owner: nn.Module) -> ExpertStore | None:
    return getattr(owner, "_d2c_expert_store", None)


def group_call(args: tuple, experts: list[int]) -> tuple:
    """The experts-interface call `args` = (hidden, top_k_index, top_k_weights, ...) with the routing
    weights of every expert outside `experts` set to zero (see the module docstring)."""
    hidden, index, weights, *rest = args
    keep = torch.isin(index, torch.tensor(experts, dtype=index.dtype, device=index.device))
    return (hidden, index, weights * keep.to(weights.dtype), *rest)
