"""The pass contract, the pass registry and the requires/provides scheduler.

A pass is a class with a `name` (the recipe's `type`), a pydantic `Params` model whose Field
descriptions are the user documentation, and the sets of artifact names it `requires` and
`provides`. The executor drives it block by block:

1. `begin_observe(ctx)` / `end_observe(ctx)` bracket one forward pass of the still-dense block over
   the calibration inputs; a pass registers hooks in the first and publishes artifacts in the second.
2. `apply(ctx) -> PassResult` rewrites the block (weights, masks) and reports what it changed.

The `PassManager` orders the recipe's passes with networkx so that every requirement is provided
earlier, keeping the recipe order wherever dependencies allow, and rejects an impossible recipe
before any model is loaded.
"""

from __future__ import annotations

import re
import types
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import networkx as nx
import torch
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from d2compiler.errors import PassOrderError, PluginError
from d2compiler.recipe.artifacts import ARTIFACTS

if TYPE_CHECKING:
    from d2compiler.execution.executor import BlockContext
    from d2compiler.graph.structure import LinearLayer


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
        for pattern in patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"bad regular expression {pattern!r}: {exc}") from exc
            elif not pattern.strip():
                raise ValueError("empty pattern")
        return patterns


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
    in_place: ClassVar[bool] = True  # rewrites the block's weights; False: reads them only (checked after `apply`)
    surveys: ClassVar[bool] = False  # needs one dense sweep over every block before the first block is changed

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
        A pass extends them with `super().postconditions(ctx, result) + [...]`."""
        by_name = {layer.name: layer for layer in ctx.layers}
        conditions = []
        for name, keep in ctx.masks.items():
            weight = by_name[name].weight_matrix()
            conditions.append((((weight != 0) & ~keep.to(weight.device)).sum(), f"revived {{}} pruned weights of {name}"))
        conditions += [((~torch.isfinite(layer.module.weight)).sum(), f"left {{}} NaN or Inf values in {layer.name}")
                       for layer in ctx.layers]
        if not self.in_place:  # a pass that declares it only reads the block left every parameter as it was
            conditions += [(changed, f"declares in_place = False but wrote {name}")
                           for name, changed in ctx.parameter_changes(ctx.fingerprints_before).items()]
        return conditions

    @abstractmethod
    def apply(self, ctx: BlockContext) -> PassResult:
        """Transform the block and report what changed."""


PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make `cls` available to recipes under `cls.name`."""
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        first = PASS_REGISTRY[cls.name]
        raise ValueError(f"pass name {cls.name!r} registered twice ({first.__module__}.{first.__qualname__} and "
                         f"{cls.__module__}.{cls.__qualname__})")
    if PASS_REGISTRY.get(cls.name) is cls:
        return cls
    # Each pass gets its own params model whose `type` is the literal pass name, so recipes
    # validate as a discriminated union and `d2c schema` documents each pass separately.
    title = "".join(part.capitalize() for part in cls.name.split("_")) + "Pass"
    cls.Params = create_model(
        title,
        __base__=cls.Params,
        __doc__=f"`{cls.name}`: {cls.summary or cls.__doc__ or ''}".strip(),
        type=(Literal[cls.name], Field(description=f"Always '{cls.name}'.")),  # type: ignore[valid-type]
    )
    check_defaults(cls.Params, cls.name)
    PASS_REGISTRY[cls.name] = cls
    return cls


def check_defaults(params: type[BaseModel], name: str) -> None:
    """Raise ValueError when a default of `params` breaks its own field's constraints (pydantic does
    not validate defaults), e.g. a NaN default of a field declared `ge=0`."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    for field_name, info in params.model_fields.items():
        if info.is_required() or info.default_factory is not None or info.default is None:
            continue
        try:
            TypeAdapter(Annotated[info.annotation, info], config=ConfigDict(allow_inf_nan=False)).validate_python(info.default)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise ValueError(f"pass {name!r}: the default of {field_name} ({info.default!r}) is invalid: {problem}") from None


STATISTICS = frozenset({"hessian", "act_norms"})  # the per-layer statistics artifacts an observing pass records

PLUGIN_GROUP = "d2compiler.passes"
_plugins_loaded = False


def load_plugins() -> None:
    """Import the passes other packages declare in the `d2compiler.passes` entry-point group (once).
    An entry point names a module that registers its passes on import, or a `Pass` subclass, which is
    registered here. A plugin that fails to load is a `PluginError` naming it."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for point in entry_points(group=PLUGIN_GROUP):
        where = f"plugin {point.name!r} ({PLUGIN_GROUP}: {point.value}"
        dist = getattr(point, "dist", None)
        where += f", from {dist.name} {dist.version})" if dist is not None else ")"
        try:
            loaded = point.load()
        except SystemExit as exc:
            raise PluginError(f"{where} called sys.exit({exc.code!r}) while loading") from None
        except Exception as exc:  # a third party's import error, whatever its type
            raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}") from None
        if isinstance(loaded, types.ModuleType):
            continue
        if not isinstance(loaded, type):
            raise PluginError(f"{where} names a {type(loaded).__name__}: it must name a module that registers "
                              "its passes or a Pass subclass")
        if not issubclass(loaded, Pass):
            raise PluginError(f"{where} is a class but not a d2compiler Pass")
        try:
            register_pass(loaded)
        except (ValueError, AttributeError) as exc:
            raise PluginError(f"{where}: {exc}") from None


