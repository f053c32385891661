"""`attention_kl_update`: choose, per block, which of q/k/v receive the OBS update (method.md §7,
Eq. 12, and §14.1). With `strategy = "kl"` every candidate is scored on the block's cached
calibration inputs by

    Σ_{q,k,v} ‖(W − W′)X‖²/‖WX‖²  +  ρ · KL(dense attention ‖ pruned attention),

where the attention distributions are recomputed from the query and key tensors captured at the
attention op (after rotary embedding, with the mask, grouped-query heads expanded). Only the
block's prefix up to attention is re-run per candidate, with the candidate's q/k weights passed
functionally (the live block is never written). The plan is consumed by the pruning pass that
follows (`sparsegpt` or `dual_taylor_mask`: any `UpdateVariants` pass), which reuses the pruned
weights computed here."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from d2compiler.contract import (
    Pass,
    PassOrderError,
    PassParams,
    PassResult,
    PlanCost,
    UpdateVariants,
    register_pass,
)

from .attention_capture import AttentionCall, AttentionRecorder, attention_kl
from .gram import Gram
from .pruning import absolute_error, relative_error

QKV = ("q", "k", "v")


class AttentionKLParams(PassParams):
    strategy: Literal["kl", "fixed", "outlier"] = Field(
        default="kl",
        description="`kl`: minimise reconstruction + ρ·KL per block (Eq. 12). `fixed`: leave the `no_update` "
        "projections un-updated in every block (the reference setting: k for OPT, v for LLaMA-2-7B). "
        "`outlier`: leave the projection with the highest outlier ratio (|w| > mean|w|) un-updated (App. D).",
    )
    candidates: Literal["one-off", "all"] = Field(
        default="one-off",
        description="`one-off`: the paper's 3 configurations (exactly one of q/k/v un-updated). `all`: all 8 subsets.",
    )
    rho: float = Field(default=1.0, ge=0.0, le=1e6, description="Weight ρ of the attention KL term.")
    no_update: list[Literal["q", "k", "v"]] = Field(
        default_factory=lambda: ["k"], description="For `fixed`: the projections left without the OBS update."
    )
    selection: Literal["calibration", "holdout"] = Field(
        default="calibration",
        description="`calibration`: score candidates on the calibration samples they were fitted on. `holdout`: "
        "fit the candidates' updates without the last `kl_samples` samples and score reconstruction and KL on those "
        "held-out samples, which measures how each update generalises; the chosen plan is then applied with all samples.",
    )
    kl_samples: int = Field(
        default=8, ge=0, le=100000,
        description="Calibration samples used for the KL term and for `block_output` scoring (the first ones, or "
        "the last ones with `holdout`; 0 = all). Reconstruction errors always use all samples (through the Hessian).",
    )
    objective: Literal["normalised", "eq12"] = Field(
        default="normalised",
        description="With `scoring = \"attention\"`: `normalised` (ours): Σ_{q,k,v} ‖(W−W′)X‖²/‖WX‖² + ρ·KL(dense ‖ "
        "pruned), each error relative to its projection's output, the KL from the dense distribution. `eq12`: the "
        "paper's Eq. 12 exactly as written: Σ_{q,k,v} ‖WX − W′X‖² (absolute, summed over the scored tokens) + "
        "ρ·KL(pruned ‖ dense).",
    )
    scoring: Literal["attention", "block_output"] = Field(
        default="attention",
        description="`attention`: the `objective` above. `block_output`: look past the attention: each candidate's "
        "relative error of the whole block's output, ‖Y′−Y‖²/‖Y‖², with the candidate's q/k/v and the other targeted "
        "linears pruned as the pruning pass will prune them (with their update), on the `kl_samples` scored samples "
        "(held out with `selection = \"holdout\"`).",
    )

    @field_validator("no_update")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("duplicate projection")
        return value


def _label(no_update: tuple[str, ...]) -> str:
    return ",".join(no_update) or "none"


def _qk_updates(no_update: tuple[str, ...]) -> tuple[bool, bool]:
    """Whether q and k receive the OBS update under a candidate: all the attention pattern depends on."""
    return "q" not in no_update, "k" not in no_update


@register_pass
class AttentionKLUpdatePass(Pass):
    name = "attention_kl_update"
    Params = AttentionKLParams
    requires = frozenset({"hessian"})
    optional = frozenset({"layer_sparsity"})  # its candidates are pruned at the allocated sparsity: after an allocation
    provides = frozenset({"update_plan"})
    consumed = frozenset({"update_plan"})
    writes = frozenset({"dense_attention", "holdout_hessian"})
    observes = True
    reads_only = True
    summary = "Choose per block which of q/k/v get the OBS update: reconstruction + ρ·KL(dense‖pruned attention)."

    def __init__(self, params: Any):
        super().__init__(params)
        self._recorder: AttentionRecorder | None = None
        self._handles: list[Any] = []
        self._held: dict[tuple[str, ...], dict[str, Any]] = {}

    def plan_cost(self) -> PlanCost:
        p: AttentionKLParams = self.params  # type: ignore[assignment]
        if p.strategy == "kl" and p.scoring == "block_output":  # every candidate runs the whole block on the scored samples
            count = 3 if p.candidates == "one-off" else 8
            return PlanCost(statistics_copies=2, sample_forwards=(count, p.kl_samples))
        return PlanCost(kl_samples=p.kl_samples if p.strategy == "kl" else None, statistics_copies=2)

    def record_fields(self, blocks: list[dict[str, Any]]) -> dict[str, Any]:
        """`attention_choices`: block -> the projections left without the update."""
        choices = {b["index"]: b["passes"][self.name]["choice"] for b in blocks if self.name in b["passes"]}
        return {"attention_choices": choices} if choices else {}

    def report_figures(self, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The attention KL of the chosen plan per block (when candidates were scored)."""
        infos = [(b["index"], b["passes"][self.name]) for b in blocks if self.name in b.get("passes", {})]
        chosen = [(i, info["candidates"][",".join(info["choice"]) or "none"]) for i, info in infos if info.get("candidates")]
        if self.params.scoring == "block_output":
            points = [[i, row["block_error"]] for i, row in chosen]
            return [{"title": "Block output error of the chosen update plan per block (scored samples)",
                     "ylabel": "‖Y′−Y‖² / ‖Y‖²", "points": points}] if points else []
        direction = "KL(pruned ‖ dense)" if self.params.objective == "eq12" else "KL(dense ‖ pruned)"
        points = [[i, row["kl"]] for i, row in chosen]
        return [{"title": "Attention KL of the chosen update plan per block (scored samples)",
                 "ylabel": f"{direction} [nats]", "points": points}] if points else []

    def check_schedule(self, schedule: list[Pass]) -> None:
        """`strategy = "kl"` scores the candidates with the pruning pass that applies the plan."""
        users = [p for p in schedule[schedule.index(self) + 1 :] if "update_plan" in p.requires | p.optional]
        if self.params.strategy == "kl" and users and not any(isinstance(p, UpdateVariants) for p in users):
            raise PassOrderError(f"attention_kl_update: strategy 'kl' scores candidates with the pruning pass that applies "
                                 f"the plan, and {', '.join(repr(p.name) for p in users)} cannot compute them; use "
                                 "sparsegpt or dual_taylor_mask after it, or strategy 'fixed' or 'outlier'")

    def _holdout_size(self, ctx: Any) -> int:
        n = ctx.total_samples  # over all processes
        m = n if self.params.kl_samples == 0 else min(self.params.kl_samples, n)
        if self.params.selection == "holdout":
            m = min(m, n - 1)  # keep at least one sample to fit on
        return max(m, 0)

    def statistics_read(self, ctx: Any) -> set[str]:
        """The q/k/v statistics (its candidates); every targeted layer's with `scoring = "block_output"`."""
        if self.params.scoring == "block_output":
            return set(ctx.targeted)
        return {layer.name for layer in ctx.layers if layer.role in QKV}

    def begin_observe(self, ctx: Any) -> None:
        p: AttentionKLParams = self.params  # type: ignore[assignment]
        by_output = p.scoring == "block_output"
        if p.strategy != "kl" or not ctx.structure.attention or (p.rho == 0 and not by_output):
            return
        m = self._holdout_size(ctx)
        first_scored = self._first_scored(ctx, m)
        offset = ctx.sample_offset  # forward call i of this process is sample offset + i of the run
        if not by_output:  # the dense attention distributions the KL term compares with
            self._recorder = AttentionRecorder(ctx.structure.attention[0].kind)
            self._recorder.attach(ctx.module, record=lambda i: first_scored <= offset + i < first_scored + m)
        if p.selection == "holdout":
            first_held = first_scored
            self._held = {}
            for layer in ctx.layers:
                if layer.role in QKV:
                    acc = self._held.setdefault(tuple(ctx.structure.group_of(layer.owner)),
                                                {"seen": offset, "gram": Gram(layer.shape[1], ctx.device), "names": []})
                    acc["names"].append(layer.name)
                    if len(acc["names"]) == 1:
                        self._handles.append(layer.module.register_forward_hook(
                            lambda _m, inp, _o, acc=acc, first=first_held: self._add_held(acc, inp[0], first)))

    def _first_scored(self, ctx: Any, m: int) -> int:
        """The run-wide index of the first sample the KL term scores (the last m with `holdout`)."""
        return ctx.total_samples - m if self.params.selection == "holdout" else 0

    @staticmethod
    def _add_held(acc: dict[str, Any], x: torch.Tensor, first_held: int) -> None:
        acc["seen"] += 1
        if acc["seen"] - 1 < first_held:
            return
        acc["gram"].add(x)

    def end_observe(self, ctx: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._recorder is not None:
            self._recorder.detach()
            ctx.publish("dense_attention", ctx.name, self._recorder.calls)
            self._recorder = None
        for acc in self._held.values():
            gram = acc["gram"]
            gram.reduce(ctx)  # every process takes part, with or without held-out samples of its own
            if gram.tokens:
                for name in acc["names"]:
                    ctx.publish("holdout_hessian", name, (gram.mean(), gram.tokens))
        self._held = {}

    def _projections(self, ctx: Any, consumer: Pass | None) -> dict[str, Any]:
        targeted = {layer.name for layer in ctx.targets_of(consumer)} if consumer is not None else None
        found = {}
        for layer in ctx.layers:
            if layer.role in QKV and (targeted is None or layer.name in targeted):
                found[layer.role] = layer
        return found

    def apply(self, ctx: Any) -> PassResult:
        p: AttentionKLParams = self.params  # type: ignore[assignment]
        consumers = [c for c in ctx.consumers("update_plan") if isinstance(c, UpdateVariants)]
        consumer = consumers[0] if consumers else None
        proj = self._projections(ctx, consumer)
        if not proj:
            return PassResult(modified=False, info={"choice": None})
        if p.strategy == "fixed":
            choice, info = tuple(r for r in p.no_update if r in proj), {}
        elif p.strategy == "outlier":
            ratios = {}
            for role, layer in proj.items():
                magnitude = layer.weight_matrix().abs()
                ratios[role] = float((magnitude > magnitude.mean()).float().mean())
            choice, info = (max(ratios, key=ratios.get),), {"outlier_ratio": ratios}
        else:
            choice, info = self._choose_by_kl(ctx, consumer, proj)
        for role, layer in proj.items():
            ctx.publish("update_plan", layer.name, role not in choice)
        return PassResult(modified=False, info={"choice": list(choice), **info})

    def _candidates(self, roles: list[str]) -> list[tuple[str, ...]]:
        if self.params.candidates == "one-off":
            return [(r,) for r in roles]
        return [c for n in range(len(roles) + 1) for c in itertools.combinations(roles, n)]

    def _fitted_variants(self, ctx: Any, consumer: Any, proj: dict[str, Any], holdout: bool):
        """(variant(role, update) -> weight, the Hessian per role that scores reconstruction, and the
        number of tokens behind it)."""
        total_tokens = int(ctx.group.total(sum(inp.args[0].shape[:-1].numel() for inp in ctx.inputs)))
        scoring, fit, tokens = {}, {}, {}
        for role, layer in proj.items():
            full = ctx.artifact("hessian", layer.name).to(ctx.device)
            held = ctx.artifact("holdout_hessian", layer.name) if holdout else None
            if held is None:
                scoring[role], fit[role], tokens[role] = full, None, total_tokens
            else:
                h_b, n_b = held
                h_b = h_b.to(ctx.device)
                scoring[role], fit[role], tokens[role] = h_b, (full * total_tokens - h_b * n_b) / (total_tokens - n_b), n_b

        def tag(role: str) -> str:
            return "all" if fit[role] is None else "fit"

        consumer.prepare_variants(ctx, [(proj[role], update, fit[role], tag(role)) for role in proj for update in (True, False)])

        def variant(role: str, update: bool) -> torch.Tensor:
            return consumer.variant(ctx, proj[role], update, hessian=fit[role], tag=tag(role))[0]

        return variant, scoring, tokens

    def _choose_by_kl(self, ctx: Any, consumer: Any, proj: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
        p: AttentionKLParams = self.params  # type: ignore[assignment]
        m = self._holdout_size(ctx)
        holdout = p.selection == "holdout" and m > 0
        variant, scoring, tokens = self._fitted_variants(ctx, consumer, proj, holdout)
        mine = self._scored_indices(ctx, m, holdout)
        candidates = self._candidates(list(proj))
        if p.scoring == "block_output":
            return self._choose_by_block_output(ctx, consumer, proj, variant, candidates, mine, m, holdout)
        recon: dict[tuple[str, bool], torch.Tensor] = {}
        for role, layer in proj.items():
            dense = layer.weight_matrix().to(ctx.device, torch.float32)
            for update in (True, False):
                if p.objective == "eq12":
                    error = absolute_error(dense, variant(role, update), scoring[role]) * tokens[role]
                else:
                    error = relative_error(dense, variant(role, update), scoring[role])
                recon[(role, update)] = torch.zeros((), device=ctx.device) if error is None else error
        dense_calls: list[AttentionCall] = ctx.artifact("dense_attention", ctx.name) or []
        first = self._first_scored(ctx, m) if holdout else 0
        samples = list(zip([ctx.inputs[i] for i in mine], dense_calls))  # this process's scored samples
        keys = sorted({_qk_updates(cand) for cand in candidates}, reverse=True)
        scored = m > 0 and p.rho > 0 and bool(ctx.structure.attention)  # the same answer on every process
        kls = self._attention_kls(ctx, proj, variant, keys, samples) if samples and scored else {key: [] for key in keys}
        # one host sync for every number the choice needs; sums in Python floats, in the one-process order
        recon_keys = list(recon)
        flat = [recon[k] for k in recon_keys] + [t.to(ctx.device) for k in keys for t in kls[k]]
        numbers = torch.stack(flat).tolist()
        recon_of = dict(zip(recon_keys, numbers))
        kl_of, at = {}, len(recon_keys)
        for key in keys if scored else []:
            kl_of[key] = sum(self._all_samples(ctx, numbers[at : at + len(kls[key])], [i + ctx.sample_offset - first for i in mine], m)) / m
            at += len(kls[key])
        table = {}
        for cand in candidates:
            r = sum(recon_of[(role, role not in cand)] for role in proj)
            kl = kl_of.get(_qk_updates(cand), 0.0)
            table[_label(cand)] = {"recon": r, "kl": kl, "objective": r + p.rho * kl}
        best = min(table, key=lambda c: table[c]["objective"])
        info = {"candidates": table, "kl_samples": m if scored else 0, "selection": "holdout" if holdout else "calibration"}
        return (tuple() if best == "none" else tuple(best.split(","))), info

    def _scored_indices(self, ctx: Any, m: int, holdout: bool) -> list[int]:
        """This process's indices (into `ctx.inputs`) of the m scored samples."""
        first = self._first_scored(ctx, m) if holdout else 0
        return [g - ctx.sample_offset for g in range(first, first + m) if 0 <= g - ctx.sample_offset < len(ctx.inputs)]

    @torch.no_grad()
    def _choose_by_block_output(self, ctx: Any, consumer: Any, proj: dict[str, Any], variant: Any,
                                candidates: list[tuple[str, ...]], mine: list[int], m: int,
                                holdout: bool) -> tuple[tuple[str, ...], dict[str, Any]]:
        """The candidate with the least relative block-output error ‖Y′−Y‖²/‖Y‖² on the scored samples
        (`mine`: this process's). Y′: the block with the candidate's q/k/v and every other targeted
        linear of the consumer pruned with the update (cached, so the pruning pass reuses it)."""
        others = [layer for layer in ctx.targets_of(consumer) if layer.role not in proj]
        consumer.prepare_variants(ctx, [(layer, True, None, "all") for layer in others])
        base: dict[str, torch.Tensor] = {}
        for layer in others:
            layer.stand_in(base, consumer.variant(ctx, layer, True)[0])
        rows = []
        for cand in candidates:
            weights = dict(base)
            for role, layer in proj.items():
                layer.stand_in(weights, variant(role, role not in cand))
            rows.append(ctx.output_error_sums(mine, weights))
        sums = ctx.reduce(torch.stack(rows))
        errors = (sums[:, 0] / sums[:, 1].clamp_min(1e-30)).tolist()
        table = {_label(cand): {"block_error": err, "objective": err} for cand, err in zip(candidates, errors)}
        best = min(table, key=lambda c: table[c]["objective"])
        info = {"candidates": table, "kl_samples": m, "selection": "holdout" if holdout else "calibration", "scoring": "block_output"}
        return (tuple() if best == "none" else tuple(best.split(","))), info

    @staticmethod
    def _all_samples(ctx: Any, values: list[float], slots: list[int], m: int) -> list[float]:
        """Every process's per-sample `values` in the run's sample order (they sit at `slots` of m),
        so that every process sums them in the one-process order."""
        if ctx.group.size == 1:
            return values
        everything = torch.zeros(m, dtype=torch.float64)
        everything[slots] = torch.tensor(values, dtype=torch.float64)
        return ctx.reduce(everything).tolist()

    @torch.no_grad()
    def _attention_kls(self, ctx: Any, proj: dict[str, Any], variant: Any, keys: list[tuple[bool, bool]],
                       samples: list[tuple[Any, AttentionCall]]) -> dict[tuple[bool, bool], list[torch.Tensor]]:
        """The attention KL of each of `samples` (0-dim tensors) for each (q updated, k updated) key. With fused attention
        the query and key of a candidate come from separate projections, so two prefix runs (all
        updated, none updated) serve every candidate; eager attention runs one prefix per key."""
        fused = ctx.structure.attention[0].kind == "sdpa"
        runs = {(q, q) for q, _ in keys} | {(k, k) for _, k in keys} if fused else set(keys)
        captured = {run: self._prefix_calls(ctx, proj, variant, run, samples) for run in runs}
        per_sample: dict[tuple[bool, bool], list[torch.Tensor]] = {key: [] for key in keys}
        for i, (_inp, dense) in enumerate(samples):
            dense_lp = dense.log_probs()
            for q_upd, k_upd in keys:
                if fused:
                    call = captured[(q_upd, q_upd)][i].with_key_of(captured[(k_upd, k_upd)][i])
                else:
                    call = captured[(q_upd, k_upd)][i]
                per_sample[(q_upd, k_upd)].append(attention_kl(dense_lp, call, reverse=self.params.objective == "eq12"))
        return per_sample

    def _prefix_calls(self, ctx: Any, proj: dict[str, Any], variant: Any, updates: tuple[bool, bool],
                      samples: list[tuple[Any, AttentionCall]]) -> list[AttentionCall]:
        """The attention captures of `samples` with q and k replaced by their pruned variants, passed
        to the block functionally (the live block is never written)."""
        weights: dict[str, torch.Tensor] = {}
        for role, update in zip(("q", "k"), updates):
            if role in proj:
                proj[role].stand_in(weights, variant(role, update))
        recorder = AttentionRecorder(ctx.structure.attention[0].kind)
        return [recorder.run_prefix(ctx.module, inp.args, inp.kwargs, weights) for inp, _dense in samples]
