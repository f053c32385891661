"""`ExecutorContext`: the executor's implementation of the `BlockContext` protocol a pass sees
(the current block, its layers, artifacts, masks, and the run's processes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from d2compiler.errors import PassError
from d2compiler.execution.block_io import BlockInput, block_outputs_with, forward_until
from d2compiler.execution.distributed import Group
from d2compiler.execution.invariants import blamed, check_statistics, ran_before
from d2compiler.execution.lazy_experts import held_experts, run_block
from d2compiler.graph.experts import expert_statistics
from d2compiler.graph.layers import LinearLayer
from d2compiler.graph.structure import BlockStructure
from d2compiler.graph.targets import select_layers
from d2compiler.recipe.artifacts import ARTIFACTS
from d2compiler.recipe.pass_base import LayerWork, Pass, TargetedParams

T = TypeVar("T")
FINGERPRINT_CHUNK = 1 << 24  # entries squared at a time by `_fingerprint` (64 MiB of float32)


def _fingerprint(param: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares) of `param` in float64, chunk by chunk."""
    total = torch.zeros(2, dtype=torch.float64, device=param.device)
    for chunk in param.detach().reshape(-1).split(FINGERPRINT_CHUNK):
        total[0] += chunk.sum(dtype=torch.float64)
        total[1] += chunk.square().sum(dtype=torch.float64)
    return total


