"""`compress`: run a validated recipe end to end (load, gather calibration statistics, prune block by block, evaluate,
write the output) and return a summary."""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from d2compiler.driver.sharded import write_sharded_output
from d2compiler.driver.summary import Measured, RunSummary, run_record, run_summary
from d2compiler.errors import D2Error, PassError
from d2compiler.evaluation.evaluate import Metric, make_metric
from d2compiler.evaluation.inputs import calibration_inputs
from d2compiler.evaluation.sources import resolve_source
from d2compiler.execution.checkpoint import CheckpointStore, file_sha256, fingerprint, work_dir_for
from d2compiler.execution.distributed import Group, join, leave
from d2compiler.execution.executor import BlockExecutor
from d2compiler.execution.memory import peak_rss_mb
from d2compiler.execution.report import ExecutionReport
from d2compiler.execution.runner import ModelRunner
from d2compiler.execution.streaming import StreamedModel
from d2compiler.export.hf import write_output
from d2compiler.export.metadata import (
    module_weights,
    package_versions,
    weight_zeros,
    weights_sha256,
)
from d2compiler.export.output_dir import check_free_space, check_output_path, output_lock, user_path
from d2compiler.graph.experts import use_eager_experts
from d2compiler.graph.packing import is_quant_buffer
from d2compiler.loading.dtypes import dtype_name, resolve_device
from d2compiler.loading.models import LoadedModel, load_model, load_streamed, source_files
from d2compiler.recipe.passmanager import PassManager
from d2compiler.recipe.registry import default_registry
from d2compiler.recipe.schema import baseline_pattern, validate_recipe

log = logging.getLogger(__name__)


def source_digest(loaded: LoadedModel) -> dict[str, str]:
    """sha256 of every local file the model was read from, or of every tensor (a hub id, or a model
    handed in by the caller)."""
    if loaded.files:
        return {str(path): file_sha256(path) for path in loaded.files}
    return {"tensors": weights_sha256(loaded.model)}


def job_fingerprint(recipe: BaseModel, source: dict[str, str], windows: list[torch.Tensor]) -> str:
    """Everything the pruned weights depend on: the resolved recipe (model, calibration data and its
    batching, passes; not evaluation or output), the source's files, the calibration tokens and the
    versions of the packages that compute them."""
    tokens = hashlib.sha256()
    for w in windows:
        t = w.to("cpu").contiguous()
        tokens.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        tokens.update(t.numpy().tobytes())
    versions = {k: v for k, v in package_versions().items() if k in ("d2compiler", "torch", "transformers", "safetensors")}
    return fingerprint({"model": recipe.model.model_dump(mode="json"), "calibration": recipe.data.calibration.model_dump(mode="json"),
                        "passes": [p.model_dump(mode="json") for p in recipe.passes], "source": source,
                        "tokens": tokens.hexdigest(), "versions": versions})


def protected_paths(recipe: BaseModel) -> list[Path]:
    """Local files and folders a run reads (model source and every file it is read from, wherever a
    link points, and the data files): an output may not touch them."""
    sources = [recipe.model.source, recipe.data.calibration.source]
    if recipe.data.evaluation is not None:
        sources.append(recipe.data.evaluation.source)
    paths = [user_path(s) for s in sources if not s.startswith("builtin:") and user_path(s).exists()]
    return paths + source_files(recipe.model.source)


def output_bytes_needed(model: torch.nn.Module, windows: list[torch.Tensor], hidden_size: int,
                        storage: torch.dtype | None = None) -> int:
    """About what a run writes: the output weights and the block checkpoints (floating tensors in the
    `storage` dtype they are written in, when given), two sets of hidden states."""
    params = sum(t.numel() * (storage.itemsize if storage is not None and t.is_floating_point() else t.element_size())
                 for t in model.state_dict().values())
    tokens = sum(w.numel() for w in windows)
    return 2 * params + 2 * tokens * hidden_size * 4 + (16 << 20)


def check_finite(model: torch.nn.Module) -> None:
    """Refuse to go on with NaN or Inf anywhere in the model (a NaN model is never written)."""
    weights = [(n, b) for n, b in model.named_buffers() if n.rpartition(".")[2] == "values" or is_quant_buffer(n)]
    for name, param in [*model.named_parameters(), *weights]:
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise PassError(f"{name}: contains NaN or Inf after pruning; nothing was written")


