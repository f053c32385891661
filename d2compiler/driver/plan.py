"""`d2c plan`: what a recipe will do, without pruning anything.

It validates the recipe, loads the model, traces each distinct block once on a dummy input, and
reports the pass schedule, which linears each pass touches in every block (identical consecutive
blocks are merged into ranges) and an estimate of peak memory and time.

The estimates are a cost model, not a measurement of the run: time = FLOPs / the matmul rate
measured here on the compute device (a fraction of a second) + a per-column overhead of the OBS
loop (also measured), for two block forwards (dense observe, pruned re-forward), the statistics,
the masks/updates and the attention-KL candidates. Memory = the process before loading + the
model's parameters + the calibration hidden states (block inputs, outputs, dense outputs) + the
largest block's working set (Hessians, OBS buffers, attention captures). `bench/cost.py` compares
the estimate with a measured run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from d2compiler.evaluation.model_kind import dummy_input, takes_images
from d2compiler.execution.block_io import capture_block_inputs
from d2compiler.execution.executor import BlockExecutor
from d2compiler.execution.expert_groups import GroupPlan, layer_grouping, statistics_bytes
from d2compiler.execution.memory import current_rss_mb
from d2compiler.graph.coverage import Coverage
from d2compiler.graph.layers import LinearLayer
from d2compiler.loading.dtypes import dtype_name, resolve_device
from d2compiler.loading.models import load_model, load_streamed
from d2compiler.recipe.pass_base import Pass
from d2compiler.recipe.passmanager import PassManager

log = logging.getLogger(__name__)


@dataclass
class BlockPlan:
    first: int
    last: int
    touches: list[tuple[str, list[str]]]  # (pass name, ["self_attn.q_proj (q)", ...])
    stack: str = ""  # the stack's path when the recipe names several (`model.blocks`)


@dataclass
class Plan:
    model: str
    blocks_path: str
    num_blocks: int
    schedule: list[Pass]
    blocks: list[BlockPlan]
    tokens: int
    estimate_s: dict[str, float] = field(default_factory=dict)
    estimate_mb: dict[str, float] = field(default_factory=dict)
    estimate_disk_mb: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    costs: list[BlockCost] = field(default_factory=list)
    projections: dict[int, dict[str, float]] = field(default_factory=dict)
    link_gbs: float = 0.0
    dtypes: str = ""  # what the run computes in and stores
    coverage: Coverage | None = None
    allow_untargeted: bool = False
    experts: str = ""  # how the first block with experts splits them (`GroupPlan.describe`)

    def project(self, nproc: int, link_gbs: float) -> dict[str, float]:
        """The time projected for `nproc` processes (kept for `render`)."""
        self.link_gbs = link_gbs
        self.projections[nproc] = project(self.costs, nproc, link_gbs)
        return self.projections[nproc]

    def render(self) -> str:
        lines = [f"model: {self.model} ({self.blocks_path} x {self.num_blocks})", f"dtype: {self.dtypes}",
                 f"calibration: {self.tokens} tokens"]
        if self.coverage is not None:
            lines += self.coverage.lines()
            problem = self.coverage.refusal()
            if problem:
                lines.append(("warning (model.allow_untargeted): " if self.allow_untargeted else "the run will refuse: ") + problem)
        if self.experts:
            lines.append(f"experts: {self.experts}")
        lines += ["", "pass schedule:"]
        for i, p in enumerate(self.schedule, 1):
            req = ", ".join(sorted(p.requires)) or "-"
            prov = ", ".join(sorted(p.provides)) or "-"
            lines.append(f"  {i}. {p.name:<22} requires {req}; provides {prov}")
        lines += ["", "per block (which linears each pass touches):"]
        for b in self.blocks:
            span = (f"{b.stack} " if b.stack else "") + (f"block {b.first}" if b.first == b.last else f"blocks {b.first}-{b.last}")
            lines.append(f"  {span}:")
            if not b.touches:
                lines.append("    (not run: after the last targeted block)")
            for name, layers in b.touches:
                lines.append(f"    {name:<22} {', '.join(layers) if layers else '(statistics or plan for the layers the others target)'}")
        lines += ["", "estimate (a cost model: FLOPs at the matmul rate measured here, not a measured run):"]
        for k, v in self.estimate_s.items():
            lines.append(f"  time   {k:<56} {v:9.1f} s")
        for k, v in self.estimate_mb.items():
            lines.append(f"  memory {k:<56} {v:9.0f} MiB")
        for k, v in self.estimate_disk_mb.items():
            lines.append(f"  disk   {k:<56} {v:9.0f} MiB")
        obs = f", OBS loop {self.rates['column_us']:.0f} µs/column" if "column_us" in self.rates else ""
        lines.append(f"  measured here: matmul {self.rates['gflops']:.1f} GFLOP/s{obs}")
        for nproc, parts in self.projections.items():
            lines += ["", f"projection for {nproc} processes (a projection, not a measurement: the same device rates in "
                      f"every process, {self.link_gbs:g} GB/s between them; docs/distributed.md gives the formula):"]
            lines += [f"  time   {k:<56} {v:9.1f} s" for k, v in parts.items()]
        return "\n".join(lines)


def _measure_rates(device: torch.device, hidden: int, schedule: list[Pass]) -> dict[str, float]:
    """Matmul throughput on `device`, and the rates the scheduled passes measure (`Pass.measure_rates`)."""
    a = torch.randn(512, hidden, device=device)
    b = torch.randn(hidden, hidden, device=device)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    rates = {"gflops": 2 * 512 * hidden * hidden * reps / (time.perf_counter() - start) / 1e9}
    for p in schedule:
        rates.update(p.measure_rates(device))
    return rates


def _label(layer: LinearLayer) -> str:
    return f"{layer.local_name} ({layer.role})"


def dtype_line(requested: str, device: torch.device, model: torch.nn.Module, storage: torch.dtype | None) -> str:
    """What the run computes in and stores, and why (model.dtype = auto on the CPU computes a
    half-precision checkpoint in float32). The plan loads on the CPU; a CUDA run computes in the
    checkpoint's own dtype."""
    loaded = next(model.parameters()).dtype
    if storage is None:
        return f"{dtype_name(loaded)} (computed and stored; model.dtype = {requested})"
    if device.type == "cuda":
        return f"{dtype_name(storage)} (computed and stored: the checkpoint's own dtype on CUDA; model.dtype = auto)"
    return (f"computed in {dtype_name(loaded)}, stored in the checkpoint's {dtype_name(storage)} (model.dtype = auto on the CPU: "
            f"{dtype_name(storage)} matmuls are several times slower than float32 on CPUs)")


