"""What a run did, block by block and layer by layer (the executor's report, kept in checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from d2compiler.graph.coverage import Coverage
from d2compiler.graph.layers import fused_role, split_slice_name
from d2compiler.recipe.pass_base import PassResult


@dataclass
class BlockReport:
    index: int
    name: str
    times: dict[str, float]
    results: list[tuple[str, PassResult]]
    memory: dict[str, float] = field(default_factory=dict)
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "times": self.times, "memory": self.memory,
                "results": [[name, {"modified": r.modified, "layers": r.layers, "info": r.info}] for name, r in self.results]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BlockReport:
        results = [(name, PassResult(r["modified"], r["layers"], r["info"])) for name, r in data["results"]]
        return cls(data["index"], data["name"], data["times"], results, data.get("memory", {}), resumed=True)


def merge_results(parts: dict[int, list[tuple[str, PassResult]]]) -> list[tuple[str, PassResult]]:
    """One result per scheduled pass (by position, in order) from the results of each group of
    experts (`execution.expert_groups`): modified if any group modified, the layers of every group,
    later info winning. Folded once the block is done: a pass may still add to a result it returned
    (the calibration tokens of a later observation)."""
    out = []
    for position in sorted(parts):
        name, first = parts[position][0]
        merged = PassResult(first.modified, dict(first.layers), dict(first.info))
        for _name, result in parts[position][1:]:
            merged.modified |= result.modified
            merged.layers.update(result.layers)
            merged.info.update(result.info)
        out.append((name, merged))
    return out


@dataclass
class ExecutionReport:
    blocks_path: str
    num_blocks: int
    blocks: list[BlockReport]
    roles: dict[str, str]
    coverage: Coverage | None = None

    @classmethod
    def combine(cls, parts: list[ExecutionReport]) -> ExecutionReport:
        """One report for a run over several stacks (`model.blocks`), the stacks in order."""
        if len(parts) == 1:
            return parts[0]
        roles = {name: role for part in parts for name, role in part.roles.items()}
        coverages = [p.coverage for p in parts if p.coverage is not None]
        return cls(", ".join(p.blocks_path for p in parts), sum(p.num_blocks for p in parts), [b for p in parts for b in p.blocks],
                   roles, Coverage.combine(coverages) if coverages else None)

    def layer_metrics(self) -> dict[str, dict[str, Any]]:
        """Per module: the metrics of every pass that touched it (later passes win on conflicts). The
        slices of a fused linear merge into their module's entry (see `merge_slices`)."""
        out: dict[str, dict[str, Any]] = {}
        for block in self.blocks:
            for pass_name, result in block.results:
                for layer, metrics in result.layers.items():
                    entry = out.setdefault(layer, {"block": block.index})
                    entry.update(metrics)
                    if pass_name not in entry.setdefault("passes", []):
                        entry["passes"].append(pass_name)
        return merge_slices(out)


def merge_slices(layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fold `name[role]` entries into one `name` entry keyed by the module (what exporters address):
    role `qkv` (or `gate_up`, see `layers.fused_role`), the stacked shape, the row-weighted sparsity, and each slice's own metrics under
    `slices`."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in layers.items():
        module, role = split_slice_name(name)
        merged = out.setdefault(module, {"block": entry["block"], "passes": []})
        passes = merged["passes"] + [p for p in entry.get("passes", []) if p not in merged["passes"]]
        if role:
            merged.setdefault("slices", {})[role] = entry
            merged["role"] = fused_role(role)
            merged.update({key: entry[key] for key in ("quant", "packed", "transposed") if key in entry})
        else:
            merged.update(entry)
        merged["passes"] = passes
    for entry in out.values():
        parts = [s for s in entry.get("slices", {}).values() if "shape" in s]
        if parts:
            rows = sum(s["shape"][0] for s in parts)
            entry["shape"] = [rows, parts[0]["shape"][1]]
            entry["sparsity"] = sum(s["sparsity"] * s["shape"][0] for s in parts if "sparsity" in s) / rows
    return out
