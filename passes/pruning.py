"""Shared parameters and driver of the pruning passes: per-layer mask selection, the mask
artifact, and the per-layer metrics every pruning pass records."""

from __future__ import annotations

import dataclasses
import re
import time
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator, model_validator

from d2compiler.contract import Pass, PassError, PassResult, PlanCost, TargetedParams, UpdateVariants, obs_cost

from .obs import ObsResult
from .obs_batch import ObsProblem, obs_prune_many

if TYPE_CHECKING:
    from d2compiler.contract import BlockContext, LinearLayer

_NM = re.compile(r"^(\d+):(\d+)$")


class SparsityParams(TargetedParams):
    """Parameters shared by every pruning pass."""

    sparsity: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="Fraction of weights pruned in each targeted layer, in [0, 1). Required for "
        "unstructured masks; for N:M it defaults to N/M and must equal it if given.",
    )
    true_sequential: bool = Field(
        default=False,
        description="Prune the block's linears stage by stage in forward order (q/k/v, then o, then gate/up, then "
        "down: the groups that share an input), and before each later stage re-run the partly pruned block so "
        "its statistics (Hessians, activation norms) see the already-pruned upstream projections, as the SparseGPT "
        "repository's `--true-sequential`. Costs up to one more block forward per later stage (each re-run observes "
        "only that stage's layers and stops once they have run).",
    )
    sequential_stages: list[list[str]] | None = Field(
        default=None,
        description="With `true_sequential`: the stages as lists of layer roles, in the order they are pruned, e.g. "
        "`[[\"q\", \"k\", \"v\", \"o\", \"gate\", \"up\"], [\"down\"]]` re-runs the block once, before `down` "
        "(cheaper than one stage per shared input, the default). Every targeted layer's role must be in one stage.",
    )
    mask_structure: str = Field(
        default="unstructured",
        description="`unstructured`, or `N:M`: N of every M consecutive weights of a row (along "
        "the input dimension) are pruned, e.g. `2:4` (NVIDIA's 2:4 sparsity) or `4:8`.",
    )

    @field_validator("mask_structure")
    @classmethod
    def _check_structure(cls, value: str) -> str:
        if value == "unstructured":
            return value
        match = _NM.match(value)
        if not match:
            raise ValueError("expected 'unstructured' or 'N:M' such as '2:4'")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got N={n}, M={m}")
        return value

    @model_validator(mode="after")
    def _check_sparsity(self) -> SparsityParams:
        nm = self.n_of_m
        if nm is None and self.sparsity is None:
            raise ValueError("'sparsity' is required when mask_structure = 'unstructured'")
        if nm is not None and self.sparsity is not None and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
            raise ValueError(
                f"'sparsity' = {self.sparsity} contradicts mask_structure = '{self.mask_structure}' "
                f"(which prunes {nm[0]}/{nm[1]}); drop 'sparsity'"
            )
        return self

    @model_validator(mode="after")
    def _check_stages(self) -> SparsityParams:
        if self.sequential_stages is None:
            return self
        if not self.true_sequential:
            raise ValueError("'sequential_stages' needs true_sequential = true")
        roles = [role for stage in self.sequential_stages for role in stage]
        if not self.sequential_stages or any(not stage for stage in self.sequential_stages):
            raise ValueError("'sequential_stages' needs non-empty stages")
        if len(set(roles)) != len(roles):
            raise ValueError(f"'sequential_stages' names a role twice: {sorted({r for r in roles if roles.count(r) > 1})}")
        return self

    @property
    def n_of_m(self) -> tuple[int, int] | None:
        if self.mask_structure == "unstructured":
            return None
        n, m = self.mask_structure.split(":")
        return int(n), int(m)

    @property
    def target_sparsity(self) -> float:
        nm = self.n_of_m
        return nm[0] / nm[1] if nm else float(self.sparsity or 0.0)


def absolute_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor | None:
    """‖(W − W′)X‖² per calibration token, from H = XXᵀ/n (None without H), as a 0-dim tensor on the
    weights' device (multiply by the tokens for the sum over them)."""
    if hessian is None:
        return None
    delta = before - after
    return torch.sum((delta @ hessian.to(before.device)) * delta)


