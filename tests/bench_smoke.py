"""The smoke runs of every bench/ script (`--smoke`: the same code path on a tiny random model, results
in a temporary folder, never in bench/results/), shared by the tests/test_bench_smoke_*.py files. The
scripts are split over several test files only so that `--dist loadfile` spreads them over the workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PY = sys.executable

SCRIPTS = {
    "quality.py": [PY, "bench/quality.py", "--smoke", "--recipes", "recipes/sparsegpt-unstructured-70.toml,recipes/d2prune-unstructured-70.toml",
                   "--seeds", "2"],  # the --suite path: recipe files, seeds, the ratio tables
    "attention_fidelity.py": [PY, "bench/attention_fidelity.py", "--smoke", "--methods", "sparsegpt,d2prune-kl"],
    "arch.py": [PY, "bench/arch.py", "--smoke", "--models", "minilm,digits-vit"],
    "cost.py": [PY, "bench/cost.py", "--smoke"],
    "deploy.py": [PY, "bench/deploy.py", "--smoke"],
    "zeroshot.py": [PY, "bench/zeroshot.py", "--smoke"],
    "digits_vit.py": [PY, "bench/digits_vit.py", "vit", "{tmp}/vit", "--smoke"],
    "tune_d2prune.sh": ["bash", "bench/tune_d2prune.sh", "--smoke"],
    "run_d2prune.sh": ["bash", "bench/run_d2prune.sh", "--smoke"],
    "best_options.py": [PY, "bench/best_options.py", "--smoke"],
    "scale.py": [PY, "bench/scale.py", "--smoke"],
    "dtypes.py": [PY, "bench/dtypes.py", "--smoke"],
    "gpu_check.py": [PY, "bench/gpu_check.py", "--smoke"],
    "distributed.py": [PY, "bench/distributed.py", "--smoke"],
    "onnx_large.py": [PY, "bench/onnx_large.py", "--smoke"],
    "compressed_export.py": [PY, "bench/compressed_export.py", "--smoke"],
    "ct_layout.py": [PY, "bench/ct_layout.py", "--smoke"],
    "layer_errors.py": [PY, "bench/layer_errors.py", "--smoke", "--patterns", "0.7,2:4"],
    "moe.py": [PY, "bench/moe.py", "--smoke", "--recipes", "sparsegpt-unstructured-50", "--modes", "all", "--seeds", "1"],
    "moe_solves.py": [PY, "bench/moe_solves.py", "--smoke"],
    "moe_scale.py": [PY, "bench/moe_scale.py", "--smoke", "--shape", "qwen3,deepseek"],  # deepseek: experts read by group
    "moe_allocation.py": [PY, "bench/moe_allocation.py", "--smoke", "--splits", "valid"],
}
WRITES = {"quality.py": ["quality.json", "quality.md"], "attention_fidelity.py": ["attention_fidelity.json", "attention_fidelity.png"],
          "arch.py": ["arch.json", "arch.md"], "cost.py": ["cost.json", "cost.md"], "deploy.py": ["deploy.json", "deploy.md"],
          "zeroshot.py": ["zeroshot.json", "zeroshot.md"], "tune_d2prune.sh": ["tuning.json"], "scale.py": ["scale.json", "scale.md"],
          "dtypes.py": ["dtypes.json", "dtypes.md"], "gpu_check.py": ["gpu.json", "gpu.md"],
          "distributed.py": ["distributed.json", "distributed.md"], "onnx_large.py": ["onnx_large.json", "onnx_large.md"],
          "compressed_export.py": ["compressed_tensors.json", "compressed_tensors.md"], "ct_layout.py": ["ct_layout.json", "ct_layout.md"],
          "layer_errors.py": ["layer_errors.json", "layer_errors.md"], "moe.py": ["moe.json", "moe.md"],
          "moe_solves.py": ["moe_solves.json", "moe_solves.md"], "moe_scale.py": ["moe_scale.json", "moe_scale.md"],
          "moe_allocation.py": ["moe_allocation.json", "moe_allocation.md"]}


def run_smoke(script: str, smoke_dir: Path) -> None:
    """Run one script of SCRIPTS in smoke mode; assert it succeeds, writes its results into `smoke_dir`
    with their provenance, and leaves bench/results/ untouched."""
    results = ROOT / "bench" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    env = {**os.environ, "D2C_BENCH_SMOKE": str(smoke_dir), "PY": PY}
    cmd = [part.format(tmp=smoke_dir) for part in SCRIPTS[script]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "FAILED" not in proc.stdout
    for name in WRITES.get(script, []):
        assert (smoke_dir / "results" / name).is_file(), name
        if name.endswith(".json"):
            data = json.loads((smoke_dir / "results" / name).read_text())
            prov = data["provenance"] if isinstance(data, dict) and "provenance" in data else None
            if prov is None:  # accumulating files: every record, or every model entry, carries its own
                entries = data if isinstance(data, list) else list(data["models"].values())
                prov = entries[-1]["provenance"]
            assert prov["smoke"] is True and prov["command"] and prov["commit"]
            assert prov["machine"]["cpu"] and prov["machine"]["cores"] >= 1  # timings compare only on one machine
    if script == "cost.py" and not (ROOT / ".venv-llmc").exists():
        assert "llm-compressor side skipped" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before, "a smoke run wrote into bench/results"