@dataclass
class StackPlan:
    """What tracing found in one stack of blocks: its executor, layers per block, what each pass
    targets, the last targeted block and the linears that share statistics."""

    executor: BlockExecutor
    per_block: list[list[LinearLayer]]
    targets: dict[int, set[str]]
    last: int
    groups: list[set[tuple[str, ...]]]
    hidden: int
    seq_of_image: int | None
    groupings: list[GroupPlan]  # per block up to `last`: how its experts are split (`expert_groups`)


def _stack_plan(model: torch.nn.Module, manager: PassManager, recipe: BaseModel, streamed: Any, stack: int,
                device: torch.device) -> StackPlan:
    m = recipe.model
    executor = BlockExecutor(model, manager.schedule, device=torch.device("cpu"), role_overrides=m.roles, quiet=True,
                             streamed=streamed, stacks=m.blocks, stack=stack, experts_load=recipe.experts.load)
    sample = capture_block_inputs(model, executor.blocks, [dummy_input(model)], torch.device("cpu"))[0]
    per_block = [executor.layers_of(i, executor.structure(i, sample)) for i in range(len(executor.blocks))]
    all_layers = [layer for layers in per_block for layer in layers]
    targets = executor.targeted_names(all_layers)
    executor.check_targets_match(targets, all_layers)
    targeted = set().union(*targets.values()) if targets else set()
    last = max((i for i, layers in enumerate(per_block) if any(la.name in targeted for la in layers)), default=-1)
    groups = [{tuple(executor.structure(i, sample).group_of(la.owner)) for la in layers if la.name in targeted}
              for i, layers in enumerate(per_block[: last + 1])]
    weights = model.dtype.itemsize if executor.by_group else 0  # experts read by group: their weights count too
    groupings = [layer_grouping([la for la in layers if la.name in targeted], executor.structure(i, sample).group_of,
                                manager.schedule, recipe.experts.group_size, device, weight_bytes=weights)
                 for i, layers in enumerate(per_block[: last + 1])]
    return StackPlan(executor, per_block, targets, last, groups, sample.args[0].shape[-1],
                     sample.args[0].shape[-2] if takes_images(model) else None, groupings)


