"""What the executor checks around each pass instead of trusting it: preconditions, postconditions,
finite statistics and weights, and that a pass wrote only what it said it would. Every check reads
its tensors in one host sync and names the pass, the block and the passes that ran before."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from d2compiler.errors import D2Error, PassError, PostconditionError, PreconditionError
from d2compiler.recipe.pass_base import Condition, Pass, PassResult

if TYPE_CHECKING:
    from d2compiler.execution.context import ExecutorContext

def ran_before(ctx: ExecutorContext, pass_: Pass) -> str:
    """Where an error happened: the block and the passes that ran on it before `pass_`."""
    earlier = [p.name for p in ctx.schedule[: next(i for i, p in enumerate(ctx.schedule) if p is pass_)]]
    return f"block {ctx.index}; passes run before: {', '.join(earlier) or 'none'}"


def describe(pass_: Pass) -> str:
    """`pass 'name'`, and for a plugin where it came from (entry point and distribution)."""
    return f"pass '{pass_.name}'" + (f" from {pass_.origin}" if pass_.origin else "")


@contextmanager
def blamed(pass_: Pass, hook: str, place: str) -> Iterator[None]:
    """Run a pass's hook; an exception that is not a `D2Error` becomes one located `PassError` line
    naming the pass (and its plugin), the hook and `place` (the block and the passes run before),
    its traceback kept as the cause (`--verbose` prints it), as torch.fx's and onnx_ir's pass
    managers wrap a failing pass."""
    try:
        yield
    except D2Error:
        raise
    except Exception as exc:
        raise PassError(f"{describe(pass_)} raised {type(exc).__name__} in {hook}: {exc} ({place}); "
                        "--verbose shows the traceback") from exc


def check_precondition(ctx: ExecutorContext, pass_: Pass) -> None:
    """`pass_.precondition(ctx)`, its error located (the block and the passes that ran before)."""
    try:
        with blamed(pass_, "precondition", ran_before(ctx, pass_)):
            pass_.precondition(ctx)
    except PreconditionError as exc:
        raise PreconditionError(f"{exc} ({ran_before(ctx, pass_)})") from None


def claims(ctx: ExecutorContext, pass_: Pass, result: PassResult, before: dict[str, torch.Tensor]) -> list[Condition]:
    """Conditions that hold the pass to its word, whatever its own `postconditions` say: a pass
    declaring `reads_only`, or reporting `modified = False` (on which the executor reuses the dense
    outputs), changed no parameter of the block (fingerprints taken `before` it ran)."""
    if pass_.reads_only:
        said = "declares reads_only"
    elif not result.modified:
        said = "reported modified = False"
    else:
        return []
    return [(changed, f"{said} but wrote {name}") for name, changed in ctx.parameter_changes(before).items()]


def settle(ctx: ExecutorContext, pass_: Pass, result: PassResult, before: dict[str, torch.Tensor]) -> None:
    """After a pass, in one host sync: check its postconditions (by default: no recorded mask was
    revived, every weight of the block is finite) and its `claims` (against the fingerprints
    `before` it), and turn the pass's tensor metrics into Python numbers (in place). Every layer the
    pass reports gets its role and shape."""
    for layer in ctx.layers:
        if layer.name in result.layers:
            result.layers[layer.name].setdefault("role", layer.role)
            result.layers[layer.name].setdefault("shape", list(layer.shape))
            if layer.is_expert and layer.transposed:  # a bank used as x @ W[e] (exporters need to know)
                result.layers[layer.name].setdefault("transposed", True)
    with blamed(pass_, "postconditions", ran_before(ctx, pass_)):
        conditions = pass_.postconditions(ctx, result)
    conditions = [*conditions, *claims(ctx, pass_, result, before)]
    slots = [(metrics, key) for metrics in result.layers.values() for key, value in metrics.items()
             if isinstance(value, torch.Tensor)]
    values = [*(count for count, _m in conditions), *(metrics[key] for metrics, key in slots)]
    numbers = torch.stack([v.detach().to(ctx.device, torch.float64) for v in values]).tolist() if values else []
    for (_count, message), number in zip(conditions, numbers):
        if number:
            raise PostconditionError(f"pass '{pass_.name}' {message.format(int(number))} ({ran_before(ctx, pass_)})")
    for (metrics, key), number in zip(slots, numbers[len(conditions) :]):
        integral = not metrics[key].is_floating_point()
        metrics[key] = int(number) if integral else number


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Tensors inside an artifact value (tensors, containers, dataclasses), except values that
    legitimately hold infinities (`may_hold_inf`, e.g. additive attention masks)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not getattr(value, "may_hold_inf", False):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))


def check_statistics(ctx: ExecutorContext) -> None:
    """Every statistic the passes recorded in the dense forward is finite (one host sync); stops
    naming the layer."""
    found = [(artifact, layer, tensor) for artifact, per_layer in ctx.artifacts.items() for layer, value in per_layer.items()
             for tensor in _tensors(value) if tensor.is_floating_point()]
    if not found:
        return
    finite = torch.stack([torch.isfinite(t).all().to(ctx.device) for _a, _l, t in found]).tolist()
    for (artifact, layer, _tensor), ok in zip(found, finite):
        if not ok:
            raise PassError(f"{layer}: the '{artifact}' statistic has NaN or Inf (block {ctx.index}); "
                            "check the model's weights and the calibration data")
