"""The pass contract: what a pass declares (`Pass`), what it is given (the `BlockContext`
protocol, implemented by the executor) and what it returns (`PassResult`).

The executor drives a pass block by block:

1. `begin_observe(ctx)` / `end_observe(ctx)` bracket one forward pass of the still-dense block over
   the calibration inputs; a pass registers hooks in the first and publishes artifacts in the second.
2. `apply(ctx) -> PassResult` rewrites the block (weights, masks) and reports what it changed. The
   executor checks the report: a pass that says `modified = False` (or declares `reads_only`) but
   changed a parameter is refused, naming it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from d2compiler.graph.targets import check_pattern

if TYPE_CHECKING:
    from torch import nn

    from d2compiler.graph.layers import LinearLayer
    from d2compiler.graph.structure import BlockStructure


class PassParams(BaseModel):
    """Parameters common to every pass. Unknown keys are errors, and so are NaN and infinities."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: str = Field(description="The pass to run (its registered name).")


class TargetedParams(PassParams):
    """Parameters of a pass that acts on chosen linear layers."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear"],
        description=(
            "Which linear layers inside the repeated blocks the pass acts on. Each entry is a class "
            "name (`Linear` matches every linear, GPT-2's `Conv1D` included; `Conv1D` only those), an "
            "exact module name (a fused q/k/v linear's name covers its slices; `attn.c_attn[q]` names one), a role (`role:q`, `role:k`, `role:v`, "
            "`role:o`, `role:gate`, `role:up`, `role:down`), or a regular expression on the full "
            "module name with the prefix `re:` (matched from the start, as in llm-compressor)."
        ),
        min_length=1,
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="Layers to leave alone, written like `targets`. Ignore wins over targets.",
    )

    @field_validator("targets", "ignore")
    @classmethod
    def _check_patterns(cls, patterns: list[str]) -> list[str]:
        return [check_pattern(pattern) for pattern in patterns]


@dataclass
class PassResult:
    """What a pass did to one block: `modified` says whether any weight changed; `layers` maps a
    full module name to its metrics (sparsity, reconstruction error, time, ...). A metric may be a
    0-dim tensor on the compute device: the executor turns all of a pass's tensor metrics into Python
    numbers at once, in the one host sync it makes per pass (integer tensors become ints)."""

    modified: bool
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


Condition = tuple[torch.Tensor, str]  # (count that must be 0, message with {} for the count)


@dataclass(frozen=True)
class PlanCost:
    """What a pass adds to `d2c plan`'s cost model, beyond the block forwards and statistics."""

    solves: bool = False  # one OBS-style solve per targeted layer (costed with the `column_us` rate)
    kl_samples: int | None = None  # scores attention candidates over this many calibration samples (0: all)
    statistics_copies: int = 1  # statistics accumulators it keeps per input (held-out Hessians: 2)
    extra_forwards: float = 0.0  # further block forwards over all calibration samples (true-sequential stages)
    sample_forwards: tuple[float, int] = (0.0, 0)  # (further forwards per sample, on the first n samples; 0: all):
    # the survey, block-output scoring
    keeps_inputs: bool = False  # holds a block's observed layer inputs (one per shared input, routed experts
    # aside) and a second stream of hidden states through the block


class ProcessGroup(Protocol):
    """The run's processes as a pass sees them (`BlockContext.group`)."""

    size: int
    rank: int

    def total(self, value: float) -> float:
        """`value` summed over the processes."""
        ...


STATISTICS = frozenset({"hessian", "act_norms"})  # the per-layer statistics artifacts an observing pass records

LayerWork = tuple[tuple[torch.Tensor, ...], dict[str, Any]]  # what `BlockContext.map_layers` computes per layer