def _block_plans(part: StackPlan, schedule: list[Pass], label: str) -> list[BlockPlan]:
    """Which linears each pass touches in each block of one stack (identical neighbours merged)."""
    targeted = set().union(*part.targets.values()) if part.targets else set()
    blocks: list[BlockPlan] = []
    for i, layers in enumerate(part.per_block):
        touches = []
        if i <= part.last:
            for pos, p in enumerate(schedule):
                names = part.targets.get(pos)
                chosen = [la for la in layers if (names is None and la.name in targeted) or (names is not None and la.name in names)]
                touches.append((p.name, [_label(la) for la in chosen] if names is not None else []))
        if blocks and blocks[-1].touches == touches and blocks[-1].last == i - 1:
            blocks[-1].last = i
        else:
            blocks.append(BlockPlan(i, i, touches, label))
    return blocks


def make_plan(recipe: BaseModel) -> Plan:
    """Plan `recipe` (see the module docstring): every stack `model.blocks` names, in order. Loads the
    model; prunes nothing."""
    baseline_mb = current_rss_mb()
    device = resolve_device(recipe.model.device)
    manager = PassManager(list(recipe.passes))
    m = recipe.model
    streamed = None
    if m.streaming:
        loaded, streamed = load_streamed(m.source, m.dtype, "cpu", m.attn_implementation, m.revision)
    else:
        loaded = load_model(m.source, m.dtype, "cpu", m.revision, m.attn_implementation)
    model = loaded.model
    parts = [_stack_plan(model, manager, recipe, streamed, stack, device) for stack in range(max(len(m.blocks or []), 1))]
    several = len(parts) > 1
    blocks = [b for part in parts for b in _block_plans(part, manager.schedule, part.executor.blocks_path if several else "")]
    cal, first = recipe.data.calibration, parts[0]
    seq = first.seq_of_image or cal.seq_len  # an image is its patch tokens
    tokens = cal.samples * seq
    rates = _measure_rates(device, first.hidden, manager.schedule)
    coverages = [part.executor.coverage(part.targets, [la for layers in part.per_block for la in layers]) for part in parts]
    plan = Plan(m.source, ", ".join(p.executor.blocks_path for p in parts), sum(len(p.per_block) for p in parts),
                manager.schedule, blocks, tokens, rates=rates, dtypes=dtype_line(m.dtype, device, model, loaded.storage_dtype),
                coverage=Coverage.combine(coverages) if several else coverages[0], allow_untargeted=m.allow_untargeted)
    targeted = set().union(*(names for part in parts for names in part.targets.values()))
    _estimate(plan, [layers for p in parts for layers in p.per_block[: p.last + 1]], [g for p in parts for g in p.groups],
              targeted, seq, model, first.hidden, baseline_mb, [g for p in parts for g in p.groupings], first.executor.by_group)
    _estimate_storage(plan, model, [b for p in parts for b in p.executor.blocks],
                      [b for p in parts for b in p.executor.blocks[: max(p.last, 0)]], first.hidden, streaming=streamed is not None,
                      group=(max((g.size for p in parts for g in p.groupings if g.experts), default=0) or None)
                      if first.executor.by_group else None)  # experts read by group (a model with banks)
    return plan


