"""A prunable linear of a block (`LinearLayer`): a module, a row slice of a fused module, or one
expert of a 3-D bank, seen as an (out, in) matrix that passes read and write."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def is_linear_module(module: nn.Module) -> bool:
    """nn.Linear, or a transformers `Conv1D` (a linear with a transposed (in, out) weight)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def weight_is_transposed(module: nn.Module) -> bool:
    """A Conv1D (as in GPT-2) and an expert bank used as `x @ W[e]` store their weight as (in, out)."""
    return type(module).__name__ == "Conv1D" or bool(getattr(module, "transposed_weight", False))


def slice_name(module: str, role: str) -> str:
    """The name of one role's row slice of a fused linear: `attn.c_attn[q]`."""
    return f"{module}[{role}]"


def split_slice_name(name: str) -> tuple[str, str | None]:
    """(module name, role) of a slice name; (name, None) for a whole module's name."""
    module, _, role = name.partition("[")
    return module, (role[:-1] if role else None)


def fused_role(slice_role: str) -> str:
    """The role of a whole fused linear from one of its slices' roles: `qkv` (attention) or `gate_up`."""
    return "gate_up" if slice_role in ("gate", "up") else "qkv"


@dataclass
class LinearLayer:
    """A prunable linear of a block, bound to its module."""

    name: str  # full name: the module's, plus "[role]" for a slice of a fused weight
    local_name: str  # name inside the block, likewise
    module: nn.Module
    role: str
    rows: tuple[int, ...] | None = None  # for a slice of a fused weight: its output rows (start, stop[, step])
    expert_list: str | None = None  # for an expert of a `ModuleList` of experts (`graph.expert_lists`): the list's name

    @property
    def row_slice(self) -> slice:
        """The slice's output rows (every row for a whole module): `start:stop`, or `start:stop:step`
        for an interleaved slice (gpt-oss's `gate_up_proj` keeps gate and up in alternate rows)."""
        return slice(*self.rows) if self.rows else slice(None)

    @property
    def owner(self) -> str:
        """The module's name inside the block (the local name without a slice suffix)."""
        return split_slice_name(self.local_name)[0]

    @property
    def transposed(self) -> bool:
        return weight_is_transposed(self.module)

    @property
    def is_expert(self) -> bool:
        """One expert of a 3-D expert bank (`graph.expert_calls.ExpertSlice`), not a module of its own."""
        return hasattr(self.module, "bank")

    @property
    def routed(self) -> bool:
        """A Mixture-of-Experts expert (of a 3-D bank or of a list): it sees only the tokens routed to it."""
        return self.is_expert or self.expert_list is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of this layer (of the slice, for a slice)."""
        shape = getattr(self.module, "weight_shape", None) or self.module.weight.shape  # an expert need not be loaded
        out_f, in_f = (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])
        return (len(range(out_f)[self.row_slice]), in_f)

    def whole(self) -> LinearLayer:
        """The whole module as one layer (itself, unless this is a slice)."""
        if self.rows is None:
            return self
        return LinearLayer(split_slice_name(self.name)[0], self.owner, self.module, fused_role(self.role))

    def replaced_weight(self, value: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The module's weight with this layer's (out, in) matrix replaced by `value`, as a new tensor
        in the parameter's layout (the module is not touched; `base`: start from this tensor instead of
        the parameter, to compose the slices of a fused weight)."""
        full = (self.module.weight.detach() if base is None else base).clone()
        target = full.t() if self.transposed else full
        target[self.row_slice] = value.to(dtype=target.dtype, device=target.device)
        return full

    def stand_in(self, weights: dict[str, torch.Tensor], value: torch.Tensor) -> None:
        """Put this layer's (out, in) matrix `value` into `weights` (block parameter name -> tensor, for
        a functional call of the block), composed with the other slices of a fused weight already there."""
        if self.is_expert:  # expert e of a 3-D bank: the bank with that expert's matrix (or its rows) replaced
            key = self.owner.rpartition(".")[0]
            bank = (weights[key] if key in weights else self.module.bank.detach()).clone()
            target = bank[self.module.index].t() if self.transposed else bank[self.module.index]
            target[self.row_slice] = value.to(dtype=target.dtype, device=target.device)
            weights[key] = bank
            return
        key = f"{self.owner}.weight"
        weights[key] = self.replaced_weight(value, base=weights.get(key))

    def weight_matrix(self) -> torch.Tensor:
        """The weight as an (out, in) view of the parameter data (no copy); a slice's rows only."""
        w = self.module.weight.data
        w = w.t() if self.transposed else w
        return w[self.row_slice]

    def output_of(self, output: torch.Tensor) -> torch.Tensor:
        """This layer's part of the module's forward output (its features, for a slice)."""
        return output[..., self.row_slice]

    def set_row_buffer(self, name: str, value: torch.Tensor) -> None:
        """Register a per-output-row buffer (e.g. a quantization scale) on the module; a slice writes
        its rows of one module-sized buffer, zeros until every slice has written; an expert of a bank,
        its rows of the bank's stacked buffer."""
        value = value.to(self.module.weight.device)
        if self.is_expert:  # kept stacked on the bank's owner (`ExpertSlice.set_row_buffer`)
            self.module.set_row_buffer(name, self.row_slice, value)
            return
        if self.rows is None:
            self.module.register_buffer(name, value)
            return
        full_rows = self.whole().shape[0]
        current = getattr(self.module, name, None)
        if not isinstance(current, torch.Tensor) or current.shape != (full_rows, *value.shape[1:]):
            current = torch.zeros((full_rows, *value.shape[1:]), dtype=value.dtype, device=value.device)
            self.module.register_buffer(name, current)
        current[self.row_slice] = value

    def set_weight_matrix(self, value: torch.Tensor) -> None:
        """Write an (out, in) matrix back, in the parameter's dtype and device."""
        target = self.weight_matrix()
        target.copy_(value.to(dtype=target.dtype, device=target.device))
