"""`compress`: run a validated recipe end to end (load, gather calibration statistics, prune block by block, evaluate,
write the output) and return a summary."""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from d2compiler.driver.sharded import write_sharded_output
from d2compiler.errors import D2Error, PassError
from d2compiler.evaluation.evaluate import make_metric
from d2compiler.evaluation.inputs import calibration_inputs
from d2compiler.execution.checkpoint import CheckpointStore, file_sha256, fingerprint, work_dir_for
from d2compiler.execution.distributed import Group, join, leave
from d2compiler.execution.executor import BlockExecutor, ExecutionReport
from d2compiler.execution.memory import peak_rss_mb
from d2compiler.execution.runner import ModelRunner
from d2compiler.execution.streaming import StreamedModel
from d2compiler.export.hf import write_output
from d2compiler.export.metadata import (
    module_weights,
    overall_sparsity,
    package_versions,
    sparsity_record,
    weight_zeros,
    weights_sha256,
)
from d2compiler.export.output_dir import check_free_space, check_output_path, output_lock, user_path
from d2compiler.graph.experts import use_eager_experts
from d2compiler.graph.packing import QUANT_BUFFERS
from d2compiler.loading.models import (
    LoadedModel,
    dtype_name,
    load_model,
    load_streamed,
    resolve_device,
    source_files,
)
from d2compiler.recipe.passmanager import PassManager

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run produced and measured."""

    output: Path | None
    metric: str | None  # perplexity, embedding_cosine, accuracy; None without evaluation
    dense_value: float | None
    pruned_value: float | None
    sparsity: float
    wall_s: float
    prune_s: float
    peak_rss_mb: float
    peak_cuda_mb: float | None
    layers: dict[str, dict[str, Any]]
    execution: ExecutionReport
    record: dict[str, Any] = field(default_factory=dict)
    rank: int = 0  # this process's rank (the first process reports)
    block_sparsity: float | None = None  # zeros over every >= 2-D weight of the blocks

    @property
    def dense_ppl(self) -> float | None:
        return self.dense_value if self.metric == "perplexity" else None

    @property
    def pruned_ppl(self) -> float | None:
        return self.pruned_value if self.metric == "perplexity" else None

    def table(self) -> str:
        """A small text table for the terminal."""
        label = self.metric or "perplexity"
        rows = [
            (f"dense {label}", _fmt(self.dense_value)),
            (f"pruned {label}", _fmt(self.pruned_value)),
            ("sparsity (pruned layers)", f"{self.sparsity:.4f}"),
            ("sparsity (all block weights)", "-" if self.block_sparsity is None else f"{self.block_sparsity:.4f}"),
            ("pruned layers", str(sum("sparsity" in m for m in self.layers.values()))),
            ("pruning time (s)", f"{self.prune_s:.1f}"),
            ("wall time (s)", f"{self.wall_s:.1f}"),
            ("peak RSS (MiB)", f"{self.peak_rss_mb:.0f}"),
        ]
        if self.peak_cuda_mb is not None:
            rows.append(("peak CUDA memory (MiB)", f"{self.peak_cuda_mb:.0f}"))
        coverage = self.execution.coverage
        if coverage is not None:
            rows.insert(4, ("parameters targeted", f"{coverage.share:.1%} of {coverage.total:,}"))
        if self.output is not None:
            rows.append(("output", str(self.output)))
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 2 + max(len(v) for _, v in rows))
        return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


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


def output_bytes_needed(model: torch.nn.Module, windows: list[torch.Tensor], hidden_size: int) -> int:
    """About what a run writes: the output weights, the block checkpoints, two sets of hidden states."""
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tokens = sum(w.numel() for w in windows)
    return 2 * params + 2 * tokens * hidden_size * 4 + (16 << 20)


def check_finite(model: torch.nn.Module) -> None:
    """Refuse to go on with NaN or Inf anywhere in the model (a NaN model is never written)."""
    weights = [(n, b) for n, b in model.named_buffers() if n.rpartition(".")[2] in ("values", *QUANT_BUFFERS)]
    for name, param in [*model.named_parameters(), *weights]:
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise PassError(f"{name}: contains NaN or Inf after pruning; nothing was written")


def streamed_weights(streamed: StreamedModel, readers: list[Any], storage: torch.dtype | None) -> tuple[tuple[int, int], str]:
    """A streaming run's (zeros, entries) over its block weights and its `weights_sha256`, from one
    read of the block files (the hash reads every tensor; the weights are counted as they pass)."""
    counts, counted_keys = [0, 0], set()

    def counting(read: Any) -> Any:
        def read_and_count(key: str) -> torch.Tensor:
            tensor = read(key)
            if key not in counted_keys and not key.endswith("bias"):
                counted_keys.add(key)
                zeros, entries = weight_zeros([tensor])
                counts[0], counts[1] = counts[0] + zeros, counts[1] + entries
            return tensor
        return read_and_count

    sha256 = streamed.weights_sha256([counting(read) for read in readers], storage)
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
    if out_path is None:
        summary = _compress(recipe, loaded, quiet, None, False, [], group)
    else:
        protected = protected_paths(recipe)
        if group.is_main:
            check_output_path(out_path, overwrite, protected)
        with output_lock(out_path) if group.is_main else nullcontext():  # only the first process writes
            summary = _compress(recipe, loaded, quiet, out_path, overwrite, protected, group)
    leave(group)
    return summary


def _compress(recipe: BaseModel, loaded: LoadedModel | None, quiet: bool, out_path: Path | None, overwrite: bool,
              protected: list[Path], group: Group) -> RunSummary:
    start = time.perf_counter()
    device = group.device
    quiet = quiet or not group.is_main
    main = group.is_main
    manager = PassManager(list(recipe.passes))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    m = recipe.model
    streamed: StreamedModel | None = None
    if m.streaming and loaded is not None:
        raise D2Error("model.streaming: the model is read from model.source; a model handed in cannot be streamed")
    if loaded is None:
        log.info("loading %s%s", m.source, " (streaming)" if m.streaming else "")
        if m.streaming:
            loaded, streamed = load_streamed(m.source, m.dtype, m.device, m.attn_implementation, m.revision)
        else:
            loaded = load_model(m.source, m.dtype, m.device, m.revision, m.attn_implementation)
    model, tokenizer = loaded.model, loaded.tokenizer
    use_eager_experts(model)  # the dense and pruned evaluations run the experts as pruning sees them

    cal = recipe.data.calibration
    windows = calibration_inputs(cal, model, tokenizer)
    if out_path is not None and main:
        hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
        check_free_space(out_path, output_bytes_needed(model, windows, int(hidden)))

    ev = recipe.data.evaluation
    metric = None if ev is None else make_metric(ev, model, tokenizer, quiet=quiet)
    dense_value = None
    if metric is not None and (ev.compare_dense or metric.needs_dense):
        dense_value = metric.dense(ModelRunner(model, device, streamed=streamed, group=group))

    prune_start = time.perf_counter()
    storage = loaded.storage_dtype
    compute = streamed.dtype if streamed is not None else next(model.parameters()).dtype
    if storage is not None and not quiet:
        log.info("computing in %s, storing the weights in the checkpoint's %s (model.dtype = auto on the CPU)",
                 dtype_name(compute), dtype_name(storage))
    executor = BlockExecutor(model, manager.schedule, device=device, role_overrides=recipe.model.roles, quiet=quiet,
                             streamed=streamed, group=group, storage_dtype=storage,
                             allow_untargeted=recipe.model.allow_untargeted, experts_calibration=recipe.experts.calibration)
    checkpoints = None
    if out_path is not None:
        checkpoints = CheckpointStore(work_dir_for(out_path), job_fingerprint(recipe, source_digest(loaded), windows),
                                      processes=group.size, storage_dtype=storage)
        if main:
            if recipe.output.resume:
                checkpoints.check_processes()
            else:
                checkpoints.discard()
    try:
        execution = executor.run(windows, checkpoints)
        if streamed is None:
            check_finite(model)
    except D2Error:
        if checkpoints is not None and main:  # a deterministic failure: a rerun would fail the same way
            checkpoints.discard()
        raise
    prune_s = time.perf_counter() - prune_start

    block_readers = None if streamed is None else [checkpoints.reader(i) for i in range(len(streamed.blocks))]
    runner = ModelRunner(model, device, streamed=streamed, readers=block_readers, group=group)
    pruned_value = None if metric is None else metric.measure(runner, desc=f"pruned {metric.name}")

    layers = execution.layer_metrics()
    metric_name = None if metric is None else metric.name

    block_zeros, sha256 = None, None
    if main and streamed is None:
        block_zeros = weight_zeros(module_weights(executor.blocks))
    elif main:  # the block files are read once: hashed and their zeros counted on the way
        block_zeros, sha256 = streamed_weights(streamed, block_readers, storage)
    block_sparsity = block_zeros[0] / block_zeros[1] if block_zeros and block_zeros[1] else None

    def summary(record: dict[str, Any]) -> RunSummary:
        peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        return RunSummary(
            output=out_path if main else None, metric=metric_name, dense_value=dense_value, pruned_value=pruned_value,
            sparsity=overall_sparsity(layers), wall_s=time.perf_counter() - start, prune_s=prune_s, peak_rss_mb=peak_rss_mb(),
            peak_cuda_mb=peak_cuda, layers=layers, execution=execution, record=record, rank=group.rank,
            block_sparsity=block_sparsity)

    if not main:  # the first process records and writes; hashing the weights again here would be wasted work
        return summary({})
    if storage is not None and streamed is None:  # exact: every pruned block is already rounded to it
        model.to(storage)
    entries = [*layers.values(), *(part for entry in layers.values() for part in entry.get("slices", {}).values())]
    patterns = sorted({entry["pattern"] for entry in entries if "pattern" in entry})  # as the pruning passes report them
    results = {
        "metric": metric_name,
        "dense": dense_value,
        "pruned": pruned_value,
        "dense_ppl": dense_value if metric_name == "perplexity" else None,
        "pruned_ppl": pruned_value if metric_name == "perplexity" else None,
        "calibration": {"source": cal.source, "samples": cal.samples, "seq_len": cal.seq_len, "sampling": cal.sampling,
                        "offset": cal.offset, "seed": cal.seed, "batch_size": cal.batch_size},
        "evaluation": None if metric is None else {"source": ev.source, "seq_len": ev.seq_len, "metric": metric_name,
                                                   "higher_is_better": metric.higher_is_better, "count": metric.count},
        "prune_s": round(prune_s, 3),
        "device": str(device),
        "block_weight_sparsity": block_sparsity,
        "coverage": None if execution.coverage is None else execution.coverage.record(),
        "compute_dtype": dtype_name(compute),
        "storage_dtype": dtype_name(storage or compute),
    }
    blocks = [{"index": b.index, "name": b.name, "times_s": b.times, "memory": b.memory, "resumed": b.resumed,
               "passes": {name: r.info for name, r in b.results if r.info}} for b in execution.blocks]
    record = sparsity_record(model=model, recipe=recipe.model_dump(mode="json"), layers=layers, patterns=patterns,
                             blocks=blocks, results=results, sha256=sha256)
    for p in manager.schedule:  # what each pass adds to the record and to the report's figures
        record.update(p.record_fields(blocks))
        record.setdefault("figures", []).extend(p.report_figures(blocks))
    if group.size > 1:
        record["results"]["processes"] = group.size
        record["results"]["bytes_all_reduced"] = group.bytes_reduced
        record["results"]["bytes_broadcast"] = group.bytes_broadcast
    if out_path is not None:
        record["results"]["wall_s"] = round(time.perf_counter() - start, 3)
        record["results"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if streamed is not None:
            generation = getattr(model, "generation_config", None) if model.can_generate() else None
            write_sharded_output(out_path, streamed.outside_state(storage), [checkpoints.path(i) for i in range(len(streamed.blocks))],
                                 model.config, generation, tokenizer, record, overwrite=overwrite, protected=protected)
        else:
            write_output(out_path, model, tokenizer, record, overwrite=overwrite, fmt=recipe.output.format,
                         protected=protected)
        if checkpoints is not None:
            checkpoints.discard()
    return summary(record)