class BlockContext(Protocol):
    """What a pass sees of the block being compressed; the executor provides it
    (`execution.context.ExecutorContext`). Scope: one block, this process's share of the
    calibration samples."""

    index: int  # the block's position in its stack
    name: str  # its full module name (`model.layers.3`)
    module: nn.Module  # the block, on `device`
    layers: list[LinearLayer]  # its linear layers (modules, fused slices, experts)
    structure: BlockStructure  # roles, input groups and attention sites found by tracing
    device: torch.device
    inputs: list[Any]  # this process's calibration calls of the block (`BlockInput`)
    needed: set[str]  # artifacts some scheduled pass requires or uses
    targeted: set[str]  # names of the layers some scheduled pass targets
    masks: dict[str, torch.Tensor]  # keep-masks recorded so far (`record_mask`)
    dense_outputs: list[torch.Tensor] | None  # the dense block's outputs, once observed
    schedule: list[Pass]
    group: ProcessGroup
    sample_offset: int  # global index of `inputs[0]` among all processes' samples

    @property
    def total_samples(self) -> int:
        """Calibration samples over all processes."""
        ...

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a statistic over the processes, in place."""
        ...

    def map_layers(self, layers: list[LinearLayer], compute: Callable[[LinearLayer], LayerWork]
                   ) -> Iterator[tuple[LinearLayer, tuple[torch.Tensor, ...], dict[str, Any]]]:
        """`compute` over `layers`, each by one process, every result on every process, in order."""
        ...

    def share_work(self, items: list[Any], compute: Callable[[Any], LayerWork], costs: list[float]
                   ) -> Iterator[tuple[Any, tuple[torch.Tensor, ...], dict[str, Any]]]:
        """`map_layers` for any items with their costs."""
        ...

    def consumers(self, artifact: str) -> list[Pass]:
        """Scheduled passes that require or optionally use `artifact`."""
        ...

    def select(self, params: TargetedParams) -> list[LinearLayer]:
        """The layers of this block that `params.targets` / `params.ignore` pick."""
        ...

    def observed_groups(self, layers: list[LinearLayer] | None = None) -> list[list[LinearLayer]]:
        """Layers grouped by shared input tensor, in module order."""
        ...

    def observed(self, layers: list[LinearLayer]) -> list[LinearLayer]:
        """Those of `layers` the observation now running records statistics for."""
        ...

    def targets_of(self, pass_: Pass) -> list[LinearLayer]:
        """The layers of this block another scheduled pass acts on."""
        ...

    def publish(self, artifact: str, layer: str, value: Any, *, by: Pass | None = None) -> None:
        """Make `value` the `artifact` of `layer` (refused unless declared and of the kind's type)."""
        ...

    def artifact(self, artifact: str, layer: str) -> Any:
        """The `artifact` of `layer`, or None."""
        ...

    def reobserve(self, passes: list[Pass], layers: list[LinearLayer]) -> None:
        """Run the block as it now is with `passes` observing `layers` only (true-sequential)."""
        ...

    def output_error_sums(self, indices: list[int], weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """(Σ‖Y′−Y‖², Σ‖Y‖²) over samples `indices` with `weights` standing in (not reduced)."""
        ...

    def record_mask(self, layer: str, keep: torch.Tensor) -> None:
        """Record a keep-mask; masks compose by AND."""
        ...


class Pass(ABC):
    """Base class of every pass. Subclasses set the class attributes and implement `apply`."""

    name: ClassVar[str]
    Params: ClassVar[type[PassParams]]
    requires: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = frozenset()  # used when some pass provides it
    provides: ClassVar[frozenset[str]] = frozenset()
    writes: ClassVar[frozenset[str]] = frozenset()  # artifacts it publishes for itself (not scheduled on)
    consumed: ClassVar[frozenset[str]] = frozenset()  # provided artifacts that are meaningless unless a later pass uses them
    summary: ClassVar[str] = ""
    observes: ClassVar[bool] = False  # True when begin/end_observe record something
    updates_weights: ClassVar[bool] = False  # moves kept weights (an OBS update), not only zeroes them
    quantizes: ClassVar[bool] = False  # leaves weights on an integer grid (weight_scale / weight_zero_point)
    final: ClassVar[bool] = False  # must be the last pass (e.g. it changes how weights are stored)
    reads_only: ClassVar[bool] = False  # promises to change no parameter of the block (checked after `apply`)
    surveys: ClassVar[bool] = False  # needs one dense sweep over every block before the first block is changed
    origin: str | None = None  # where a plugin pass came from (set by the PassManager, for error messages)

    def __init__(self, params: PassParams):
        self.params = params

    def target_patterns(self) -> tuple[list[str], list[str]] | None:
        """(targets, ignore) when the pass acts on chosen layers; None when it serves others."""
        if isinstance(self.params, TargetedParams):
            return self.params.targets, self.params.ignore
        return None

    def check_layers(self, layers: list[LinearLayer]) -> None:
        """Refuse, before any block runs, targeted layers this pass cannot handle (raise PassError
        naming them). Default: accept all."""

    def plan_cost(self) -> PlanCost:
        """What `d2c plan` should count for this pass. Default: nothing beyond forwards and statistics."""
        return PlanCost()

    def measure_rates(self, device: torch.device) -> dict[str, float]:
        """Rates the cost model needs for this pass, measured on `device` in a fraction of a second
        (e.g. `column_us`, the OBS loop's overhead per column). Default: none."""
        return {}

    def record_fields(self, blocks: list[dict[str, Any]]) -> dict[str, Any]:
        """Fields this pass adds to `sparsity.json`, from the run's per-block records (`blocks[i]
        ["passes"][name]` is this pass's `PassResult.info` in block i). Default: none."""
        return {}

    def report_figures(self, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per-block figures this pass adds to `report.html`: dicts with `title`, `ylabel` and `points`
        ([[block, value], ...]); they are stored in `sparsity.json` (`figures`). Default: none."""
        return []

    def check_schedule(self, schedule: list[Pass]) -> None:
        """Refuse (raise `PassOrderError`) a recipe in which this pass cannot do what it was asked,
        given the other scheduled passes. Default: accept."""

    def reobserves_upstream(self) -> bool:
        """Whether this pass re-observes layers once the layers before them are pruned (true-sequential):
        then the groups of a block's experts (`execution.expert_groups`) come after the block's other
        layers, not before them. Default: False."""
        return False

    def statistics_read(self, ctx: BlockContext) -> set[str]:
        """Names of the layers whose statistics, as the block's first observation records them, this
        pass reads (`hessian`, `act_norms`, or what it observes itself). That observation records
        statistics only for layers some scheduled pass reads. Default: every layer it targets if it
        requires or optionally uses a statistic, or observes; else none. A pass that re-observes some
        layers before reading them (true-sequential) leaves those out."""
        if (self.requires | self.optional) & STATISTICS or self.observes:
            return {layer.name for layer in ctx.targets_of(self)}
        return set()

    def begin_observe(self, ctx: BlockContext) -> None:
        """Register what should be recorded while the dense block runs (for the layers
        `ctx.observed` keeps). Default: nothing."""

    def end_observe(self, ctx: BlockContext) -> None:
        """Publish the artifacts recorded since `begin_observe`. Default: nothing."""

    def survey_samples(self) -> int | None:
        """How many calibration samples (the first ones) the survey needs; None: all. The survey runs
        the most any surveying pass asks for."""
        return None

    def begin_survey(self, ctx: BlockContext) -> None:
        """For a pass with `surveys = True`: before the dense model's block `ctx.index` runs over the
        calibration inputs in the survey (a sweep over all targeted blocks before any is changed).
        Register hooks here. Default: nothing."""

    def end_survey(self, ctx: BlockContext) -> None:
        """After that block's survey forward (`ctx.dense_outputs` holds its outputs; the block is still
        on the compute device and dense). Default: nothing."""

    def finish_survey(self) -> None:
        """After the survey's last block, before the first block is pruned. Default: nothing."""

    def precondition(self, ctx: BlockContext) -> None:
        """Check what this pass needs of the block before `apply`; raise `PreconditionError` with what
        is wrong (the executor adds the block and the passes that ran before). Default: nothing."""

    def postconditions(self, ctx: BlockContext, result: PassResult) -> list[Condition]:
        """What must hold after `apply`, as (count, message) pairs: each count (a 0-dim tensor, read
        with all the others in one host sync) must be 0, and `message` (with `{}` for the count) says
        what broke. Default: no recorded mask was revived and every weight of the block is finite.
        (The executor checks on its own, whatever a pass returns here, that a pass reporting
        `modified = False` or declaring `reads_only` changed no parameter.) A pass extends them with `super().postconditions(ctx, result) + [...]`."""
        by_name = {layer.name: layer for layer in ctx.layers}
        conditions = []
        for name, keep in ctx.masks.items():
            weight = by_name[name].weight_matrix()
            conditions.append((((weight != 0) & ~keep.to(weight.device)).sum(), f"revived {{}} pruned weights of {name}"))
        conditions += [((~torch.isfinite(layer.module.weight)).sum(), f"left {{}} NaN or Inf values in {layer.name}")
                       for layer in ctx.layers]
        return conditions

    @abstractmethod
    def apply(self, ctx: BlockContext) -> PassResult:
        """Transform the block and report what changed."""


class UpdateVariants(ABC):
    """A pruning pass that honours an update plan: it prunes each layer with or without the OBS
    weight update, as the `update_plan` artifact says, and computes either variant on request (so
    that the pass providing the plan can score them before choosing)."""

    @abstractmethod
    def prepare_variants(self, ctx: BlockContext, requests: list[tuple[LinearLayer, bool, torch.Tensor | None, str]]) -> None:
        """Compute the (layer, update, hessian, tag) variants ahead, spread over the run's processes."""

    @abstractmethod
    def variant(self, ctx: BlockContext, layer: LinearLayer, update: bool, hessian: torch.Tensor | None = None,
                tag: str = "all") -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The pruned (weight, keep, metrics) of `layer` with or without the update; `hessian` replaces
        the calibration Hessian under `tag`."""