def streamed_weights(streamed: StreamedModel, readers: list[Any], storage: torch.dtype | None) -> tuple[tuple[int, int], str]:
    """A streaming run's (zeros, entries) over its block weights and its `weights_sha256`, from one
    read of the block files (the hash reads every tensor; the weights are counted as they pass)."""
    counts, counted = [0, 0], set()

    def count(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in counted and not key.partition("#")[0].endswith("bias"):  # KEY#e: expert e of bank KEY
            counted.add(key)
            zeros, entries = weight_zeros([tensor])
            counts[0], counts[1] = counts[0] + zeros, counts[1] + entries
        return tensor

    class Counting:
        """A block reader that counts the weights it reads (whole, or one expert at a time)."""

        def __init__(self, read: Any):
            self.read = read
            if hasattr(read, "expert"):
                self.expert = lambda key, e: count(f"{key}#{e}", read.expert(key, e))

        def __call__(self, key: str) -> torch.Tensor:
            return count(key, self.read(key))

    sha256 = streamed.weights_sha256([Counting(read) for read in readers], storage)
    return (counts[0], counts[1]), sha256


def preflight(recipe: BaseModel, overwrite: bool) -> None:
    """The checks of the output path that `compress` makes first (for a launcher, before any process
    starts)."""
    if recipe.output.path:
        check_output_path(user_path(recipe.output.path), overwrite, protected_paths(recipe))


def compress(recipe: BaseModel, *, loaded: LoadedModel | None = None, quiet: bool = False, overwrite: bool = False) -> RunSummary:
    """Run `recipe`. A caller may pass an already loaded model (any transformers-style module with
    a tokenizer) instead of `recipe.model.source`. `overwrite` (the command line's `--overwrite`)
    allows replacing an earlier d2compiler output (see `export.output_dir`).

    Started by torchrun in several processes, the processes share the work (`distributed`): each
    calibrates on its share of the windows, the statistics are summed, the layers' solves are spread,
    and the first process alone checks, locks and writes the output and the checkpoints. An error
    ends this process with its message; torchrun then stops the others."""
    group = join(resolve_device(recipe.model.device))
    out_path = user_path(recipe.output.path) if recipe.output.path else None
    job = Job(recipe, group, quiet or not group.is_main, out_path, overwrite, protected_paths(recipe) if out_path else [])
    if out_path is None:
        summary = _compress(job, loaded)
    else:
        if group.is_main:
            check_output_path(out_path, overwrite, job.protected)
        with output_lock(out_path) if group.is_main else nullcontext():  # only the first process writes
            summary = _compress(job, loaded)
    leave(group)
    return summary


@dataclass
class Job:
    """One run as `compress` resolved it."""

    recipe: BaseModel
    group: Group
    quiet: bool  # no progress bars or info lines (always so on the processes after the first)
    out_path: Path | None
    overwrite: bool
    protected: list[Path]  # what the output may not touch

    @property
    def main(self) -> bool:
        return self.group.is_main


@dataclass
class Pruned:
    """What the pruning stage leaves: the report, the pruned stacks of blocks and their checkpoints
    (one store per stack; none without an output)."""

    execution: ExecutionReport
    stacks: list[torch.nn.ModuleList]
    checkpoints: list[CheckpointStore]
    prune_s: float
    compute: torch.dtype
    device: torch.device


def _compress(job: Job, loaded: LoadedModel | None) -> RunSummary:
    """The stages of a run: load, calibration data, dense metric, prune, pruned metric, record, write."""
    start = time.perf_counter()
    manager = PassManager(list(job.recipe.passes))
    if job.group.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded, streamed = _load(job.recipe, loaded)
    use_eager_experts(loaded.model)  # the dense and pruned evaluations run the experts as pruning sees them
    windows = _calibration_windows(job, loaded)
    metric, dense_value = _dense_metric(job, loaded, streamed)
    pruned = _prune(job, manager, loaded, streamed, windows)
    readers = None if streamed is None else [pruned.checkpoints[0].reader(i) for i in range(len(streamed.blocks))]
    runner = ModelRunner(loaded.model, job.group.device, streamed=streamed, readers=readers, group=job.group)
    measured = Measured(metric, dense_value, None if metric is None else metric.measure(runner, desc=f"pruned {metric.name}"))
    measured.baseline = _baseline(job, manager)
    layers = pruned.execution.layer_metrics()
    block_zeros, sha256 = None, None
    if job.main and streamed is None:
        block_zeros = weight_zeros([w for stack in pruned.stacks for w in module_weights(stack)])
    elif job.main:  # the block files are read once: hashed and their zeros counted on the way
        block_zeros, sha256 = streamed_weights(streamed, readers, loaded.storage_dtype)
    block_sparsity = block_zeros[0] / block_zeros[1] if block_zeros and block_zeros[1] else None
    if not job.main:  # the first process records and writes; hashing the weights again here would be wasted work
        return run_summary(job, start, measured, pruned, layers, {}, block_sparsity)
    if loaded.storage_dtype is not None and streamed is None:  # exact: every pruned block is already rounded to it
        loaded.model.to(loaded.storage_dtype)
    record = run_record(job.recipe, manager.schedule, loaded, measured, pruned, layers, block_sparsity, sha256, job.group)
    if job.out_path is not None:
        record["results"]["wall_s"] = round(time.perf_counter() - start, 3)
        record["results"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
        _write(job, loaded, streamed, pruned.checkpoints, record)
    return run_summary(job, start, measured, pruned, layers, record, block_sparsity)


def _baseline(job: Job, manager: PassManager) -> dict[str, Any] | None:
    """`data.evaluation.baseline` (see its field): the recipe's passes that provide what the baseline
    pass requires, then the baseline at the recipe's pattern, on a fresh copy of the model in this
    process; its metric and pruning time."""
    ev = job.recipe.data.evaluation
    if ev is None or ev.baseline is None or not job.main:
        return None
    if job.group.size > 1:
        log.warning("data.evaluation.baseline runs in one process: skipped in a run of %d processes", job.group.size)
        return None
    needs = default_registry().get(ev.baseline).requires
    feeding = [spec.model_dump() for spec, p in zip(job.recipe.passes, manager.schedule) if p.provides & needs]
    data = {**job.recipe.model_dump(include={"version", "model", "experts"}),
            "data": job.recipe.data.model_dump(), "passes": [*feeding, {"type": ev.baseline, **baseline_pattern(manager.schedule)}]}
    data["data"]["evaluation"].update(baseline=None, compare_dense=False)
    if not job.quiet:
        log.info("baseline: %s at %s on the same data", ev.baseline, baseline_pattern(manager.schedule))
    summary = _compress(Job(validate_recipe(data), job.group, True, None, False, []), None)
    return {"type": ev.baseline, **baseline_pattern(manager.schedule), "metric": summary.metric, "value": summary.pruned_value,
            "prune_s": round(summary.prune_s, 2)}


def _load(recipe: BaseModel, loaded: LoadedModel | None) -> tuple[LoadedModel, StreamedModel | None]:
    """The model handed in, or the recipe's model loaded (streamed when `model.streaming`)."""
    m = recipe.model
    if m.streaming and loaded is not None:
        raise D2Error("model.streaming: the model is read from model.source; a model handed in cannot be streamed")
    if loaded is not None:
        if recipe.data.evaluation is not None and recipe.data.evaluation.baseline is not None:
            raise D2Error("data.evaluation.baseline: the baseline prunes a fresh copy loaded from model.source; a model "
                          "handed in cannot be loaded again")
        return loaded, None
    log.info("loading %s%s", m.source, " (streaming)" if m.streaming else "")
    if m.streaming:
        return load_streamed(m.source, m.dtype, m.device, m.attn_implementation, m.revision)
    return load_model(m.source, m.dtype, m.device, m.revision, m.attn_implementation), None


def _calibration_windows(job: Job, loaded: LoadedModel) -> list[torch.Tensor]:
    """The calibration inputs; with an output, checked first against the free space."""
    calibration = resolve_source(job.recipe.data.calibration, loaded.model, "data.calibration")
    windows = calibration_inputs(calibration, loaded.model, loaded.tokenizer)
    if job.out_path is not None and job.main:
        hidden = getattr(getattr(loaded.model, "config", None), "hidden_size", 0) or 0
        check_free_space(job.out_path, output_bytes_needed(loaded.model, windows, int(hidden), loaded.storage_dtype))
    return windows


def _dense_metric(job: Job, loaded: LoadedModel, streamed: StreamedModel | None) -> tuple[Metric | None, float | None]:
    """The evaluation metric, and its dense value when it is compared or needed."""
    ev = job.recipe.data.evaluation
    metric = None if ev is None else make_metric(resolve_source(ev, loaded.model, "data.evaluation"), loaded.model,
                                                 loaded.tokenizer, quiet=job.quiet)
    if metric is None or not (ev.compare_dense or metric.needs_dense):
        return metric, None
    return metric, metric.dense(ModelRunner(loaded.model, job.group.device, streamed=streamed, group=job.group))


def _prune(job: Job, manager: PassManager, loaded: LoadedModel, streamed: StreamedModel | None,
           windows: list[torch.Tensor]) -> Pruned:
    """Run the schedule block by block (checkpointed when there is an output)."""
    recipe, group, storage = job.recipe, job.group, loaded.storage_dtype
    start = time.perf_counter()
    compute = streamed.dtype if streamed is not None else next(loaded.model.parameters()).dtype
    if storage is not None and not job.quiet:
        log.info("computing in %s, storing the weights in the checkpoint's %s (model.dtype = auto on the CPU)",
                 dtype_name(compute), dtype_name(storage))
    stacks = recipe.model.blocks or []
    reports, blocks, stores = [], [], []
    key = None if job.out_path is None else job_fingerprint(recipe, source_digest(loaded), windows)  # hashes the model files: once
    try:
        for index in range(max(len(stacks), 1)):  # the stacks in order: a later one calibrates on the pruned earlier ones
            executor = BlockExecutor(loaded.model, manager.schedule, device=group.device, role_overrides=recipe.model.roles,
                                     quiet=job.quiet, streamed=streamed, group=group, storage_dtype=storage,
                                     allow_untargeted=recipe.model.allow_untargeted,
                                     experts_calibration=recipe.experts.calibration, expert_group_size=recipe.experts.group_size,
                                     stacks=stacks, stack=index, experts_load=recipe.experts.load)
            checkpoints = None if key is None else _checkpoints(job, loaded.storage_dtype, key, index)
            stores += [checkpoints] if checkpoints is not None else []
            reports.append(executor.run(windows, checkpoints))
            blocks.append(executor.blocks)
        if streamed is None:
            check_finite(loaded.model)
    except D2Error:
        if job.main:  # a deterministic failure: a rerun would fail the same way
            for store in stores:
                store.discard()
        raise
    return Pruned(ExecutionReport.combine(reports), blocks, stores, time.perf_counter() - start, compute, group.device)


def _checkpoints(job: Job, storage: torch.dtype | None, key: str, stack: int) -> CheckpointStore:
    """The checkpoint store of stack `stack` for the job `key` (`job_fingerprint`): `.NAME.d2c-work`
    beside the output, `.NAME.d2c-work.stackN` for the later stacks of `model.blocks`; emptied unless
    resuming."""
    folder = work_dir_for(job.out_path)
    folder = folder.with_name(f"{folder.name}.stack{stack}") if stack else folder
    store = CheckpointStore(folder, key, processes=job.group.size, storage_dtype=storage)
    if job.main and job.recipe.output.resume:
        store.check_processes()
    elif job.main:
        store.discard()
    return store


def _write(job: Job, loaded: LoadedModel, streamed: StreamedModel | None, checkpoints: list[CheckpointStore],
           record: dict[str, Any]) -> None:
    """Write the output folder (shards from the block checkpoints when streaming), then drop the checkpoints."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if streamed is not None:
        generation = getattr(model, "generation_config", None) if model.can_generate() else None
        write_sharded_output(job.out_path, streamed.outside_state(loaded.storage_dtype),
                             [checkpoints[0].path(i) for i in range(len(streamed.blocks))], model.config, generation, tokenizer,
                             record, overwrite=job.overwrite, protected=job.protected,
                             layout=(set(streamed.converted), streamed.in_checkpoint_layout),
                             by_expert=streamed.checkpoint_pieces if streamed.experts_by_group else None)
    else:
        write_output(job.out_path, model, tokenizer, record, overwrite=job.overwrite, fmt=job.recipe.output.format,
                     protected=job.protected)
    for store in checkpoints:
        store.discard()
