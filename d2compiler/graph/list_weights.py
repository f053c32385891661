"""`experts.calibration = "weighted"` for experts held as modules (`graph.expert_lists`): each routed
token's statistics in expert e weighted by its routing weight for e, with no model class named.

An MoE module's output is linear in its experts' outputs, y_t = Σ_e w_e(t)·E_e(x_t) + (terms that
do not come from the routed experts), however the module gathers, scales and scatters them. So the
weight of each row of one expert call is the gradient of Σ y with respect to that row of the call's
output, the same for every feature of the row (checked; otherwise the statistics stay routed, with a
warning). While statistics are gathered the MoE module runs twice:

1. with autograd on its experts' outputs and their statistics hooks silenced: the weights of every
   call, and the module's output (the routed one, passed on);
2. again, output discarded, with only the experts' hooks live: every linear inside an expert sees its
   input rows scaled by √w and its output likewise (then unscaled for the caller), so each statistic
   sees x·√w and y·√w (a Hessian Σ w·x xᵀ), as for 3-D banks (`graph.experts`)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from d2compiler.graph.layers import is_linear_module

log = logging.getLogger(__name__)
LINEARITY_RTOL = 1e-4  # the gradient's features of one row may differ by this much (float rounding)


@contextmanager
def silenced(modules: list[nn.Module]) -> Iterator[None]:
    """Within: the forward hooks of `modules` do not fire (hooks added within are dropped on exit)."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in modules]
    try:
        for m, _hooks, _pre in saved:
            m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for m, hooks, pre in saved:
            m._forward_hooks, m._forward_pre_hooks = hooks, pre


def _first_with_grad(out: Any) -> torch.Tensor | None:
    return next((t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad), None)


def outside_experts(module: nn.Module, experts: list[nn.Module]) -> list[nn.Module]:
    """The modules inside the MoE `module` (itself excluded) that are not part of an expert (router,
    shared experts): their statistics must see each token once, whatever the experts' mode does."""
    inner = {id(m) for expert in experts for m in expert.modules()}
    return [m for m in module.modules() if m is not module and id(m) not in inner]


def routing_weights(forward: Callable[..., Any], experts: list[nn.Module], args: tuple, kwargs: dict
                    ) -> tuple[Any, list[list[torch.Tensor]] | None]:
    """(the MoE module's routed output, detached; per expert, the weight of each row of each of its
    calls in call order, or None when the output is not linear in the experts' outputs)."""
    inner = [m for expert in experts for m in expert.modules()]
    calls: list[list[torch.Tensor]] = [[] for _ in experts]

    def capture(index: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: tuple, out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            leaf = out.detach().requires_grad_()
            calls[index].append(leaf)
            return leaf
        return hook

    with silenced(inner), torch.enable_grad():
        for index, expert in enumerate(experts):
            expert.register_forward_hook(capture(index))  # dropped with the silenced hooks on exit
        out = forward(*args, **kwargs)
        leaves = [leaf for expert_calls in calls for leaf in expert_calls]
        y = _first_with_grad(out)
        grads = torch.autograd.grad(y.sum(), leaves, allow_unused=True) if y is not None and leaves else None
    out = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
    if grads is None:
        return out, None
    weights, position = [], 0
    for expert_calls in calls:
        per_call = []
        for leaf in expert_calls:
            grad = grads[position] if grads[position] is not None else torch.zeros_like(leaf)
            position += 1
            rows = grad.reshape(-1, grad.shape[-1])
            w = rows[:, 0]
            if (rows - w[:, None]).abs().max() > LINEARITY_RTOL * max(1.0, float(w.abs().max())):
                return out, None
            per_call.append(w.detach())
        weights.append(per_call)
    return out, weights


def weighted_statistics(forward: Callable[..., Any], module: nn.Module, experts: list[nn.Module],
                        weights: list[list[torch.Tensor]], args: tuple, kwargs: dict) -> None:
    """Run the MoE module's forward again (output discarded) with each expert linear's input and
    output rows scaled by √w of the expert call they belong to (see the module docstring), the
    hooks of every module outside the experts silenced."""
    current: dict[str, torch.Tensor] = {}
    counts = [0] * len(experts)
    others = outside_experts(module, experts)

    def enter(index: int) -> Callable[..., None]:
        def pre(_module: nn.Module, _args: tuple) -> None:
            current["root"] = weights[index][counts[index]].clamp_min(torch.finfo(torch.float32).tiny).sqrt()
            counts[index] += 1
        return pre

    def scaled(shape_of: torch.Tensor) -> torch.Tensor | None:
        root = current.get("root")
        if root is None or root.numel() != shape_of[..., 0].numel():
            return None
        return root.to(shape_of.dtype).reshape(*shape_of.shape[:-1], 1)

    def scale_input(_module: nn.Module, inputs: tuple) -> tuple | None:
        root = scaled(inputs[0])
        return None if root is None else (inputs[0] * root, *inputs[1:])

    def unscale_output(linear: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
        root = scaled(out)
        if root is None:
            return None
        bias = getattr(linear, "bias", None)
        return (out - bias) / root + bias if isinstance(bias, torch.Tensor) else out / root

    handles = []
    try:
        for index, expert in enumerate(experts):
            handles.append(expert.register_forward_pre_hook(enter(index), prepend=True))
            for linear in filter(is_linear_module, expert.modules()):
                handles.append(linear.register_forward_pre_hook(scale_input, prepend=True))
                handles.append(linear.register_forward_hook(unscale_output))  # after the statistics hooks
        with silenced(others), torch.no_grad():
            forward(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