def _estimate_storage(plan: Plan, model: torch.nn.Module, block_modules: list[torch.nn.Module],
                      checkpointed: list[torch.nn.Module], hidden: int, *, streaming: bool, group: int | None = None) -> None:
    """Memory for the weights (all of them, or in a streaming run those outside the blocks plus two
    blocks: the one being pruned and the one being written; with experts read by `group`, two
    blocks without their expert banks, one group of experts, and the experts' recorded inputs and
    summed outputs), and the disk the output and the checkpoints need (hidden states: the latest
    set, and the next one while it is written)."""
    def size_mb(params: Any) -> float:
        return sum(p.numel() * p.element_size() for p in params) / 2**20

    blocks = [size_mb(b.parameters()) for b in block_modules]
    total = size_mb(model.parameters())
    hidden_mb = 2 * plan.tokens * hidden * 4 / 2**20
    if streaming:
        del plan.estimate_mb["model parameters"], plan.estimate_mb["checkpoint pages read while loading"]
        plan.estimate_mb["parameters outside the blocks"] = total - sum(blocks)
        if group is None:
            plan.estimate_mb["two blocks' parameters (pruned, being written)"] = 2 * max(blocks)
        else:  # experts.load = "group"
            banks = [[p for p in b.parameters() if p.dim() == 3] for b in block_modules]
            plan.estimate_mb["two blocks' parameters outside their expert banks"] = 2 * max(
                size - size_mb(bank) for size, bank in zip(blocks, banks))
            plan.estimate_mb[f"one group of {group} experts (experts read by group)"] = max(
                group * size_mb(bank) / bank[0].shape[0] if bank else 0.0 for bank in banks)
            plan.estimate_mb["the experts' recorded inputs and summed outputs"] = 2 * plan.tokens * hidden * 4 / 2**20
        parts = {k: v for k, v in plan.estimate_mb.items() if k != "peak (sum)"}
        plan.estimate_mb = {**parts, "peak (sum)": sum(parts.values())}
    checkpoint_blocks = sum(blocks) if streaming else sum(size_mb(b.parameters()) for b in checkpointed)
    plan.estimate_disk_mb = {"output folder (weights)": total,
                             "checkpoints: finished blocks" + (" (hard-linked into the output)" if streaming else ""): checkpoint_blocks,
                             "checkpoints: hidden states": hidden_mb}
    plan.estimate_disk_mb["peak (sum)"] = total + hidden_mb + (0 if streaming else checkpoint_blocks)


@dataclass
class BlockCost:
    """One block's work in the cost model, split by how several processes share it (`project`)."""

    forward_s: float = 0.0  # the two block forwards (observe, re-forward): data-parallel
    stats_s: float = 0.0  # Gram products of the statistics: data-parallel
    solves_s: list[float] = field(default_factory=list)  # one OBS solve per targeted layer: layer-parallel
    kl_forward_s: float = 0.0  # attention-KL candidates' prefix runs and KL: data-parallel
    kl_solves_s: list[float] = field(default_factory=list)  # the candidates' pruned variants: spread like the solves
    reduce_bytes: int = 0  # statistics summed over the processes (all-reduce, float64)
    broadcast_bytes: int = 0  # each solved layer's weight and mask, sent by the process that solved it


