"""Compact 2:4 storage: of every 4 consecutive inputs of a row, the 2 kept values (in order) and
their 2 positions (2 bits each, one nibble per group, two groups per byte). See docs/format.md.

`Packed24Linear` replaces an `nn.Linear` whose weight is exactly 2:4 (at most 2 nonzeros in every
group of 4 inputs). On CUDA with fp16/bf16 it multiplies with `torch.sparse.to_sparse_semi_structured`
(the sparse tensor cores); elsewhere it unpacks the compact storage to the dense weight for each
call, which reproduces the pruned dense layer bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Buffers a quantization pass attaches to a linear (scale and integer zero point per group); they
# travel with the layer when it is packed or unpacked.
QUANT_BUFFERS = ("weight_scale", "weight_zero_point")
BANK_SEPARATOR = "__"  # a 3-D expert bank `attr` keeps its experts' buffers, stacked, as `attr__weight_scale`


def bank_buffer_name(attr: str, buffer: str) -> str:
    """The name, on the bank's owner module, of the stacked per-expert `buffer` of the bank `attr`."""
    return f"{attr}{BANK_SEPARATOR}{buffer}"


def is_quant_buffer(key: str) -> bool:
    """Whether a state-dict key is a quantization buffer: a linear's `weight_scale` /
    `weight_zero_point`, or a bank's stacked `attr__weight_scale` / `attr__weight_zero_point`."""
    last = key.rpartition(".")[2]
    attr, separator, buffer = last.rpartition(BANK_SEPARATOR)
    return last in QUANT_BUFFERS or (bool(attr and separator) and buffer in QUANT_BUFFERS)


def carry_quant_buffers(source: nn.Module, target: nn.Module) -> None:
    """Register `source`'s quantization buffers (if any) on `target`."""
    for buffer in QUANT_BUFFERS:
        if hasattr(source, buffer):
            target.register_buffer(buffer, getattr(source, buffer))


def violations_2_4(weight: torch.Tensor) -> int:
    """How many groups of 4 consecutive inputs hold more than 2 nonzeros (0 = exactly 2:4)."""
    out_f, in_f = weight.shape
    if in_f % 4:
        return out_f * -(-in_f // 4)
    return int(((weight != 0).reshape(out_f, in_f // 4, 4).sum(-1) > 2).sum())


def pack_two_of_four(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2) in the weight's dtype, meta (out, in/8) uint8) of an exactly 2:4 weight.
    A group with fewer than 2 nonzeros stores zeros at unused positions."""
    out_f, in_f = weight.shape
    if in_f % 8:
        raise ValueError(f"in_features={in_f} must be a multiple of 8 for 2:4 packing")
    groups = weight.reshape(out_f, in_f // 4, 4)
    nonzero = groups != 0
    # Stable order: nonzeros first (by position), then the zero positions; keep the first two.
    order = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :2]
    order, _ = torch.sort(order, dim=-1)
    values = torch.gather(groups, -1, order).reshape(out_f, in_f // 2)
    nibble = (order[..., 0] | (order[..., 1] << 2)).to(torch.uint8).reshape(out_f, in_f // 8, 2)
    meta = nibble[..., 0] | (nibble[..., 1] << 4)
    return values.contiguous(), meta.contiguous()


def unpack_two_of_four(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) weight of packed 2:4 storage."""
    out_f, half = values.shape
    in_f = half * 2
    nibble = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(out_f, in_f // 4).to(torch.int64)
    positions = torch.stack([nibble & 0x3, nibble >> 2], dim=-1)  # (out, groups, 2)
    dense = torch.zeros(out_f, in_f // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(out_f, in_f // 4, 2))
    return dense.reshape(out_f, in_f)


class Packed24Linear(nn.Module):
    """A linear layer stored as packed 2:4 (see the module docstring)."""

    replaces_linear = True  # `graph.find_blocks` still finds the blocks that hold it

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor, meta: torch.Tensor,
                 bias: torch.Tensor | None, transposed: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed  # the layer it replaced stored (in, out) (GPT-2's Conv1D)
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._semi_structured: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False) -> Packed24Linear:
        """Pack an (out, in) weight (exactly 2:4)."""
        values, meta = pack_two_of_four(weight.detach())
        return cls(weight.shape[1], weight.shape[0], values, meta, bias, transposed)

    @classmethod
    def replacing(cls, module: nn.Module, weight: torch.Tensor, transposed: bool) -> Packed24Linear:
        """The packed replacement of `module` whose (out, in) weight is `weight`, with its bias and
        quantization buffers, on the module's device."""
        packed = cls.from_weight(weight, getattr(module, "bias", None), transposed)
        carry_quant_buffers(module, packed)
        return packed.to(weight.device)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight."""
        return unpack_two_of_four(self.values, self.meta)

    def original_weight(self) -> torch.Tensor:
        """The weight in the layout of the layer it replaced (for dense exports)."""
        weight = self.dense_weight()
        return weight.t().contiguous() if self.transposed else weight

    def _apply(self, fn, recurse=True):  # moving or casting invalidates the CUDA sparse weight
        self._semi_structured = None
        return super()._apply(fn, recurse)

    def _sparse_weight(self) -> torch.Tensor | None:
        """The CUDA semi-structured weight (fp16/bf16 only), built once."""
        if self.values.device.type != "cuda" or self.values.dtype not in (torch.float16, torch.bfloat16):
            return None
        if self._semi_structured is None:
            from torch.sparse import to_sparse_semi_structured

            self._semi_structured = to_sparse_semi_structured(self.dense_weight())
        return self._semi_structured

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sparse = self._sparse_weight()
        if sparse is not None and x.dim() >= 2 and x.dtype == sparse.dtype:
            return F.linear(x, sparse, self.bias)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dense_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=2:4"


def unpack_linears(model: nn.Module) -> None:
    """Replace every `Packed24Linear` of `model` by a plain `nn.Linear` holding its dense weight
    (float32) and its quantization buffers, for the exporters that store dense weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Packed24Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(module.dense_weight().float(), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
            carry_quant_buffers(module, linear)
            model.set_submodule(name, linear)
