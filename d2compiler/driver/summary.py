"""What a run reports: the terminal summary (`RunSummary`) and the `sparsity.json` record, with
the pass-declared fields (refused when they would overwrite a core key) and the sha256 of every
local data file the calibration and the evaluation read."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from d2compiler.errors import PassError
from d2compiler.evaluation.evaluate import Metric
from d2compiler.evaluation.provenance import data_files
from d2compiler.execution.checkpoint import file_sha256
from d2compiler.execution.distributed import Group
from d2compiler.execution.memory import peak_rss_mb
from d2compiler.execution.report import ExecutionReport
from d2compiler.export.metadata import overall_sparsity, sparsity_record
from d2compiler.loading.dtypes import dtype_name
from d2compiler.loading.models import LoadedModel
from d2compiler.recipe.pass_base import Pass

if TYPE_CHECKING:
    from d2compiler.driver.pipeline import Job, Pruned


@dataclass
class Measured:
    """The evaluation metric and its dense and pruned values (None without evaluation)."""

    metric: Metric | None
    dense: float | None
    pruned: float | None
    baseline: dict[str, Any] | None = None  # `data.evaluation.baseline`'s run: type, pattern, metric, value, prune_s

    @property
    def name(self) -> str | None:
        return None if self.metric is None else self.metric.name


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
    baseline: dict[str, Any] | None = None  # `data.evaluation.baseline`'s run (`Measured.baseline`)

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
            *([(f"{self.baseline['type']} {label} (same data)", _fmt(self.baseline["value"]))] if self.baseline else []),
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
            at = [k for k, _ in rows].index("pruned layers")
            rows.insert(at, ("parameters targeted", f"{coverage.share:.1%} of {coverage.total:,}"))
        if self.output is not None:
            rows.append(("output", str(self.output)))
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 2 + max(len(v) for _, v in rows))
        return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_summary(job: Job, start: float, measured: Measured, pruned: Pruned, layers: dict[str, dict[str, Any]],
                record: dict[str, Any], block_sparsity: float | None) -> RunSummary:
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if job.group.device.type == "cuda" else None
    return RunSummary(
        output=job.out_path if job.main else None, metric=measured.name, dense_value=measured.dense, pruned_value=measured.pruned,
        sparsity=overall_sparsity(layers), wall_s=time.perf_counter() - start, prune_s=pruned.prune_s, peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=peak_cuda, layers=layers, execution=pruned.execution, record=record, rank=job.group.rank,
        block_sparsity=block_sparsity, baseline=measured.baseline)


def data_digests(source: str) -> dict[str, str]:
    """sha256 of every local file a data source reads (a file, or the module a builtin corpus lives in)."""
    return {str(path): file_sha256(path) for path in data_files(source)}


def run_results(recipe: BaseModel, measured: Measured, pruned: Pruned, block_sparsity: float | None,
                storage: torch.dtype | None) -> dict[str, Any]:
    """The `results` of the record: the metric, the data (with its files' sha256), time and dtypes."""
    cal, ev, metric, name = recipe.data.calibration, recipe.data.evaluation, measured.metric, measured.name
    return {
        "metric": name,
        "dense": measured.dense,
        "pruned": measured.pruned,
        "dense_ppl": measured.dense if name == "perplexity" else None,
        "pruned_ppl": measured.pruned if name == "perplexity" else None,
        "calibration": {"source": cal.source, "samples": cal.samples, "seq_len": cal.seq_len, "sampling": cal.sampling,
                        "offset": cal.offset, "seed": cal.seed, "batch_size": cal.batch_size,
                        "sha256": data_digests(cal.source)},
        "evaluation": None if metric is None else {"source": ev.source, "seq_len": ev.seq_len, "metric": name,
                                                   "higher_is_better": metric.higher_is_better, "count": metric.count,
                                                   "sha256": data_digests(ev.source)},
        "prune_s": round(pruned.prune_s, 3),
        "device": str(pruned.device),
        "block_weight_sparsity": block_sparsity,
        "coverage": None if pruned.execution.coverage is None else pruned.execution.coverage.record(),
        "compute_dtype": dtype_name(pruned.compute),
        "storage_dtype": dtype_name(storage or pruned.compute),
        **({"baseline": measured.baseline} if measured.baseline else {}),
    }


def run_record(recipe: BaseModel, schedule: list[Pass], loaded: LoadedModel, measured: Measured, pruned: Pruned,
               layers: dict[str, dict[str, Any]], block_sparsity: float | None, sha256: str | None, group: Group) -> dict[str, Any]:
    """The `sparsity.json` record of a run, with what each pass declares (`record_fields`,
    `report_figures`); a pass field that would overwrite a core key (or another pass's) is refused."""
    execution = pruned.execution
    entries = [*layers.values(), *(part for entry in layers.values() for part in entry.get("slices", {}).values())]
    patterns = sorted({entry["pattern"] for entry in entries if "pattern" in entry})  # as the pruning passes report them
    blocks = [{"index": b.index, "name": b.name, "times_s": b.times, "memory": b.memory, "resumed": b.resumed,
               "passes": {name: r.info for name, r in b.results if r.info}} for b in execution.blocks]
    results = run_results(recipe, measured, pruned, block_sparsity, loaded.storage_dtype)
    record = sparsity_record(model=loaded.model, recipe=recipe.model_dump(mode="json"), layers=layers, patterns=patterns,
                             blocks=blocks, results=results, sha256=sha256)
    owners = dict.fromkeys([*record, "figures"], "d2compiler")
    for p in schedule:
        fields = p.record_fields(blocks)
        for key in fields:
            if key in owners:
                raise PassError(f"pass '{p.name}': record_fields returned the key '{key}', which {owners[key]} already "
                                "writes to sparsity.json; name it after the pass")
            owners[key] = f"pass '{p.name}'"
        record.update(fields)
        record.setdefault("figures", []).extend(p.report_figures(blocks))
    if group.size > 1:
        record["results"].update(processes=group.size, bytes_all_reduced=group.bytes_reduced, bytes_broadcast=group.bytes_broadcast)
    return record
