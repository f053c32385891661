"""The block-by-block executor.

It captures the inputs of the first block for every calibration window, then for each block:
moves it to the compute device, runs it once dense while the passes observe (statistics), applies
the passes in schedule order (checking each pass's precondition before it and its postconditions
after it: by default, no recorded mask revived and every weight finite), and re-runs the modified block to produce the next block's inputs, so errors
propagate as in SparseGPT. Only the current block lives on the compute device. Blocks after the
last targeted one are not run at all.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from d2compiler.errors import D2Error, PassError, PostconditionError, PreconditionError
from d2compiler.execution.checkpoint import CheckpointStore
from d2compiler.execution.distributed import SINGLE, Group
from d2compiler.execution.memory import current_rss_mb, peak_rss_mb
from d2compiler.execution.placement import Placement, Reader
from d2compiler.execution.progress import progress
from d2compiler.graph.coverage import Coverage, measure_coverage
from d2compiler.graph.experts import (
    every_token_to_every_expert,
    expert_layers,
    experts_for_tracing,
    probe_banks,
    use_eager_experts,
)
from d2compiler.graph.structure import (
    BlockStructure,
    LinearLayer,
    bind_linears,
    block_signature,
    matches,
    split_slice_name,
    structure_from_roles,
    trace_block,
)
from d2compiler.recipe.artifacts import ARTIFACTS
from d2compiler.recipe.passmanager import Pass, PassResult, TargetedParams

if TYPE_CHECKING:
    from d2compiler.execution.streaming import StreamedModel

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to end a model or block call early (`capture_block_inputs`, `forward_until`)."""


@dataclass
class BlockInput:
    """One calibration sample's call of a block: positional args (hidden states first) and kwargs."""

    args: tuple
    kwargs: dict[str, Any]

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        return BlockInput((hidden, *self.args[1:]), self.kwargs)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def model_call_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra kwargs for a full-model forward: no KV cache for generative models."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


Call = torch.Tensor | dict[str, Any]  # one model input: the first positional argument (token ids, pixels) or keyword arguments