def relative_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor | None:
    """‖(W − W′)X‖² / ‖WX‖² over the calibration tokens, from H = XXᵀ/n (None without H), as a 0-dim
    tensor on the weights' device (no host sync; the executor reads a pass's metrics at once)."""
    num = absolute_error(before, after, hessian)
    if num is None:
        return None
    den = torch.sum((before @ hessian.to(before.device)) * before)
    return torch.where(den > 0, num / den, torch.zeros_like(num))


class DampedParams(SparsityParams):
    """Parameters of a pruning pass that solves with the damped Hessian."""

    dampening_frac: float = Field(
        default=0.01, gt=0.0, lt=10.0,
        description="Damping added to the Hessian diagonal, as a fraction of its mean. It is raised "
        "10× at a time (with a warning) when the Hessian is not positive definite.",
    )


class PruningPass(Pass):
    """Drives one pruning method over the targeted linears of a block. An unstructured pass prunes
    each layer at its `layer_sparsity` where a layer-wise allocation (`sparsity_allocation`) published
    one, else at `sparsity`."""

    Params = SparsityParams
    provides = frozenset({"mask"})
    optional = frozenset({"layer_sparsity"})

    def plan_cost(self) -> PlanCost:
        """True-sequential re-runs the block before each later stage (at most three more forwards in a
        Llama, one per later stage of `sequential_stages`; each re-run stops after its stage, so this
        is an upper bound)."""
        params: SparsityParams = self.params  # type: ignore[assignment]
        if not params.true_sequential:
            return PlanCost()
        return PlanCost(extra_forwards=3.0 if params.sequential_stages is None else float(len(params.sequential_stages) - 1))

    def sparsity_of(self, ctx: BlockContext, layer: LinearLayer) -> float:
        """The fraction of `layer` this pass prunes: its allocated `layer_sparsity`, else `sparsity`."""
        allocated = ctx.artifact("layer_sparsity", layer.name)
        return float(allocated) if allocated is not None else self.params.target_sparsity

    @abstractmethod
    def prune_layer(self, layer: LinearLayer, weight: torch.Tensor, ctx: BlockContext) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Return (new fp32 weight, keep mask, extra metrics) for one (out, in) fp32 weight."""

    def apply(self, ctx: BlockContext) -> PassResult:
        params: SparsityParams = self.params  # type: ignore[assignment]
        result = PassResult(modified=False)
        layers = ctx.select(params)
        if not params.true_sequential:
            self._prune(ctx, layers, result)
            return result
        stages = self.stages(ctx, layers)
        for i, stage in enumerate(stages):
            if i:  # the statistics of this stage's inputs, from the block as pruned so far
                ctx.reobserve([p for p in ctx.schedule if p.observes and p.provides & self.requires] + ([self] if self.observes else []), stage)
                self.forget_variants(ctx, stage)
            self._prune(ctx, stage, result)
        result.info["stages"] = [[layer.role for layer in stage] for stage in stages]
        return result

    def reobserves_upstream(self) -> bool:
        return bool(self.params.true_sequential)

    def statistics_read(self, ctx: BlockContext) -> set[str]:
        """Its targets; with `true_sequential`, only the first stage's (the later ones are re-observed)."""
        layers = ctx.select(self.params)
        if self.params.true_sequential and layers:
            layers = self.stages(ctx, layers)[0]
        return {layer.name for layer in layers}

    def stages(self, ctx: BlockContext, layers: list[LinearLayer]) -> list[list[LinearLayer]]:
        """The true-sequential stages: `sequential_stages` by role, else one per shared input (q/k/v;
        o; gate/up; down)."""
        roles = self.params.sequential_stages
        if roles is None:
            return ctx.observed_groups(layers)
        missing = [f"{layer.name} ({layer.role})" for layer in layers if not any(layer.role in stage for stage in roles)]
        if missing:
            raise PassError(f"{self.name}: sequential_stages leaves out {', '.join(missing)} (block {ctx.index}); "
                            "name every targeted layer's role in one stage")
        stages = [[layer for layer in layers if layer.role in stage] for stage in roles]
        return [stage for stage in stages if stage]

    def forget_variants(self, ctx: BlockContext, layers: list[LinearLayer]) -> None:
        """Drop pruned variants computed ahead (from statistics that are now stale). Default: none kept."""

    def batches(self, ctx: BlockContext, layers: list[LinearLayer]) -> list[list[LinearLayer]]:
        """`layers` in the units they are pruned in: each alone by default; a pass that solves several
        at once (`prune_batch`) returns those together."""
        return [[layer] for layer in layers]

    def prune_batch(self, ctx: BlockContext, layers: list[LinearLayer]) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """(new fp32 weight, keep, metrics) of each of `layers`, one unit of `batches`. Default: one by one."""
        return [self.prune_layer(layer, layer.weight_matrix().to(device=ctx.device, dtype=torch.float32, copy=True), ctx)
                for layer in layers]

    def _prune(self, ctx: BlockContext, layers: list[LinearLayer], result: PassResult) -> None:
        params: SparsityParams = self.params  # type: ignore[assignment]

        def compute(batch: list[LinearLayer]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
            start = time.perf_counter()
            weights, keeps, infos = [], [], []
            for layer, (new_weight, keep, extra) in zip(batch, self.prune_batch(ctx, batch)):
                earlier = ctx.artifact("mask", layer.name)
                if earlier is not None:  # an earlier pass's pruned weights stay pruned
                    keep = keep & earlier.to(keep.device)
                weights.append(new_weight.masked_fill(~keep, 0.0))  # one new tensor (no zeros tensor beside it)
                keeps.append(keep)
                infos.append(extra)
            seconds = round((time.perf_counter() - start) / len(batch), 4)  # a batch's time, shared by its layers
            stack = (lambda ts: ts[0].unsqueeze(0)) if len(batch) == 1 else torch.stack
            return (stack(weights), stack(keeps)), {"layers": [{**info, "time_s": seconds} for info in infos]}

        units = self.batches(ctx, layers)
        work = ctx.share_work(units, compute, [sum(obs_cost(la) for la in batch) for batch in units])
        for batch, (new_weights, keeps), infos in work:
            for layer, new_weight, keep, info in zip(batch, new_weights, keeps, infos["layers"]):
                weight = layer.weight_matrix().to(device=ctx.device, dtype=torch.float32, copy=True)
                layer.set_weight_matrix(new_weight)
                ctx.record_mask(layer.name, keep)
                stored = layer.weight_matrix()
                result.layers[layer.name] = {  # the executor adds the layer's role and shape
                    "sparsity": (stored == 0).sum() / stored.numel(),
                    "pruned": (~keep).sum(),
                    "pattern": params.mask_structure,
                    "recon_error": relative_error(weight, new_weight, ctx.artifact("hessian", layer.name)),
                    "time_s": info.pop("time_s"),
                    **info,
                }
            result.modified = True


class PlannedPruningPass(PruningPass, UpdateVariants):
    """A pruning pass with an OBS weight update that honours an update plan (`attention_kl_update`):
    each layer is pruned with or without the update, as the plan says (with the update where there is
    no plan). Both variants are cached per block (`update_variants`), so a candidate scored by the
    plan's pass is not recomputed when the plan is applied."""

    optional = frozenset({"update_plan", "layer_sparsity"})
    writes = frozenset({"update_variants"})
    updates_weights = True

    def plan_cost(self) -> PlanCost:
        return dataclasses.replace(super().plan_cost(), solves=True)

    def measure_rates(self, device: torch.device) -> dict[str, float]:
        """`column_us`: the solve's overhead per column, from one small solve (`probe_solve`)."""
        w, x = torch.randn(64, 256, device=device), torch.randn(512, 256, device=device)
        h = x.t() @ x / 512
        start = time.perf_counter()
        self.probe_solve(w, h)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"column_us": (time.perf_counter() - start) / 256 * 1e6}

    def probe_solve(self, weight: torch.Tensor, hessian: torch.Tensor) -> None:
        """One solve of this pass's kind at 50%, timed by `measure_rates` (default: the OBS sweep)."""
        from .obs import obs_prune

        obs_prune(weight, hessian, sparsity=0.5, n_of_m=None, block_size=128, damping=0.01, layer="probe")

    @abstractmethod
    def compute_variant(self, ctx: BlockContext, layer: LinearLayer, weight: torch.Tensor, hessian: torch.Tensor,
                        update: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(pruned weight, keep, metrics) of one (out, in) fp32 weight, with or without the update."""

    def prepare_variants(self, ctx: BlockContext, requests: list[tuple[LinearLayer, bool, torch.Tensor | None, str]]) -> None:
        todo = [r for r in requests if (r[1], r[3]) not in (ctx.artifact("update_variants", r[0].name) or {})]

        def compute(request: tuple[LinearLayer, bool, torch.Tensor | None, str]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
            weight, keep, info = self.variant(ctx, *request)
            return (weight, keep), info

        work = ctx.share_work(todo, compute, [obs_cost(r[0]) for r in todo])
        for (layer, update, _hessian, tag), (weight, keep), info in work:
            self._cache(ctx, layer)[(update, tag)] = (weight, keep, info)

    def forget_variants(self, ctx: BlockContext, layers: list[LinearLayer]) -> None:
        for layer in layers:
            cache = ctx.artifact("update_variants", layer.name)
            if cache:
                cache.clear()

    def _cache(self, ctx: BlockContext, layer: LinearLayer) -> dict[tuple[bool, str], Any]:
        cache = ctx.artifact("update_variants", layer.name)
        if cache is None:
            cache = {}
            ctx.publish("update_variants", layer.name, cache, by=self)
        return cache

    def variant(self, ctx: BlockContext, layer: LinearLayer, update: bool, hessian: torch.Tensor | None = None,
                tag: str = "all") -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        cache = self._cache(ctx, layer)
        if (update, tag) not in cache:
            weight = layer.weight_matrix().to(device=ctx.device, dtype=torch.float32, copy=True)
            h = ctx.artifact("hessian", layer.name) if hessian is None else hessian
            cache[(update, tag)] = self.compute_variant(ctx, layer, weight, h.to(weight.device), update)
        return cache[(update, tag)]

    def obs_problem(self, ctx: BlockContext, layer: LinearLayer) -> ObsProblem | None:
        """The OBS problem of `layer` with the update, for `obs_batch.obs_prune_many`; None: this pass
        solves its layers one by one."""
        return None

    def solved_info(self, res: ObsResult) -> dict[str, Any]:
        """The metrics of a layer solved in a batch (what `compute_variant` reports with the update)."""
        return res.metrics()

    def batches(self, ctx: BlockContext, layers: list[LinearLayer]) -> list[list[LinearLayer]]:
        """Routed experts of one role and shape that take the update (no update plan names them) are
        solved together (`obs_batch`), each batch where its first member stands; the rest one by one."""
        units: list[list[LinearLayer]] = []
        together: dict[tuple[str, tuple[int, int]], list[LinearLayer]] = {}
        for layer in layers:
            if layer.routed and ctx.artifact("update_plan", layer.name) is None and self.obs_problem(ctx, layer) is not None:
                key = (layer.role, layer.shape)
                if key not in together:
                    together[key] = []
                    units.append(together[key])
                together[key].append(layer)
            else:
                units.append([layer])
        return units

    def prune_batch(self, ctx: BlockContext, layers: list[LinearLayer]) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        if len(layers) == 1:
            return super().prune_batch(ctx, layers)
        weights = [layer.weight_matrix().to(device=ctx.device, dtype=torch.float32, copy=True) for layer in layers]
        hessians = [ctx.artifact("hessian", layer.name).to(ctx.device) for layer in layers]
        problems = [self.obs_problem(ctx, layer) for layer in layers]
        solved = obs_prune_many(weights, hessians, [p for p in problems if p is not None])
        return [(res.weight, res.keep, {**self.solved_info(res), "batch": len(layers)}) for res in solved]

    def prune_layer(self, layer: LinearLayer, weight: torch.Tensor, ctx: BlockContext) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        plan = ctx.artifact("update_plan", layer.name)
        update = True if plan is None else bool(plan)
        new_weight, keep, info = self.variant(ctx, layer, update)
        return new_weight, keep, {**info, **({"update": update} if plan is not None else {})}


def select_mask(score: torch.Tensor, params: SparsityParams, row_wise: bool, sparsity: float | None = None) -> torch.Tensor:
    """Keep mask from a saliency score (higher = more important): N:M groups, per-row counts
    (`row_wise`) or the whole layer as one comparison group, at `sparsity` (default: the params')."""
    from .masks import lowest_k, lowest_n_of_m, lowest_per_row, prune_count, row_counts

    nm = params.n_of_m
    if nm is not None:
        return ~lowest_n_of_m(score, *nm)
    rows, cols = score.shape
    fraction = params.target_sparsity if sparsity is None else sparsity
    if row_wise:
        return ~lowest_per_row(score, row_counts(rows, cols, fraction))
    return ~lowest_k(score, prune_count(rows * cols, fraction))
