"""Attention distributions of a block, recomputed from the captured query and key tensors.

A `TorchFunctionMode` intercepts the attention op that tracing found in the block: for a fused
`scaled_dot_product_attention` it records the query, key (after rotary embedding), the mask, the
scale and the causal / GQA flags; for eager attention it records the softmax output. With
`stop=True` the block's forward is abandoned right after the capture, so evaluating a candidate
costs only the block's prefix up to attention (norm, projections, rotary), never o_proj or the MLP.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)


class _StopAtAttention(Exception):
    pass


@dataclass
class AttentionCall:
    """One attention op call: either q/k (+ mask, scale, flags) or already-computed probabilities."""

    may_hold_inf = True  # additive masks hold -inf; not a statistic to check for finiteness

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    scale: float | None = None
    causal: bool = False
    probs: torch.Tensor | None = None
    output: torch.Tensor | None = None  # the attention op's output, when recorded

    def with_key_of(self, other: AttentionCall) -> AttentionCall:
        """This call's query (and mask, scale, flags) with `other`'s key: q and k come from separate
        projections, so a candidate's attention can be assembled from two prefix runs."""
        if self.q is None or other.k is None:
            raise ValueError("with_key_of needs q/k captures (fused attention), not probabilities")
        return AttentionCall(q=self.q, k=other.k, mask=self.mask, scale=self.scale, causal=self.causal)

    def log_probs(self) -> torch.Tensor:
        """Log attention probabilities, shape (batch, heads, queries, keys); -inf where masked."""
        if self.probs is not None:
            return torch.log(self.probs.float())
        q, k = self.q.float(), self.k.float()
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention: each key head serves a group
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if self.causal:
            t, s = scores.shape[-2:]
            keep = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(diagonal=s - t)
            scores = scores.masked_fill(~keep, float("-inf"))
        if self.mask is not None:
            mask = self.mask
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        return torch.log_softmax(scores, dim=-1)


class _Capture(TorchFunctionMode):
    def __init__(self, kind: str, stop: bool, sink: list[AttentionCall], keep_output: bool = False):
        super().__init__()
        self.kind, self.stop, self.sink, self.keep_output = kind, stop, sink, keep_output

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.kind == "sdpa" and func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            bound = dict(zip(names, args)) | kwargs
            call = AttentionCall(q=bound["query"].detach(), k=bound["key"].detach(),
                                 mask=bound.get("attn_mask"), scale=bound.get("scale"),
                                 causal=bool(bound.get("is_causal", False)))
            self.sink.append(call)
            if self.stop:
                raise _StopAtAttention
            result = func(*args, **kwargs)
            if self.keep_output:
                call.output = result.detach()
            return result
        result = func(*args, **kwargs)
        if self.kind == "eager" and func in _SOFTMAX and isinstance(result, torch.Tensor) and result.dim() == 4:
            self.sink.append(AttentionCall(probs=result.detach()))
            if self.stop:
                raise _StopAtAttention
        return result


class AttentionRecorder:
    """Records attention calls while a block runs: install with `attach(block)` (forward hooks, so
    it rides along an existing forward), or call `run_prefix` to capture without finishing it."""

    def __init__(self, kind: str, keep_output: bool = False):
        self.kind = kind
        self.keep_output = keep_output
        self.calls: list[AttentionCall] = []
        self._mode: _Capture | None = None
        self._handles: list[Any] = []

    def attach(self, block: nn.Module, record: Callable[[int], bool] | None = None) -> None:
        """Record during `block`'s forwards; `record(i)` chooses which forward calls (0-based) are
        recorded, so the others run at full speed and keep nothing."""
        seen = itertools.count()

        def enter(_module: nn.Module, _args: Any, _kwargs: Any = None) -> None:
            if record is not None and not record(next(seen)):
                return
            self._mode = _Capture(self.kind, False, self.calls, self.keep_output)
            self._mode.__enter__()

        def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None

        self._handles = [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def run_prefix(self, block: nn.Module, args: tuple, kwargs: dict[str, Any],
                   weights: dict[str, torch.Tensor] | None = None) -> AttentionCall:
        """Run `block` only as far as its first attention op and return that call. `weights`: tensors
        that stand in for the block's parameters of those names in this call only
        (`torch.func.functional_call`; the block itself is never modified)."""
        sink: list[AttentionCall] = []
        try:
            with _Capture(self.kind, True, sink):
                if weights:
                    torch.func.functional_call(block, weights, args, kwargs, strict=False)
                else:
                    block(*args, **kwargs)
        except _StopAtAttention:
            pass
        if not sink:
            raise RuntimeError("the block ran without reaching its attention op")
        return sink[0]


def attention_kl(dense: AttentionCall | torch.Tensor, pruned: AttentionCall, *, reverse: bool = False) -> torch.Tensor:
    """Mean KL(dense attention ‖ pruned attention) per query row (nats), over batch and heads, as a
    0-dim float32 tensor on the attention's device (`float()` it to read it); `reverse`: KL(pruned ‖
    dense), the direction Eq. 12 of the paper writes. `dense` may be given as its log-probabilities,
    when several candidates share it."""
    lp_dense = dense if isinstance(dense, torch.Tensor) else dense.log_probs()
    lp_pruned = pruned.log_probs()
    lp_from, lp_to = (lp_pruned, lp_dense) if reverse else (lp_dense, lp_pruned)
    p = lp_from.exp()
    terms = torch.where(p > 0, p * (lp_from - lp_to), torch.zeros_like(p))
    rows = lp_dense.shape[:-1].numel()
    return terms.sum() / rows