def invoke(model: nn.Module, call: Call, device: torch.device) -> Any:
    """`model(call)` or `model(**call)`, the call's tensors moved to `device`, without a KV cache."""
    extra = model_call_kwargs(model)
    if isinstance(call, torch.Tensor):
        return model(call.to(device), **extra)
    return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}, **extra)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calls: list[Call], device: torch.device) -> list[BlockInput]:
    """Run the model up to the first block for each call and record that block's call. The parameters
    outside the blocks must be on `device` (`Placement.outside_on`)."""
    captured: list[BlockInput] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not args and "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"),)
        captured.append(BlockInput(_to(args, device), _to(kwargs, device)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for call in calls:
            try:
                invoke(model, call, device)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(calls):
        raise D2Error(f"captured {len(captured)} block inputs for {len(calls)} calls")
    return captured


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: list[BlockInput]) -> tuple[list[torch.Tensor], bool]:
    """The block's output hidden states for each input, and whether the block returns a tuple."""
    outputs, as_tuple = [], False
    for inp in inputs:
        out = block(*inp.args, **inp.kwargs)
        as_tuple = isinstance(out, (tuple, list))
        outputs.append(out[0] if as_tuple else out)
    return outputs, as_tuple


def forward_block(block: nn.Module, inputs: list[BlockInput]) -> list[torch.Tensor]:
    return block_outputs(block, inputs)[0]


@torch.no_grad()
def forward_until(block: nn.Module, inputs: list[BlockInput], stops: list[nn.Module]) -> None:
    """Run the block over each input only until every module of `stops` has run (the forward hooks
    registered on them before this call have fired, in registration order), then end that call; the
    rest of the block is skipped and nothing is kept: this serves observation only. A call in which
    some of `stops` never run (e.g. an expert no token is routed to) runs to the end."""
    modules = list({id(m): m for m in stops}.values())
    pending: set[int] = set()

    def reached(module: nn.Module, _inp: Any, _out: Any) -> None:
        pending.discard(id(module))
        if not pending:
            raise _StopForward

    handles = [m.register_forward_hook(reached) for m in modules]
    try:
        for inp in inputs:
            pending.update(id(m) for m in modules)
            try:
                block(*inp.args, **inp.kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_outputs_with(block: nn.Module, inputs: list[BlockInput], weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The block's output hidden states for `inputs` with `weights` (by parameter name, e.g.
    `self_attn.q_proj.weight`) standing in for those parameters in these calls only
    (`torch.func.functional_call`; the block itself is never written)."""
    outputs = []
    for inp in inputs:
        out = torch.func.functional_call(block, weights, inp.args, inp.kwargs, strict=False)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs


@dataclass
class BlockContext:
    """What a pass sees of the current block (see the pass contract in `passmanager`)."""

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
    fingerprints_before: dict[str, torch.Tensor] = field(default_factory=dict)  # before a pass that declares it only reads
    observing: frozenset[str] | None = None  # the layers an observation records statistics for (None: all targeted)
    every_token_to_every_expert: bool = False  # experts.calibration = "all"

    def fingerprints(self) -> dict[str, torch.Tensor]:
        """Each block parameter's (sum, sum of squares) in float64, on its device (no host sync): what
        the executor compares before and after a pass that declares `in_place = False`."""
        with torch.no_grad():
            return {name: torch.stack([param.sum(dtype=torch.float64), (param * param).sum(dtype=torch.float64)])
                    for name, param in self.module.named_parameters()}

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
                          observing: frozenset[str] | None = None, stops: list[nn.Module] | None = None) -> list[torch.Tensor]:
        """Run the block as it now is over `inputs`, each of `passes` called (method `begin`, then
        `end`, e.g. `begin_observe` / `end_observe`) before and after as the active writer; the outputs
        are kept in `dense_outputs` and returned. `observing` is the layers the passes record
        statistics for meanwhile (`observed`; None: all targeted). With `stops`, each call ends once
        those modules have run (`forward_until`) and `dense_outputs` is left as it was."""
        running = self.active
        self.observing = observing
        try:
            for p in passes:
                self.active = p
                getattr(p, begin)(self)
            self.active = None
            with every_token_to_every_expert(self.every_token_to_every_expert):
                if stops is None:
                    self.dense_outputs = forward_block(self.module, self.inputs)
                else:
                    forward_until(self.module, self.inputs, stops)
            for p in passes:
                self.active = p
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

    def record_mask(self, layer: str, keep: torch.Tensor) -> None:
        """Record a keep-mask; a weight already masked stays masked (masks compose by AND)."""
        keep = keep.to(torch.bool)
        old = self.masks.get(layer)
        self.masks[layer] = keep if old is None else (old & keep.to(old.device))
        self.publish("mask", layer, self.masks[layer])


LayerWork = tuple[tuple[torch.Tensor, ...], dict[str, Any]]  # what `BlockContext.map_layers` computes per layer
T = TypeVar("T")


def obs_cost(layer: LinearLayer) -> float:
    """The relative cost of an OBS solve of `layer`: in_features² x (in_features + out_features)."""
    out_f, in_f = layer.shape
    return float(in_f) ** 2 * (in_f + out_f)


def select_layers(layers: list[LinearLayer], targets: list[str], ignore: list[str]) -> list[LinearLayer]:
    return [layer for layer in layers if matches(layer, targets) and not matches(layer, ignore)]


def ran_before(ctx: BlockContext, pass_: Pass) -> str:
    """Where an error happened: the block and the passes that ran on it before `pass_`."""
    earlier = [p.name for p in ctx.schedule[: next(i for i, p in enumerate(ctx.schedule) if p is pass_)]]
    return f"block {ctx.index}; passes run before: {', '.join(earlier) or 'none'}"


def check_precondition(ctx: BlockContext, pass_: Pass) -> None:
    """`pass_.precondition(ctx)`, its error located (the block and the passes that ran before)."""
    try:
        pass_.precondition(ctx)
    except PreconditionError as exc:
        raise PreconditionError(f"{exc} ({ran_before(ctx, pass_)})") from None


def settle(ctx: BlockContext, pass_: Pass, result: PassResult) -> None:
    """After a pass, in one host sync: check its postconditions (by default: no recorded mask was
    revived, every weight of the block is finite) and turn the pass's tensor metrics into Python
    numbers (in place). Every layer the pass reports gets its role and shape."""
    for layer in ctx.layers:
        if layer.name in result.layers:
            result.layers[layer.name].setdefault("role", layer.role)
            result.layers[layer.name].setdefault("shape", list(layer.shape))
    conditions = pass_.postconditions(ctx, result)
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


def check_statistics(ctx: BlockContext) -> None:
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


@dataclass
class BlockReport:
    index: int
    name: str
    times: dict[str, float]
    results: list[tuple[str, PassResult]]
    memory: dict[str, float] = field(default_factory=dict)
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "times": self.times, "memory": self.memory,
                "results": [[name, {"modified": r.modified, "layers": r.layers, "info": r.info}] for name, r in self.results]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BlockReport:
        results = [(name, PassResult(r["modified"], r["layers"], r["info"])) for name, r in data["results"]]
        return cls(data["index"], data["name"], data["times"], results, data.get("memory", {}), resumed=True)


@dataclass
class ExecutionReport:
    blocks_path: str
    num_blocks: int
    blocks: list[BlockReport]
    roles: dict[str, str]
    coverage: Coverage | None = None

    def layer_metrics(self) -> dict[str, dict[str, Any]]:
        """Per module: the metrics of every pass that touched it (later passes win on conflicts). The
        slices of a fused linear merge into their module's entry (see `merge_slices`)."""
        out: dict[str, dict[str, Any]] = {}
        for block in self.blocks:
            for pass_name, result in block.results:
                for layer, metrics in result.layers.items():
                    entry = out.setdefault(layer, {"block": block.index})
                    entry.update(metrics)
                    if pass_name not in entry.setdefault("passes", []):
                        entry["passes"].append(pass_name)
        return merge_slices(out)


def merge_slices(layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fold `name[role]` entries into one `name` entry keyed by the module (what exporters address):
    role `qkv`, the stacked shape, the row-weighted sparsity, and each slice's own metrics under
    `slices`."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in layers.items():
        module, role = split_slice_name(name)
        merged = out.setdefault(module, {"block": entry["block"], "passes": []})
        passes = merged["passes"] + [p for p in entry.get("passes", []) if p not in merged["passes"]]
        if role:
            merged.setdefault("slices", {})[role] = entry
            merged["role"] = "qkv"
            merged.update({key: entry[key] for key in ("quant", "packed") if key in entry})
        else:
            merged.update(entry)
        merged["passes"] = passes
    for entry in out.values():
        parts = [s for s in entry.get("slices", {}).values() if "shape" in s]
        if parts:
            rows = sum(s["shape"][0] for s in parts)
            entry["shape"] = [rows, parts[0]["shape"][1]]
            entry["sparsity"] = sum(s["sparsity"] * s["shape"][0] for s in parts if "sparsity" in s) / rows
    return out


def round_to_storage(module: nn.Module, dtype: torch.dtype) -> None:
    """Round `module`'s floating parameters and buffers, in place and in their own (compute) dtype,
    to the values `dtype` can store: a block computed in float32 and stored in bfloat16 propagates,
    resumes and evaluates with exactly the weights that are written."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.copy_(tensor.to(dtype))


class BlockExecutor:
    """Runs a pass schedule over a model's repeated blocks (see the module docstring)."""

    def __init__(self, model: nn.Module, schedule: list[Pass], *, device: torch.device,
                 role_overrides: dict[str, str] | None = None, quiet: bool = False, streamed: StreamedModel | None = None,
                 group: Group = SINGLE, storage_dtype: torch.dtype | None = None, allow_untargeted: bool = False,
                 experts_calibration: str = "routed"):
        self.model = model
        self.schedule = schedule
        self.device = device
        self.role_overrides = role_overrides or {}
        self.quiet = quiet
        self.streamed = streamed
        self.group = group
        self.storage_dtype = storage_dtype  # weights are rounded to it after each block (None: kept as computed)
        self.allow_untargeted = allow_untargeted
        self.experts_calibration = experts_calibration
        self._samples = (0, 0)  # (global index of this process's first window, windows over all processes)
        self.placement = Placement(model, device, streamed)
        self.blocks_path, self.blocks = self.placement.blocks_path, self.placement.blocks
        self._structures: dict[tuple, BlockStructure] = {}
        use_eager_experts(model)  # experts one by one, so that each one's statistics can be seen

    def on_device(self, index: int, read: Reader | None = None) -> AbstractContextManager[nn.Module]:
        """Block `index` on the compute device for the duration (see `placement.Placement`, the one
        place that decides where tensors live)."""
        return self.placement.block(index, read)

    def structure(self, index: int, sample: BlockInput | None) -> BlockStructure:
        """The traced structure of block `index` (traced once per distinct block signature, with the
        block and its sample input on the compute device)."""
        block = self.blocks[index]
        key = block_signature(block)
        if key not in self._structures:
            label = f"{self.blocks_path}.{index} ({type(block).__name__})"
            if sample is None or (self.role_overrides and self._overrides_cover(block)):
                self._structures[key] = structure_from_roles(block, self.role_overrides)
            else:
                with self.on_device(index) as placed:
                    with experts_for_tracing(self.model):
                        structure = trace_block(placed, sample.args, sample.kwargs, label=label)
                    structure.experts = probe_banks(placed, lambda: placed(*sample.args, **sample.kwargs))
                    self._structures[key] = structure
        return self._structures[key]

    def structures(self) -> list[BlockStructure]:
        """The distinct block structures traced so far."""
        return list(self._structures.values())

    def prefix(self, index: int) -> str:
        """The full-name prefix of block `index`'s tensors (`model.layers.3.`)."""
        return f"{self.blocks_path}.{index}."

    def _overrides_cover(self, block: nn.Module) -> bool:
        probe = structure_from_roles(block, {})
        return set(probe.roles) <= set(self.role_overrides)

    def layers_of(self, index: int, structure: BlockStructure) -> list[LinearLayer]:
        """The block's linear layers: its modules' (`bind_linears`) and its experts' (`expert_layers`)."""
        prefix = f"{self.blocks_path}.{index}"
        return [*bind_linears(self.blocks[index], prefix, structure, self.role_overrides),
                *expert_layers(self.blocks[index], prefix, structure.experts)]

    def targeted_names(self, layers: list[LinearLayer]) -> dict[int, set[str]]:
        """Per scheduled pass (by position): names of the layers it targets."""
        out: dict[int, set[str]] = {}
        for i, p in enumerate(self.schedule):
            patterns = p.target_patterns()
            if patterns is not None:
                out[i] = {layer.name for layer in select_layers(layers, *patterns)}
        return out

    def run(self, windows: list[torch.Tensor], checkpoints: CheckpointStore | None = None) -> ExecutionReport:
        """Prune block by block. With `checkpoints`, every finished block is saved, and the blocks a
        previous (killed) run of the same job finished are restored instead of recomputed."""
        needed = {a for p in self.schedule for a in p.requires | p.optional}
        share = self.group.share(len(windows))  # this process's calibration windows
        if not share:
            raise D2Error(f"{len(windows)} calibration samples for {self.group.size} processes: each process needs at least one")
        self._samples = (share.start, len(windows))
        with self.placement.outside_on():
            inputs = capture_block_inputs(self.model, self.blocks, windows[share.start : share.stop], self.device)
        if self.streamed is not None:
            self.streamed.release_outside()  # only the blocks are needed from here on
        all_layers = []
        for i in range(len(self.blocks)):
            all_layers.extend(self.layers_of(i, self.structure(i, inputs[0])))
        targets = self.targeted_names(all_layers)
        self.check_targets_match(targets, all_layers)
        coverage = self.check_coverage(targets, all_layers)
        for i, names in targets.items():
            self.schedule[i].check_layers([layer for layer in all_layers if layer.name in names])
        hit = {int(n[len(self.blocks_path) + 1 :].split(".")[0]) for names in targets.values() for n in names}
        last = max(hit) if hit else -1
        self.survey(inputs, targets, last)  # before any resume: it always sees the dense model
        reports: list[BlockReport] = []
        first = 0
        streaming = self.streamed is not None
        writes = checkpoints is not None and self.group.is_main  # one process writes the checkpoints
        resumed = checkpoints.start() if writes else None
        done = resumed.blocks_done if resumed is not None else 0
        if self.group.size > 1 and checkpoints is not None:  # the others read what the first one verified
            done = int(self.group.broadcast(torch.tensor([done], dtype=torch.int64), 0).item())
        if 0 < done <= (len(self.blocks) if streaming else last):
            first = done
            log.info("resuming at block %d of %d from %s", first, last + 1, checkpoints.folder)
            if not streaming:  # a streaming run's finished blocks stay in their files
                for index in range(first):
                    checkpoints.restore_block(index, self.blocks[index], self.prefix(index))
            reports = [BlockReport.from_json(r) for r in resumed.reports] if resumed is not None else []
            if first > last:
                pass  # every targeted block is done; only copies remain
            elif resumed is not None and resumed.hidden is not None and len(resumed.hidden) == len(inputs):
                inputs = [inp.with_hidden(h.to(inp.args[0].device)) for inp, h in zip(inputs, resumed.hidden)]
            else:  # hidden states lost or altered: replay the restored blocks (the same computation)
                for index in range(first):
                    inputs = self._propagate(index, inputs, checkpoints.reader(index) if streaming else None)
        bar = progress(range(first, last + 1), desc="blocks", disable=self.quiet, initial=first, total=last + 1)
        try:
            for index in bar:
                with self.on_device(index) as block:
                    report, outputs = self._run_block(index, block, inputs, needed, targets, last)
                    reports.append(report)
                    if writes and (index < last or streaming):  # with several processes, no hidden states: a resume replays
                        hidden = outputs if self.group.size == 1 else []
                        checkpoints.save_block(index, block, hidden, [r.to_json() for r in reports], self.prefix(index))
                inputs = [inp.with_hidden(h) for inp, h in zip(inputs, outputs)]
            if streaming and writes:  # untouched blocks after the last targeted one: copied as they are
                for index in range(max(first, last + 1), len(self.blocks)):
                    with self.streamed.block(index) as block:
                        checkpoints.save_block(index, block, [], [r.to_json() for r in reports], self.prefix(index))
        finally:  # an interrupted run still leaves its last finished block durable
            if writes:
                checkpoints.flush()
        if checkpoints is not None:
            self.group.barrier()  # every checkpoint file is written before any process reads one
        roles = {layer.name: layer.role for layer in all_layers}
        return ExecutionReport(self.blocks_path, len(self.blocks), reports, roles, coverage)

    def survey(self, inputs: list[BlockInput], targets: dict[int, set[str]], last: int) -> None:
        """The dense sweep of the passes with `surveys = True` (e.g. a layer-wise sparsity allocation
        that must see every block before the first is pruned): blocks 0..last run dense over the
        first calibration inputs (as many as the passes' `survey_samples` ask for), each bracketed by the passes' `begin_survey` / `end_survey`, then
        `finish_survey`. The blocks are not changed (checked: a survey that writes is a PassError)."""
        surveyors = [p for p in self.schedule if p.surveys]
        if not surveyors or last < 0:
            return
        wanted = [p.survey_samples() for p in surveyors]
        count = self._samples[1] if None in wanted else min(max(wanted), self._samples[1])  # over all processes
        inputs = [inp for i, inp in enumerate(inputs) if self._samples[0] + i < count]  # this process's share of them
        for index in progress(range(last + 1), desc="survey", disable=self.quiet):
            with self.on_device(index) as block:
                ctx = self.context(index, block, inputs, set(), targets, sample_count=count)
                before = ctx.fingerprints()
                outputs = ctx.bracketed_forward(surveyors, "begin_survey", "end_survey")
                changes = ctx.parameter_changes(before)
                differs = torch.stack(list(changes.values())).tolist() if changes else []
                changed = [name for name, bad in zip(changes, differs) if bad]
                if changed:
                    raise PassError(f"the survey of block {index} changed {changed[0]} (passes: "
                                    f"{', '.join(p.name for p in surveyors)}); a survey must only read the block")
                inputs = [inp.with_hidden(h) for inp, h in zip(inputs, outputs)] if index < last else inputs
        for p in surveyors:
            p.finish_survey()

    def _propagate(self, index: int, inputs: list[BlockInput], read: Reader | None = None) -> list[BlockInput]:
        """Block `index`'s outputs as the next block's inputs."""
        with self.on_device(index, read) as block:
            outputs = forward_block(block, inputs)
        return [inp.with_hidden(h) for inp, h in zip(inputs, outputs)]

    def coverage(self, targets: dict[int, set[str]], layers: list[LinearLayer]) -> Coverage:
        """The share of the model's parameters the passes target (see `graph.coverage`)."""
        ignore = [pattern for p in self.schedule if (patterns := p.target_patterns()) is not None for pattern in patterns[1]]
        return measure_coverage(self.model, self.blocks_path, layers, set().union(*targets.values()) if targets else set(),
                                ignore)

    def check_coverage(self, targets: dict[int, set[str]], layers: list[LinearLayer]) -> Coverage:
        """Refuse (or, with `allow_untargeted`, warn about) a recipe that leaves REFUSE_SHARE or more
        of the block parameters in no layer a pass can act on and unnamed by any `ignore`."""
        coverage = self.coverage(targets, layers)
        problem = coverage.refusal()
        if problem and not self.allow_untargeted:
            raise D2Error(f"model: {problem}")
        if problem:
            log.warning("model.allow_untargeted: %s", problem.split(". Name them")[0])
        return coverage

    def check_targets_match(self, targets: dict[int, set[str]], layers: list[LinearLayer]) -> None:
        for i, names in targets.items():
            if not names:
                p = self.schedule[i]
                sample = ", ".join(sorted({f"{layer.local_name} ({type(layer.module).__name__}, role {layer.role})" for layer in layers}))
                raise D2Error(
                    f"pass '{p.name}': targets {p.target_patterns()[0]} (ignore {p.target_patterns()[1]}) "
                    f"match no linear in {self.blocks_path}.*; the blocks hold: {sample}"
                )

    def context(self, index: int, block: nn.Module, inputs: list[BlockInput], needed: set[str], targets: dict[int, set[str]],
                sample_count: int | None = None) -> BlockContext:
        """The context of block `index` (already on the compute device): its layers, the ones some pass
        targets, and this process's share of `sample_count` samples (default: all the run's)."""
        structure = self._structures[block_signature(block)]
        layers = self.layers_of(index, structure)
        names = {layer.name for layer in layers}
        targeted = set().union(*(t & names for t in targets.values())) if targets else set()
        return BlockContext(index, f"{self.blocks_path}.{index}", block, layers, structure, self.device, inputs, needed, targeted,
                            schedule=self.schedule, group=self.group, sample_offset=self._samples[0],
                            sample_count=self._samples[1] if sample_count is None else sample_count,
                            every_token_to_every_expert=self.experts_calibration == "all")

    def _run_block(self, index: int, block: nn.Module, inputs: list[BlockInput], needed: set[str], targets: dict[int, set[str]],
                   last: int) -> tuple[BlockReport, list[torch.Tensor]]:
        """Observe, apply the passes, and return the block's outputs (empty for the last block).
        `block` is already on the compute device (see `on_device`)."""
        ctx = self.context(index, block, inputs, needed, targets)
        targeted = ctx.targeted
        named = list(block.named_parameters())
        finite = torch.stack([torch.isfinite(param).all() for _n, param in named]).tolist() if named else []
        nonfinite = [pname for (pname, _param), ok in zip(named, finite) if not ok]
        if nonfinite:  # one host sync per block, not one per parameter
            raise PassError(f"{self.blocks_path}.{index}.{nonfinite[0]}: the model's weights hold NaN or Inf before pruning")
        times: dict[str, float] = {}
        results: list[tuple[str, PassResult]] = []
        start = time.perf_counter()
        if targeted and any(p.observes for p in self.schedule):
            read = set().union(*(p.statistics_read(ctx) for p in self.schedule)) & targeted
            ctx.bracketed_forward(self.schedule, observing=None if read >= targeted else frozenset(read))  # e.g. true-sequential's later stages unread
            check_statistics(ctx)
            times["observe"] = time.perf_counter() - start
        modified = False
        for p in self.schedule:
            t0 = time.perf_counter()
            if targeted:
                ctx.active = p
                ctx.fingerprints_before = {} if p.in_place else ctx.fingerprints()
                check_precondition(ctx, p)
                result = p.apply(ctx)
                settle(ctx, p, result)
                ctx.active = None
                results.append((p.name, result))
                modified |= result.modified
            times[p.name] = times.get(p.name, 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        if modified and self.storage_dtype is not None:
            round_to_storage(block, self.storage_dtype)
        if index < last:
            outputs = ctx.dense_outputs if (not modified and ctx.dense_outputs is not None) else forward_block(block, inputs)
        else:
            outputs = []
        times["propagate"] = time.perf_counter() - t0
        times["total"] = time.perf_counter() - start
        memory = {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_mb": round(current_rss_mb(), 1)}
        if self.device.type == "cuda":
            memory["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return BlockReport(index, ctx.name, {k: round(v, 4) for k, v in times.items()}, results, memory), outputs