@dataclass
class ExecutorContext:
    """The executor's `BlockContext` (the protocol passes are typed against, in `recipe.pass_base`):
    the block being compressed, its layers, and the run's processes."""

    index: int
    name: str
    module: nn.Module
    layers: list[LinearLayer]
    structure: BlockStructure
    device: torch.device
    inputs: list[BlockInput]
    needed: set[str]
    targeted: set[str]
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_outputs: list[torch.Tensor] | None = None
    schedule: list[Pass] = field(default_factory=list)
    group: Group = field(default_factory=Group)  # the run's processes; `inputs` are this process's share of the samples
    sample_offset: int = 0  # global index of inputs[0] among all processes' calibration samples
    sample_count: int = 0  # calibration samples over all processes (0: len(inputs))
    active: Pass | None = None  # the pass the executor is running (its declarations govern `publish`)
    observing: frozenset[str] | None = None  # the layers an observation records statistics for (None: all targeted)
    experts_calibration: str = "routed"  # which tokens the experts' statistics see (graph.experts.expert_statistics)

    def fingerprints(self) -> dict[str, torch.Tensor]:
        """Each block parameter's (sum, sum of squares) in float64, on its device (no host sync): what
        the executor compares before and after every pass, to hold it to what it reported. Read in
        chunks of `FINGERPRINT_CHUNK` entries, so a large expert bank needs no squared copy of itself."""
        with torch.no_grad():
            out = {name: _fingerprint(param) for name, param in self.module.named_parameters() if not param.is_meta}
            held = held_experts(self.module)  # banks held one group at a time: the resident experts
            if held is not None:
                out.update({f"{attr}.{e} (resident expert)": _fingerprint(t) for (attr, e), t in held[1].resident.items()})
            return out

    @property
    def total_samples(self) -> int:
        return self.sample_count or len(self.inputs)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a statistic over the processes' samples, in place (identity with one process). Passes
        reduce raw sums and counts before normalising, so the result is that of one process over all
        samples."""
        return self.group.all_reduce(tensor)

    def map_layers(self, layers: list[LinearLayer], compute: Callable[[LinearLayer], LayerWork]
                   ) -> Iterator[tuple[LinearLayer, tuple[torch.Tensor, ...], dict[str, Any]]]:
        """(layer, tensors, info) for `compute(layer) -> (tensors, info)` over `layers`, in order. With
        several processes each layer is computed by one of them (spread by cost, in_features² x
        (in + out), the OBS work) and its tensors and JSON-able info are broadcast to the others."""
        return self.share_work(layers, compute, [obs_cost(layer) for layer in layers])

    def share_work(self, items: list[T], compute: Callable[[T], LayerWork], costs: list[float]
                   ) -> Iterator[tuple[T, tuple[torch.Tensor, ...], dict[str, Any]]]:
        """`map_layers` for any items with their costs: each item computed by one process, every
        process gets every result, in order."""
        group = self.group
        if group.size == 1:
            for item in items:
                yield (item, *compute(item))
            return
        owners = group.owners(costs)
        mine = {i: compute(item) for i, item in enumerate(items) if owners[i] == group.rank}
        for i, item in enumerate(items):
            tensors, info = mine.get(i, ((), {}))
            header = group.broadcast_json({"info": info, "tensors": [[list(t.shape), str(t.dtype).removeprefix("torch.")]
                                                                     for t in tensors]} if i in mine else None, owners[i])
            if i not in mine:
                tensors = tuple(torch.empty(shape, dtype=getattr(torch, dtype), device=self.device) for shape, dtype in header["tensors"])
            for tensor in tensors:
                group.broadcast(tensor, owners[i])
            yield item, tuple(tensors), header["info"]

    def consumers(self, artifact: str) -> list[Pass]:
        """Scheduled passes that require or optionally use `artifact`."""
        return [p for p in self.schedule if artifact in p.requires | p.optional]

    def select(self, params: TargetedParams) -> list[LinearLayer]:
        """The layers of this block that `params.targets` / `params.ignore` pick."""
        return select_layers(self.layers, params.targets, params.ignore)

    def observed_groups(self, layers: list[LinearLayer] | None = None) -> list[list[LinearLayer]]:
        """`layers` (default: the targeted ones; during `reobserve`, those it observes) grouped by shared
        input tensor, in module order (one accumulator per group; q/k/v, o, gate/up, down); the slices
        of a fused linear share its input, so they fall in one group."""
        if layers is None:
            layers = self.observed([layer for layer in self.layers if layer.name in self.targeted])
        groups: dict[tuple[str, ...], list[LinearLayer]] = {}
        for layer in layers:
            groups.setdefault(tuple(self.structure.group_of(layer.owner)), []).append(layer)
        return list(groups.values())

    def observed(self, layers: list[LinearLayer]) -> list[LinearLayer]:
        """Those of `layers` an observation now running is for (observing passes hook only these): in
        the block's first observation the layers some pass reads from it (`Pass.statistics_read`), in
        `reobserve` one stage's layers."""
        return layers if self.observing is None else [layer for layer in layers if layer.name in self.observing]

    def targets_of(self, pass_: Pass) -> list[LinearLayer]:
        """The layers of this block that another scheduled pass acts on (all, for a pass without targets)."""
        patterns = pass_.target_patterns()
        return list(self.layers) if patterns is None else select_layers(self.layers, *patterns)

    def publish(self, artifact: str, layer: str, value: Any, *, by: Pass | None = None) -> None:
        """Make `value` the `artifact` of `layer` (a block-scoped kind: of the block's name). Refused
        unless the publishing pass (`by`, else the running one) declares it in `provides` or
        `writes`, and unless the value has the kind's type (`artifacts.ARTIFACTS`)."""
        writer = by or self.active
        kind = ARTIFACTS.get(artifact)
        if kind is None or kind.scope == "marker":
            raise PassError(f"pass '{writer.name if writer else '?'}' published '{artifact}', which is not an artifact "
                            f"kind that carries values (block {self.index})")
        if writer is not None and artifact not in writer.provides | writer.writes:
            raise PassError(f"pass '{writer.name}' wrote the artifact '{artifact}' without declaring it (add it to "
                            f"`provides` or `writes`) (block {self.index})")
        if not isinstance(value, kind.types):
            raise PassError(f"pass '{writer.name if writer else '?'}' published '{artifact}' of {layer} as "
                            f"{type(value).__name__}; the kind holds {' or '.join(t.__name__ for t in kind.types)}")
        self.artifacts.setdefault(artifact, {})[layer] = value

    def artifact(self, artifact: str, layer: str) -> Any:
        return self.artifacts.get(artifact, {}).get(layer)

    def bracketed_forward(self, passes: list[Pass], begin: str = "begin_observe", end: str = "end_observe",
                          observing: frozenset[str] | None = None, stops: list[nn.Module] | None = None,
                          run: Callable[[], list[torch.Tensor] | None] | None = None) -> list[torch.Tensor]:
        """Run the block as it now is over `inputs`, each of `passes` called (method `begin`, then
        `end`, e.g. `begin_observe` / `end_observe`) before and after as the active writer; the outputs
        are kept in `dense_outputs` and returned. `observing` is the layers the passes record
        statistics for meanwhile (`observed`; None: all targeted). With `stops`, each call ends once
        those modules have run (`forward_until`) and `dense_outputs` is left as it was. With `run`,
        that runs instead of the forward (its outputs, when not None, become `dense_outputs`)."""
        running = self.active
        self.observing = observing
        try:
            for p in passes:
                self.active = p
                with blamed(p, begin, ran_before(self, p)):
                    getattr(p, begin)(self)
            self.active = None
            with expert_statistics(self.experts_calibration):
                if run is not None:
                    outputs = run()
                    self.dense_outputs = self.dense_outputs if outputs is None else outputs
                elif stops is None:
                    self.dense_outputs = run_block(self.module, self.inputs)[0]
                else:
                    forward_until(self.module, self.inputs, stops)
            for p in passes:
                self.active = p
                with blamed(p, end, ran_before(self, p)):
                    getattr(p, end)(self)
        finally:
            self.active, self.observing = running, None
        return self.dense_outputs

    def reobserve(self, passes: list[Pass], layers: list[LinearLayer]) -> None:
        """Run the block as it now is (partly pruned) with `passes` observing `layers` only, so the
        statistics they publish for these describe it: the true-sequential mode of the pruning passes.
        Each call ends once `layers` have run (what follows them cannot change their statistics). The
        statistics of other layers and `dense_outputs` (the dense block's) stay as they were."""
        self.bracketed_forward(passes, observing=frozenset(layer.name for layer in layers),
                               stops=[layer.module for layer in layers])
        check_statistics(self)

    def output_error_sums(self, indices: list[int], weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """(Σ‖Y′−Y‖², Σ‖Y‖²) in float64 over this process's samples `indices` (into `inputs`): Y′ the
        block's outputs with `weights` standing in (`LinearLayer.stand_in`; the block is not written),
        Y its `dense_outputs`. Not reduced over the processes: sum several, then `reduce` once."""
        if held_experts(self.module) is not None:
            raise PassError(f"pass '{getattr(self.active, 'name', '?')}' compares the outputs of {self.name} with stand-in "
                            "weights, which needs every expert at once: not available with experts.load = \"group\"")
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        outputs = block_outputs_with(self.module, [self.inputs[i] for i in indices], weights)
        for i, out in zip(indices, outputs):
            dense = self.dense_outputs[i].double()
            sums[0] += (out.double() - dense).pow(2).sum()
            sums[1] += dense.pow(2).sum()
        return sums

    def parameter_changes(self, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per parameter, a 0-dim int tensor (no host sync): 1 if its fingerprint differs from `before`
        (`fingerprints()`), else 0."""
        after = self.fingerprints()
        return {name: (after[name] != old).any().int() for name, old in before.items()}

    @contextmanager
    def narrowed(self, names: set[str]) -> Iterator[None]:
        """Within: `layers` and `targeted` are those named in `names` only (one group of experts,
        `execution.expert_groups`), so every pass sees and acts on that group alone."""
        layers, targeted = self.layers, self.targeted
        self.layers, self.targeted = [layer for layer in layers if layer.name in names], targeted & names
        try:
            yield
        finally:
            self.layers, self.targeted = layers, targeted

    def forget(self, names: set[str]) -> None:
        """Drop the artifacts (statistics, masks, ...) of the layers in `names`: a finished group of
        experts, whose weights already hold what the passes did."""
        for per_layer in self.artifacts.values():
            for name in names:
                per_layer.pop(name, None)
        for name in names:
            self.masks.pop(name, None)

    def record_mask(self, layer: str, keep: torch.Tensor) -> None:
        """Record a keep-mask; a weight already masked stays masked (masks compose by AND)."""
        keep = keep.to(torch.bool)
        old = self.masks.get(layer)
        self.masks[layer] = keep if old is None else (old & keep.to(old.device))
        self.publish("mask", layer, self.masks[layer])




def obs_cost(layer: LinearLayer) -> float:
    """The relative cost of an OBS solve of `layer`: in_features² x (in_features + out_features)."""
    out_f, in_f = layer.shape
    return float(in_f) ** 2 * (in_f + out_f)