def block_cost(shapes: list[tuple[str, int, int]], groups: list[int], *, tokens: int, seq: int, hidden: int, heads: int,
               rates: dict[str, float], obs: bool, kl_samples: int | None, forward_params: int | None = None) -> BlockCost:
    """The cost of one block from its targeted linears' (role, out, in) `shapes`, the input widths of
    its statistics accumulators (`groups`), the calibration token count and the device `rates`
    (`gflops`: float32 matmuls; `forward_gflops`, default the same: the block forwards in the working
    dtype; `column_us`: the OBS loop's overhead per column). `kl_samples`: the calibration samples over
    which a pass scores attention candidates by KL (0: all; None: no such pass). `forward_params`: the parameters of all the block's linears, which the
    forwards run (default: those of `shapes`)."""
    flop_s = rates["gflops"] * 1e9  # float32: statistics and solves
    forward_flop_s = rates.get("forward_gflops", rates["gflops"]) * 1e9  # the working dtype's matmuls
    linear_params = sum(o * i for _r, o, i in shapes) if forward_params is None else forward_params
    attn = 4 * tokens * seq * hidden  # QKᵀ and AV over all calibration tokens
    cost = BlockCost(forward_s=2 * (2 * linear_params * tokens + attn) / forward_flop_s,
                     stats_s=sum(2 * tokens * i * i for i in groups) / flop_s,
                     reduce_bytes=sum(8 * i * i for i in groups))  # the float64 sums of passes/gram.py
    if obs:
        cost.solves_s = [(2 * i**3 + 3 * o * i * i) / flop_s + i * rates["column_us"] / 1e6 for _r, o, i in shapes]
    cost.broadcast_bytes = sum(5 * o * i for _r, o, i in shapes)  # fp32 weight + bool mask
    if kl_samples is not None:
        count = tokens // seq
        samples = count if kl_samples == 0 else min(kl_samples, count)
        qkv = sum(o * i for r, o, i in shapes if r in ("q", "k", "v"))
        cost.kl_forward_s = samples * (2 * 2 * qkv * seq + 3 * (2 * seq * seq * hidden + 10 * heads * seq * seq)) / forward_flop_s
        cost.kl_solves_s = [i * rates.get("column_us", 0.0) / 1e6 for r, _o, i in shapes if r in ("q", "k", "v") for _update in (0, 1)]
    return cost


def project(costs: list[BlockCost], nproc: int, link_gbs: float) -> dict[str, float]:
    """Seconds for `nproc` processes (see docs/distributed.md for the formula): the data-parallel work
    divided by N, per block the largest share of the layers' solves and of the KL candidates' solves
    when they are spread by cost, and the all-reduce (ring: 2(N-1)/N x bytes) and broadcasts at
    `link_gbs` GB/s."""
    from d2compiler.execution.distributed import Group

    def largest_share(work: list[float]) -> float:
        owners = Group(size=nproc).owners(work)
        return max([sum(s for s, o in zip(work, owners) if o == r) for r in range(nproc)], default=0.0)

    link = link_gbs * 1e9
    out = {"data-parallel forwards and statistics": sum(c.forward_s + c.stats_s + c.kl_forward_s for c in costs) / nproc,
           "layer solves (largest share per block)": sum(largest_share(c.solves_s) for c in costs),
           "attention-KL candidate solves (largest share per block)": sum(largest_share(c.kl_solves_s) for c in costs),
           "communication": sum(2 * (nproc - 1) / nproc * c.reduce_bytes + (nproc > 1) * c.broadcast_bytes for c in costs) / link}
    out["total"] = sum(out.values())
    return out


