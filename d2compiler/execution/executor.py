"""The block-by-block executor.

It captures the inputs of the first block for every calibration window, then for each block:
moves it to the compute device, runs it once dense while the passes observe (statistics), applies
the passes in schedule order, and re-runs the modified block to produce the next block's inputs,
so errors propagate as in SparseGPT. Around every pass it checks what it can instead of trusting
the pass (`invariants`): its precondition, its postconditions (by default no recorded mask revived,
every weight finite) and that a pass reporting `modified = False` or declaring `reads_only`
changed no parameter. Only the current block lives on the compute device. Blocks after the last
targeted one are not run at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from d2compiler.errors import D2Error, PassError
from d2compiler.execution.block_io import BlockInput, capture_block_inputs
from d2compiler.execution.checkpoint import CheckpointStore
from d2compiler.execution.context import ExecutorContext
from d2compiler.execution.distributed import SINGLE, Group
from d2compiler.execution.expert_groups import block_grouping, split
from d2compiler.execution.experts_by_group import by_group_file, copy_block, hold_experts_by_group, prune_by_groups
from d2compiler.execution.invariants import blamed, check_precondition, check_statistics, ran_before, settle
from d2compiler.execution.lazy_experts import held_experts, run_block
from d2compiler.execution.memory import current_rss_mb, peak_rss_mb
from d2compiler.execution.placement import Placement, Reader
from d2compiler.execution.progress import progress
from d2compiler.execution.report import BlockReport, ExecutionReport, merge_results
from d2compiler.execution.streaming import round_to_storage
from d2compiler.execution.survey import survey
from d2compiler.graph.block_trace import trace_with_experts
from d2compiler.graph.blocks import block_signature
from d2compiler.graph.coverage import Coverage, measure_coverage
from d2compiler.graph.expert_lists import attach_list_statistics
from d2compiler.graph.experts import expert_layers, use_eager_experts
from d2compiler.graph.layers import LinearLayer
from d2compiler.graph.structure import BlockStructure, bind_linears, structure_from_roles
from d2compiler.graph.targets import select_layers
from d2compiler.recipe.pass_base import Pass, PassResult

if TYPE_CHECKING:
    from d2compiler.execution.streaming import StreamedModel

log = logging.getLogger(__name__)


@dataclass
class Targets:
    """What the schedule acts on, found before the first block runs."""

    layers: list[LinearLayer]  # every block's layers
    by_pass: dict[int, set[str]]  # per scheduled pass (by position): the names of the layers it targets
    coverage: Coverage
    last: int  # the last block some pass targets (-1: none)


@dataclass
class Progress:
    """Where the block loop starts: the first block to run, the reports of the blocks before it
    (restored from checkpoints) and the inputs of the first block to run."""

    first: int
    inputs: list[BlockInput]
    reports: list[BlockReport] = field(default_factory=list)


class BlockExecutor:
    """Runs a pass schedule over a model's repeated blocks (see the module docstring)."""

    def __init__(self, model: nn.Module, schedule: list[Pass], *, device: torch.device,
                 role_overrides: dict[str, str] | None = None, quiet: bool = False, streamed: StreamedModel | None = None,
                 group: Group = SINGLE, storage_dtype: torch.dtype | None = None, allow_untargeted: bool = False,
                 experts_calibration: str = "routed", expert_group_size: int | None = None, stacks: list[str] | None = None,
                 stack: int = 0, experts_load: str = "block"):
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
        self.expert_group_size = expert_group_size  # experts whose statistics are held at once (None: as many as fit)
        self._samples = (0, 0)  # (global index of this process's first window, windows over all processes)
        self.stacks = stacks or []  # the stacks the recipe names (`model.blocks`); this executor prunes stacks[stack]
        self.stack_follows = stack < len(self.stacks) - 1  # a later stack runs after this one (its last block is saved)
        self.placement = Placement(model, device, streamed, self.stacks[stack] if self.stacks else None)
        self.blocks_path, self.blocks = self.placement.blocks_path, self.placement.blocks
        self._structures: dict[tuple, BlockStructure] = {}
        use_eager_experts(model)  # experts one by one, so that each one's statistics can be seen
        self.by_group = experts_load == "group"  # banks stay in the files, read one group at a time (`experts_by_group`)
        if self.by_group:
            hold_experts_by_group(streamed, schedule, group.size, expert_group_size)
        self._work: CheckpointStore | None = None

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
                    self._structures[key] = trace_with_experts(self.model, placed, sample, label)
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
        attach_list_statistics(self.blocks[index], structure.expert_lists)
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
        if self.by_group and checkpoints is None:
            raise D2Error('experts.load = "group" writes the pruned experts to the run\'s work folder: set output.path')
        self._work = checkpoints
        inputs = self._capture(windows)
        targets = self._find_targets(inputs[0])
        survey(self, inputs, targets.by_pass, targets.last)  # before any resume: it always sees the dense model
        writes = checkpoints is not None and self.group.is_main  # one process writes the checkpoints
        start = self._resume(checkpoints, inputs, targets.last, writes)
        reports = self._run_blocks(start, targets, checkpoints if writes else None)
        if checkpoints is not None:
            self.group.barrier()  # every checkpoint file is written before any process reads one
        roles = {layer.name: layer.role for layer in targets.layers}
        return ExecutionReport(self.blocks_path, len(self.blocks), reports, roles, targets.coverage)

    def _capture(self, windows: list[torch.Tensor]) -> list[BlockInput]:
        """This process's share of the calibration windows, as calls of the first block."""
        share = self.group.share(len(windows))
        if not share:
            raise D2Error(f"{len(windows)} calibration samples for {self.group.size} processes: each process needs at least one")
        self._samples = (share.start, len(windows))
        with self.placement.outside_on():
            inputs = capture_block_inputs(self.model, self.blocks, windows[share.start : share.stop], self.device)
        if self.streamed is not None:
            self.streamed.release_outside()  # only the blocks are needed from here on
        return inputs

    def _find_targets(self, sample: BlockInput) -> Targets:
        """Every block's layers, what each pass targets among them (refusing a pass that matches
        nothing and a recipe that leaves too much untargeted), and the last targeted block."""
        layers = [layer for i in range(len(self.blocks)) for layer in self.layers_of(i, self.structure(i, sample))]
        by_pass = self.targeted_names(layers)
        self.check_targets_match(by_pass, layers)
        coverage = self.check_coverage(by_pass, layers)
        for i, names in by_pass.items():
            with blamed(self.schedule[i], "check_layers", "before the first block"):
                self.schedule[i].check_layers([layer for layer in layers if layer.name in names])
        hit = {int(n[len(self.blocks_path) + 1 :].split(".")[0]) for names in by_pass.values() for n in names}
        return Targets(layers, by_pass, coverage, max(hit) if hit else -1)

    def _resume(self, checkpoints: CheckpointStore | None, inputs: list[BlockInput], last: int, writes: bool) -> Progress:
        """Where to start: block 0, or after the blocks a killed run of the same job finished (restored,
        with the first unfinished block's inputs from the checkpoint or replayed)."""
        resumed = checkpoints.start() if writes else None
        done = resumed.blocks_done if resumed is not None else 0
        if self.group.size > 1 and checkpoints is not None:  # the others read what the first one verified
            done = int(self.group.broadcast(torch.tensor([done], dtype=torch.int64), 0).item())
        streaming = self.streamed is not None
        if not 0 < done <= (len(self.blocks) if streaming else last + self.stack_follows):
            return Progress(0, inputs)
        log.info("resuming at block %d of %d from %s", done, last + 1, checkpoints.folder)
        if not streaming:  # a streaming run's finished blocks stay in their files
            for index in range(done):
                checkpoints.restore_block(index, self.blocks[index], self.prefix(index))
        reports = [BlockReport.from_json(r) for r in resumed.reports] if resumed is not None else []
        if done > last:
            pass  # every targeted block is done; only copies remain
        elif resumed is not None and resumed.hidden is not None and len(resumed.hidden) == len(inputs):
            inputs = [inp.with_hidden(h.to(inp.args[0].device)) for inp, h in zip(inputs, resumed.hidden)]
        else:  # hidden states lost or altered: replay the restored blocks (the same computation)
            for index in range(done):
                inputs = self._propagate(index, inputs, checkpoints.reader(index) if streaming else None)
        return Progress(done, inputs, reports)

    def _run_blocks(self, start: Progress, targets: Targets, checkpoints: CheckpointStore | None) -> list[BlockReport]:
        """Blocks `start.first`..last, each saved to `checkpoints` (this process writes them) when
        given; in a streaming run, the untouched blocks after the last are copied as they are."""
        needed = {a for p in self.schedule for a in p.requires | p.optional}
        inputs, reports, last, streaming = start.inputs, start.reports, targets.last, self.streamed is not None
        bar = progress(range(start.first, last + 1), desc="blocks", disable=self.quiet, initial=start.first, total=last + 1)
        try:
            for index in bar:
                with self.on_device(index) as block:
                    report, outputs = self._run_block(index, block, inputs, needed, targets.by_pass, last)
                    reports.append(report)
                    if checkpoints is not None and (index < last or streaming or self.stack_follows):  # several processes: no hidden states, a resume replays
                        hidden = outputs if self.group.size == 1 else []
                        self._save(checkpoints, index, block, hidden, [r.to_json() for r in reports])
                inputs = [inp.with_hidden(h) for inp, h in zip(inputs, outputs)]
            if streaming and checkpoints is not None:
                for index in range(max(start.first, last + 1), len(self.blocks)):
                    self._save_untouched(checkpoints, index, [r.to_json() for r in reports])
        finally:  # an interrupted run still leaves its last finished block durable
            if checkpoints is not None:
                checkpoints.flush()
        return reports

    def _save(self, checkpoints: CheckpointStore, index: int, block: nn.Module, hidden: list[torch.Tensor],
              reports: list[dict]) -> None:
        """Checkpoint finished block `index`: its state dict, or the file `experts_by_group` wrote."""
        if self.by_group and (written := by_group_file(checkpoints, index)).exists():
            checkpoints.adopt_block(index, written, hidden, reports)
        else:
            checkpoints.save_block(index, block, hidden, reports, self.prefix(index))

    def _save_untouched(self, checkpoints: CheckpointStore, index: int, reports: list[dict]) -> None:
        """Checkpoint block `index` as it is (after the last targeted block of a streaming run)."""
        if not (self.by_group and copy_block(self.streamed, index, checkpoints, self.storage_dtype, self.expert_group_size, reports)):
            with self.streamed.block(index) as block:
                checkpoints.save_block(index, block, [], reports, self.prefix(index))

    def round_block(self, block: nn.Module) -> None:
        """Round `block`'s loaded weights to the storage dtype (`round_to_storage`), if there is one."""
        if self.storage_dtype is not None:
            round_to_storage(block, self.storage_dtype)

    def _propagate(self, index: int, inputs: list[BlockInput], read: Reader | None = None) -> list[BlockInput]:
        """Block `index`'s outputs as the next block's inputs."""
        with self.on_device(index, read) as block:
            outputs = run_block(block, inputs)[0]
        return [inp.with_hidden(h) for inp, h in zip(inputs, outputs)]

    def coverage(self, targets: dict[int, set[str]], layers: list[LinearLayer]) -> Coverage:
        """The share of the model's parameters the passes target (see `graph.coverage`)."""
        ignore = [pattern for p in self.schedule if (patterns := p.target_patterns()) is not None for pattern in patterns[1]]
        return measure_coverage(self.model, self.blocks_path, layers, set().union(*targets.values()) if targets else set(),
                                ignore, pruned_stacks=self.stacks)

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
                sample_count: int | None = None) -> ExecutorContext:
        """The context of block `index` (already on the compute device): its layers, the ones some pass
        targets, and this process's share of `sample_count` samples (default: all the run's)."""
        structure = self._structures[block_signature(block)]
        layers = self.layers_of(index, structure)
        names = {layer.name for layer in layers}
        targeted = set().union(*(t & names for t in targets.values())) if targets else set()
        return ExecutorContext(index, f"{self.blocks_path}.{index}", block, layers, structure, self.device, inputs, needed, targeted,
                            schedule=self.schedule, group=self.group, sample_offset=self._samples[0],
                            sample_count=self._samples[1] if sample_count is None else sample_count,
                            experts_calibration=self.experts_calibration)

    def _run_block(self, index: int, block: nn.Module, inputs: list[BlockInput], needed: set[str], targets: dict[int, set[str]],
                   last: int) -> tuple[BlockReport, list[torch.Tensor]]:
        """Observe, apply the passes (group of experts by group, `expert_groups`), and return the
        block's outputs (empty for the last block). `block` is already on the compute device."""
        ctx = self.context(index, block, inputs, needed, targets)
        self._check_finite_weights(ctx)
        times: dict[str, float] = {}
        parts: dict[int, list[tuple[str, PassResult]]] = {}
        start = time.perf_counter()
        grouping = block_grouping(ctx, self.schedule, self.expert_group_size)
        by_group = held_experts(block) is not None
        if by_group:
            prune_by_groups(self, ctx, grouping, times, parts, by_group_file(self._work, index))
        groups = [] if by_group else split(ctx.layers, grouping, others_first=any(p.reobserves_upstream() for p in self.schedule))
        for number, names in enumerate(groups):
            with ctx.narrowed(names) if len(groups) > 1 else nullcontext():
                self._observe(ctx, times, later=number > 0)
                self.apply_schedule(ctx, times, parts)
            if len(groups) > 1:
                ctx.forget(names)
        results = merge_results(parts)
        modified = any(result.modified for _name, result in results)  # each False checked against the fingerprints
        t0 = time.perf_counter()
        if modified and not by_group:  # experts_by_group rounds the block before writing it
            self.round_block(block)
        if index < last:
            reuse = not modified and ctx.dense_outputs is not None and not by_group
            outputs = ctx.dense_outputs if reuse else run_block(block, inputs)[0]
        else:
            outputs = []
        times["propagate"] = time.perf_counter() - t0
        times["total"] = time.perf_counter() - start
        memory = {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_mb": round(current_rss_mb(), 1)}
        if self.device.type == "cuda":
            memory["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if grouping.experts:
            memory.update(expert_groups=grouping.groups, expert_group_size=grouping.size,
                          expert_statistics_mb=round(grouping.statistics_bytes / 2**20, 1))
        return BlockReport(index, ctx.name, {k: round(v, 4) for k, v in times.items()}, results, memory), outputs

    def _observe(self, ctx: ExecutorContext, times: dict[str, float], *, later: bool,
                 run: Callable[[], list[torch.Tensor] | None] | None = None) -> None:
        """The statistics of the targeted layers (of the current group): a dense forward with the
        observing passes bracketed around it. A later group's forward ends once its layers have run
        (its layers' inputs are those of the dense block: see `expert_groups`)."""
        if not ctx.targeted or not any(p.observes for p in self.schedule):
            return
        start = time.perf_counter()
        read: set[str] = set()
        for p in self.schedule:
            with blamed(p, "statistics_read", ran_before(ctx, p)):
                read |= p.statistics_read(ctx)
        read &= ctx.targeted  # e.g. true-sequential's later stages are not read from this observation
        if later and not read:
            return
        stops = [layer.module for layer in ctx.layers if layer.name in read] if later and run is None else None
        ctx.bracketed_forward(self.schedule, observing=None if read >= ctx.targeted else frozenset(read), stops=stops, run=run)
        check_statistics(ctx)
        times["observe"] = times.get("observe", 0.0) + time.perf_counter() - start

    def apply_schedule(self, ctx: ExecutorContext, times: dict[str, float], parts: dict[int, list[tuple[str, PassResult]]]) -> None:
        """Every pass of the schedule on the block (its current group), in order; each result added to
        `parts` (by position) and its time to `times`."""
        for position, p in enumerate(self.schedule if ctx.targeted else []):
            t0 = time.perf_counter()
            parts.setdefault(position, []).append((p.name, self._apply(ctx, p)))
            times[p.name] = times.get(p.name, 0.0) + time.perf_counter() - t0

    def _apply(self, ctx: ExecutorContext, p: Pass) -> PassResult:
        """One pass on the block: precondition, `apply` (an unexpected exception becomes a located
        line), then its postconditions and claims checked against the fingerprints taken before."""
        ctx.active = p
        before = ctx.fingerprints()
        check_precondition(ctx, p)
        with blamed(p, "apply", ran_before(ctx, p)):
            result = p.apply(ctx)
        if not isinstance(result, PassResult):
            raise PassError(f"pass '{p.name}' returned {type(result).__name__} from apply, not a PassResult ({ran_before(ctx, p)})")
        settle(ctx, p, result, before)
        ctx.active = None
        return result

    def _check_finite_weights(self, ctx: ExecutorContext) -> None:
        """Refuse a block whose weights hold NaN or Inf before any pass ran (one host sync)."""
        named = [(n, p) for n, p in ctx.module.named_parameters() if not p.is_meta]  # experts held by group: checked as read
        finite = torch.stack([torch.isfinite(param).all() for _n, param in named]).tolist() if named else []
        nonfinite = [pname for (pname, _param), ok in zip(named, finite) if not ok]
        if nonfinite:
            raise PassError(f"{ctx.name}.{nonfinite[0]}: the model's weights hold NaN or Inf before pruning")
