"""`sparsity_allocation`: non-uniform (layer-wise) sparsity for the pruning pass that follows it.

Before the first block is pruned, the executor's survey runs every targeted block of the *dense*
model over the first `survey_samples` calibration inputs. From it each block b gets a score, and the block sparsities
s_b lie in [S−λ, S+λ] around the pruning pass's `sparsity` S:

- `owl` (Yin et al. 2024; parameter names as in llm-compressor): the block's outlier ratio, the
  share of its Wanda scores |W_ij|·‖x_j‖ above `owl_m` × their mean over the block; more outliers,
  lower sparsity;
- `error` (ours): the block's relative output error ‖Y′−Y‖²/‖Y‖² when all its targeted linears
  are Wanda-pruned at S (weights passed functionally,
  `BlockContext.output_error_sums`); larger error, lower sparsity (the log error is scaled, see `allocation`).

Every layer of a block gets the block's sparsity, except Mixture-of-Experts experts with
`expert_lmbda` > 0: the experts of one role in a block are spread in [s_b−λₓ, s_b+λₓ] by the tokens
the router sent each of them in the survey, the most used pruned least (`allocation.expert_sparsities`;
with `experts.calibration = "all"` every expert sees every token, so they stay at s_b). Then per-layer
prune counts are made exact: the pruned total over the targeted layers is round(S · their weights)
(`allocation.exact_counts`).
N:M patterns fix every layer at N/M, so the pass refuses them."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from d2compiler.contract import (
    Pass,
    PassError,
    PassOrderError,
    PassParams,
    PassResult,
    PlanCost,
    register_pass,
)

from .allocation import error_block_sparsities, exact_counts, expert_sparsities, owl_block_sparsities
from .masks import lowest_per_row, row_counts


class SparsityAllocationParams(PassParams):
    profile: Literal["owl", "error"] = Field(
        default="owl",
        description="`owl`: outlier-weighted layer-wise sparsity (the OWL paper, as llm-compressor's "
        "`sparsity_profile = \"owl\"`). `error`: each block's output error under a trial Wanda pruning at the "
        "target sparsity, measured on calibration data; the most damaged blocks are pruned least.",
    )
    owl_m: float = Field(default=5.0, gt=0.0, le=1e6, description="OWL's M: a weight is an outlier when its Wanda "
                         "score exceeds M times the mean score of its block (`owl` only).")
    owl_lmbda: float = Field(default=0.08, ge=0.0, lt=1.0, description="λ: block sparsities lie in [S−λ, S+λ] around the "
                             "pruning pass's sparsity S (both profiles; the name is llm-compressor's).")
    expert_lmbda: float = Field(default=0.0, ge=0.0, lt=1.0, description="λₓ: the routed experts of one role in a "
                                "block get sparsities in [s−λₓ, s+λₓ] around their block's s, by the tokens routed to each in "
                                "the survey (the most used expert pruned least). 0: every expert at its block's sparsity.")
    survey_samples: int = Field(default=8, ge=1, le=100000, description="Calibration samples (the first ones) the "
                                "survey runs the dense blocks on: the activation norms of `owl` and the trial output errors "
                                "of `error` come from them.")


def _add_squares(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += Σ over tokens of x_j² (float64); returns None, so the hooked layer's output stays its own."""
    acc.add_(x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0))