def _estimate(plan: Plan, blocks: list[list[LinearLayer]], block_groups: list[set[tuple[str, ...]]], targeted: set[str],
              seq: int, model: torch.nn.Module, hidden: int, baseline_mb: float, groupings: list[GroupPlan],
              by_group: bool = False) -> None:
    tokens = plan.tokens
    costs = [p.plan_cost() for p in plan.schedule]
    solves = any(c.solves for c in costs)
    kl_samples = next((c.kl_samples for c in costs if c.kl_samples is not None), None)
    copies = max(c.statistics_copies for c in costs)
    heads = getattr(model.config, "num_attention_heads", 1) or 1
    working = kept = 0.0
    regrouped = 0.0  # the later groups' routed forwards (`expert_groups`), in block forwards
    for layers, input_groups, grouping in zip(blocks, block_groups, groupings):
        chosen = [la for la in layers if la.name in targeted]
        by_owner = {la.owner: la for la in layers}
        groups = [by_owner[g[0]].shape[1] for g in input_groups if g[0] in by_owner]  # one Hessian per shared input
        others = [by_owner[g[0]].shape[1] for g in input_groups if g[0] in by_owner and not by_owner[g[0]].routed]
        cost = block_cost([(la.role, *la.shape) for la in chosen], groups, tokens=tokens, seq=seq, hidden=hidden, heads=heads,
                          rates=plan.rates, obs=solves, kl_samples=kl_samples,
                          forward_params=sum(la.shape[0] * la.shape[1] for la in layers))
        plan.costs.append(cost)
        # statistics: a float64 sum and a float32 scratch per accumulator (passes/gram.py), times the copies a
        # pass keeps (held-out Hessians); the OBS solve: three float32 n x n matrices and the weights
        block_mb = (statistics_bytes(others, copies) + grouping.statistics_bytes  # the experts: one group's at a time
                    + max(12 * la.shape[1] ** 2 + 16 * la.shape[0] * la.shape[1] for la in chosen or layers)) / 2**20
        working = max(working, block_mb)
        kept = max(kept, tokens * sum(others) * 4 / 2**20)  # one float32 input per shared input
        # experts read by group: the block runs twice more up to its experts (recorded calls, replay); else the
        # later groups' routed forwards
        regrouped += cost.forward_s if by_group and grouping.experts else (grouping.groups - 1) * cost.forward_s / 2
        if grouping.experts and not plan.experts:
            plan.experts = grouping.describe(by_group)
    fwd = sum(c.forward_s for c in plan.costs)
    stats = sum(c.stats_s for c in plan.costs)
    obs = sum(sum(c.solves_s) for c in plan.costs)
    kl_s = sum(c.kl_forward_s + sum(c.kl_solves_s) for c in plan.costs)
    plan.estimate_s = {"block forwards (observe + re-forward)": fwd, "statistics": stats}
    samples = max(tokens // seq, 1)
    extra = sum(c.extra_forwards + c.sample_forwards[0] * min(c.sample_forwards[1] or samples, samples) / samples
                for c in costs) * fwd / 2  # fwd is two full forwards
    extra += regrouped
    if extra:
        plan.estimate_s["further block forwards (survey, true-sequential stages, expert groups, block-output scoring)"] = extra
    if solves:
        plan.estimate_s["masks and OBS updates"] = obs
    if kl_s:
        plan.estimate_s["attention-KL candidates"] = kl_s
    plan.estimate_s["total"] = sum(plan.estimate_s.values())
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    hidden_mb = 3 * tokens * hidden * 4 / 2**20
    plan.estimate_mb = {"process before loading": baseline_mb, "model parameters": weight_mb,
                        "checkpoint pages read while loading": weight_mb,
                        "calibration hidden states": hidden_mb, "largest block's working set": working}
    if any(c.keeps_inputs for c in costs):
        plan.estimate_mb["kept layer inputs and a second hidden-state stream"] = kept + tokens * hidden * 4 / 2**20
    plan.estimate_mb["peak (sum)"] = sum(plan.estimate_mb.values())


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The estimate as a JSON-able dict (for benchmarks)."""
    return {"estimate_s": plan.estimate_s, "estimate_mb": plan.estimate_mb, "estimate_disk_mb": plan.estimate_disk_mb,
            "rates": plan.rates}