SHIPPED_PASSES = "passes"  # the package of the passes that ship with d2compiler, discovered like a plugin


def registered_passes() -> dict[str, type[Pass]]:
    """All registered passes: the shipped `passes` package and the plugins' (entry points), both found
    by name at run time, so that the core never imports a pass."""
    import importlib

    importlib.import_module(SHIPPED_PASSES)  # registers the shipped passes on import
    load_plugins()
    return dict(sorted(PASS_REGISTRY.items()))


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


class PassManager:
    """Builds the pass instances of a recipe and orders them by their requires/provides edges."""

    def __init__(self, params_list: list[PassParams]):
        registry = registered_passes()
        self.passes: list[Pass] = [registry[p.type](p) for p in params_list]
        _check_artifact_kinds(self.passes)
        self.schedule: list[Pass] = self._order()

    def _order(self) -> list[Pass]:
        graph = nx.DiGraph()
        graph.add_nodes_from(range(len(self.passes)))
        for i, consumer in enumerate(self.passes):
            for artifact in sorted(consumer.requires):
                providers = [j for j, p in enumerate(self.passes) if artifact in p.provides and j != i]
                if not providers:
                    offered = sorted({a for p in self.passes for a in p.provides}) or ["nothing"]
                    hint = _provider_hint(artifact)
                    raise PassOrderError(
                        f"passes[{i}] ({consumer.name}) requires '{artifact}', which no pass in "
                        f"the recipe provides (provided: {', '.join(offered)}).{hint}"
                    )
                # Prefer the nearest earlier provider; otherwise the first later one.
                earlier = [j for j in providers if j < i]
                graph.add_edge(max(earlier) if earlier else min(providers), i)
        for i, consumer in enumerate(self.passes):
            for artifact in sorted(consumer.optional):
                for j, p in enumerate(self.passes):
                    if artifact in p.provides and j != i:
                        graph.add_edge(j, i)
        try:
            order = list(nx.lexicographical_topological_sort(graph))
        except nx.NetworkXUnfeasible as exc:
            raise PassOrderError(f"the passes' requirements form a cycle: {exc}") from exc
        schedule = [self.passes[i] for i in order]
        _check_quantization_last(schedule)
        _check_artifacts(schedule)
        for p in schedule:
            p.check_schedule(schedule)
        return schedule


def _check_artifact_kinds(passes: list[Pass]) -> None:
    """Every artifact a pass names is a registered kind."""
    for p in passes:
        for name in sorted(p.requires | p.optional | p.provides | p.writes | p.consumed):
            if name not in ARTIFACTS:
                raise PassOrderError(f"pass '{p.name}' names the artifact '{name}', which is not a registered kind "
                                     f"(known: {', '.join(sorted(ARTIFACTS))}); register it with d2compiler.contract.register_artifact")


def _check_artifacts(schedule: list[Pass]) -> None:
    """What a pass provides to be `consumed` is used by a later pass."""
    for i, p in enumerate(schedule):
        for name in sorted(p.consumed):
            users = [q.name for q in schedule[i + 1 :] if name in q.requires | q.optional]
            if not users:
                makers = pass_types(lambda cls, name=name: name in cls.requires | cls.optional)
                raise PassOrderError(f"pass '{p.name}' provides '{name}', but no later pass uses it, so it would do nothing; "
                                     f"add a pass of type {makers} after it")


def _check_quantization_last(schedule: list[Pass]) -> None:
    """A pass that moves weights after a quantization pass would take them off their grid, and a
    `final` pass (packing) must come last."""
    for p in schedule[:-1]:
        if p.final:
            raise PassOrderError(f"pass '{p.name}' must be the last pass (it changes how weights are stored); "
                                 f"the schedule is {' -> '.join(q.name for q in schedule)}")
    for i, first in enumerate(schedule):
        for later in schedule[i + 1 :]:
            if first.quantizes and later.updates_weights and not later.quantizes:
                raise PassOrderError(
                    f"pass '{later.name}' comes after '{first.name}': its weight update would move the quantized "
                    "weights off their integer grid; put pruning passes before quantization passes"
                )


def pass_types(test: Callable[[type[Pass]], bool]) -> str:
    """The registered pass types for which `test(cls)` holds, for a message ("'a' or 'b'"; "" if none)."""
    return " or ".join(repr(name) for name, cls in registered_passes().items() if test(cls))


def _provider_hint(artifact: str) -> str:
    names = pass_types(lambda cls: artifact in cls.provides)
    return f" Add a pass of type {names} before it." if names else ""