def _add_rows(count: torch.Tensor, x: torch.Tensor) -> None:
    """count += the tokens (rows) of x; returns None, so the hooked layer's output stays its own."""
    count.add_(x.numel() // x.shape[-1])


@register_pass
class SparsityAllocationPass(Pass):
    name = "sparsity_allocation"
    Params = SparsityAllocationParams
    provides = frozenset({"layer_sparsity"})
    consumed = frozenset({"layer_sparsity"})
    surveys = True
    reads_only = True
    summary = "Layer-wise sparsity (OWL outlier ratios, or each block's trial output error) for the next pruning pass."

    def __init__(self, params: Any):
        super().__init__(params)
        self._handles: list[Any] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._scores: dict[int, float] = {}
        self._sizes: dict[int, dict[str, int]] = {}
        self._routed: dict[int, dict[str, tuple[str, tuple[int, int], torch.Tensor]]] = {}  # block -> expert -> (role, shape, tokens)
        self._allocation: dict[str, float] = {}
        self._block_sparsity: dict[int, float] = {}
        self._target = 0.0

    def _pruners(self, schedule: list[Pass]) -> list[Pass]:
        """The later passes that prune at a sparsity and take the allocation."""
        later = schedule[schedule.index(self) + 1 :]
        return [p for p in later if "layer_sparsity" in p.requires | p.optional and hasattr(p.params, "target_sparsity")]

    def _consumer(self, schedule: list[Pass]) -> Pass:
        return self._pruners(schedule)[0]

    def check_schedule(self, schedule: list[Pass]) -> None:
        """The pruning passes that follow are unstructured, at one sparsity S, with S ± λ in [0, 1)."""
        users = self._pruners(schedule)
        if not users:
            raise PassOrderError("sparsity_allocation: no pruning pass after it takes the allocation; add magnitude, "
                                 "wanda, sparsegpt or dual_taylor_mask after it")
        between = schedule[schedule.index(self) + 1 : schedule.index(users[0])]
        rivals = [p.name for p in between if "layer_sparsity" in p.provides]
        if rivals:
            raise PassOrderError(f"sparsity_allocation: {rivals[0]} after it allocates the sparsities of {users[0].name} "
                                 "again and would silently replace this allocation; keep one allocation per pruning pass")
        structured = [p.name for p in users if getattr(p.params, "n_of_m", None) is not None]
        if structured:
            raise PassOrderError(f"sparsity_allocation: {', '.join(structured)} uses an N:M pattern, which fixes every "
                                 "layer's sparsity at N/M; a layer-wise allocation cannot apply (drop sparsity_allocation, "
                                 "or use mask_structure = 'unstructured')")
        levels = {round(p.params.target_sparsity, 12) for p in users}
        if len(levels) > 1:
            raise PassOrderError(f"sparsity_allocation: the pruning passes after it prune at different sparsities "
                                 f"({', '.join(str(s) for s in sorted(levels))}); one allocation needs one target")
        target, lmbda = levels.pop(), self.params.owl_lmbda + self.params.expert_lmbda
        if target - lmbda < 0 or target + lmbda >= 1:
            raise PassOrderError(f"sparsity_allocation: owl_lmbda + expert_lmbda = {lmbda} puts sparsities outside [0, 1) "
                                 f"around the target {target}; use owl_lmbda + expert_lmbda <= {min(target, 1 - target):.4g}")

    def plan_cost(self) -> PlanCost:
        """The survey: one dense forward per block over `survey_samples` (`error`: and the trial)."""
        return PlanCost(sample_forwards=(1 if self.params.profile == "owl" else 2, self.params.survey_samples))

    def survey_samples(self) -> int:
        return self.params.survey_samples

    # --- survey -----------------------------------------------------------------------------

    def begin_survey(self, ctx: Any) -> None:
        layers = ctx.targets_of(self._consumer(ctx.schedule))
        self._target = self._consumer(ctx.schedule).params.target_sparsity
        self._sums = {}
        self._sizes[ctx.index] = {layer.name: layer.shape[0] * layer.shape[1] for layer in layers}
        for layer in layers:
            total = self._sums[layer.name] = torch.zeros(layer.shape[1], dtype=torch.float64, device=ctx.device)
            self._handles.append(layer.module.register_forward_hook(lambda _m, inp, _o, acc=total: _add_squares(acc, inp[0])))
        routed = {layer.name: (layer.role, layer.shape, torch.zeros((), dtype=torch.int64, device=ctx.device))
                  for layer in layers if layer.routed and self.params.expert_lmbda > 0}
        self._routed[ctx.index] = routed
        for layer in layers:
            if layer.name in routed:
                count = routed[layer.name][2]
                self._handles.append(layer.module.register_forward_hook(lambda _m, inp, _o, n=count: _add_rows(n, inp[0])))

    def end_survey(self, ctx: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        layers = ctx.targets_of(self._consumer(ctx.schedule))
        if not layers:
            return
        norms = {}
        for layer in layers:
            ctx.reduce(self._sums[layer.name])
            norms[layer.name] = self._sums[layer.name].sqrt().float()
        for _role, _shape, count in self._routed.get(ctx.index, {}).values():
            ctx.reduce(count)
        if self.params.profile == "owl":
            score = self._outlier_ratio(layers, norms)
        else:
            score = self._trial_error(ctx, layers, norms)
        self._scores[ctx.index] = float(score)
        self._sums = {}

    def _outlier_ratio(self, layers: list[Any], norms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The share of the block's Wanda scores above owl_m × their mean over the block."""
        scores = [layer.weight_matrix().float().abs() * norms[layer.name].to(layer.module.weight.device).unsqueeze(0)
                  for layer in layers]
        numel = sum(s.numel() for s in scores)
        mean = sum(s.sum(dtype=torch.float64) for s in scores) / numel
        above = sum((s > self.params.owl_m * mean).sum() for s in scores)
        return above.double() / numel

    def _trial_error(self, ctx: Any, layers: list[Any], norms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ‖Y′−Y‖² / Σ‖Y‖² over the surveyed samples, Y′ with every targeted linear Wanda-pruned at
        the target sparsity (stood in functionally; the block is not written)."""
        target = self._target
        weights: dict[str, torch.Tensor] = {}
        for layer in layers:
            w = layer.weight_matrix().float()
            score = w.abs() * norms[layer.name].to(w.device).unsqueeze(0)
            layer.stand_in(weights, w.masked_fill(lowest_per_row(score, row_counts(*w.shape, target)), 0.0))
        sums = ctx.reduce(ctx.output_error_sums(list(range(len(ctx.inputs))), weights))
        return sums[0] / sums[1].clamp_min(1e-30)

    def finish_survey(self) -> None:
        """Block sparsities from the scores, then exact per-layer counts over all targeted layers."""
        if not self._scores:
            return
        blocks = sorted(self._scores)
        consumer_sparsity = self._target
        spread = owl_block_sparsities if self.params.profile == "owl" else error_block_sparsities
        per_block = dict(zip(blocks, spread([self._scores[b] for b in blocks], consumer_sparsity, self.params.owl_lmbda)))
        names = [(b, name) for b in blocks for name in self._sizes[b]]
        sizes = [self._sizes[b][name] for b, name in names]
        targets = {name: per_block[b] for b, name in names}
        for b in blocks:
            targets.update(self._spread_experts(b, per_block[b]))
        reach = self.params.owl_lmbda + self.params.expert_lmbda
        counts = exact_counts(sizes, [targets[name] for _b, name in names], consumer_sparsity,
                              consumer_sparsity - reach, consumer_sparsity + reach)
        self._allocation = {name: count / size for (_b, name), count, size in zip(names, counts, sizes)}
        pruned: dict[int, list[int]] = {b: [0, 0] for b in blocks}
        for (b, _name), count, size in zip(names, counts, sizes):
            pruned[b][0] += count
            pruned[b][1] += size
        self._block_sparsity = {b: count / size for b, (count, size) in pruned.items()}  # as applied, after exact rounding

    def _spread_experts(self, block: int, sparsity: float) -> dict[str, float]:
        """The sparsity of each routed expert of `block` (`expert_lmbda`), by role and shape."""
        groups: dict[tuple[str, tuple[int, int]], list[tuple[str, int]]] = {}
        for name, (role, shape, count) in self._routed.get(block, {}).items():
            groups.setdefault((role, shape), []).append((name, int(count)))
        out = {}
        for members in groups.values():
            spread = expert_sparsities([tokens for _n, tokens in members], sparsity, self.params.expert_lmbda)
            out.update({name: value for (name, _t), value in zip(members, spread)})
        return out

    # --- pruning ------------------------------------------------------------------------------

    def apply(self, ctx: Any) -> PassResult:
        result = PassResult(modified=False)
        for layer in ctx.targets_of(self._consumer(ctx.schedule)):
            if layer.name not in self._allocation:
                raise PassError(f"sparsity_allocation: {layer.name} was not seen by the survey (block {ctx.index})")
            value = self._allocation[layer.name]
            ctx.publish("layer_sparsity", layer.name, value)
            result.layers[layer.name] = {"allocated_sparsity": value}
        if ctx.index in self._block_sparsity:
            result.info = {"block_sparsity": self._block_sparsity[ctx.index], "score": self._scores[ctx.index],
                           "profile": self.params.profile}
        return result

    def record_fields(self, blocks: list[dict[str, Any]]) -> dict[str, Any]:
        """`sparsity_allocation`: the profile and, per block, the score and the allocated sparsity."""
        infos = {b["index"]: b["passes"][self.name] for b in blocks if b["passes"].get(self.name, {}).get("profile")}
        if not infos:
            return {}
        return {"sparsity_allocation": {"profile": self.params.profile, "owl_m": self.params.owl_m,
                                        "owl_lmbda": self.params.owl_lmbda, "expert_lmbda": self.params.expert_lmbda,
                                        "blocks": {i: {"sparsity": info["block_sparsity"], "score": info["score"]}
                                                   for i, info in sorted(infos.items())}}}

    def report_figures(self, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The allocated sparsity per block."""
        points = [[b["index"], b["passes"][self.name]["block_sparsity"]] for b in blocks
                  if b["passes"].get(self.name, {}).get("profile")]
        return [{"title": f"Allocated sparsity per block ({self.params.profile} profile)", "ylabel": "sparsity",
                 "points": points}] if points else []
