"""ONNX export of a model past protobuf's 2 GiB limit (issue: ONNX of any size). Not run in CI.

1. The synthetic 12-layer Llama of bench/scale.py (random bf16 weights, ~0.68B parameters, 2.7 GB
   in float32) is pruned 2:4 by magnitude in a streaming run (its own process).
2. `d2c export OUT --format onnx` (its own process): the float32 graph's weights exceed 1 GiB, so they
   go to `model.onnx.data` (external data); `onnx.checker` runs on the path inside the export.
3. ONNX Runtime (CPU, fp32) runs one 16-token sequence (its own process); the logits are compared
   with the pruned model in PyTorch.

Recorded: file sizes, wall time and peak RSS of each step, the largest logit difference.
Results: bench/results/onnx_large.{json,md}.

    python bench/onnx_large.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import protocol  # noqa: E402
from scale import sizes, synthetic_folder  # noqa: E402

MODEL = "llama-12"
TOKENS = 16


def prune_job(source: str, out: str) -> None:
    """Streaming 2:4 magnitude pruning; prints `RESULT {...}`."""
    from d2compiler.driver.pipeline import compress
    from d2compiler.execution.memory import peak_rss_mb
    from d2compiler.recipe.schema import validate_recipe

    start = time.perf_counter()
    recipe = validate_recipe({
        "version": 1, "model": {"source": source, "dtype": "float32", "device": "cpu", "streaming": True},
        "data": {"calibration": {"source": "builtin:python-docs", "samples": 1, "seq_len": 16}},
        "passes": [{"type": "magnitude", "mask_structure": "2:4"}],
        "output": {"path": out, "resume": False},
    })
    summary = compress(recipe, quiet=True, overwrite=True)  # the benchmark's own work folder
    print("RESULT " + json.dumps({"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
                                  "sparsity": summary.sparsity}), flush=True)


def export_job(pruned: str, onnx_dir: str) -> None:
    """`d2c export --format onnx`; prints `RESULT {...}` with the export's summary."""
    from d2compiler.cli import main
    from d2compiler.execution.memory import peak_rss_mb

    start = time.perf_counter()
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        status = main(["--quiet", "export", pruned, "--format", "onnx", "--to", onnx_dir, "--overwrite",
                       "--external-data", protocol.pick("auto", "always")])  # a smoke model is small: force the path
    if status:
        raise SystemExit(f"d2c export failed with status {status}")
    print("RESULT " + json.dumps({"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
                                  **json.loads(out.getvalue().strip().splitlines()[-1])}), flush=True)


def check_job(pruned: str, onnx_dir: str) -> None:
    """ONNX Runtime vs PyTorch logits on one sequence; prints `RESULT {...}`."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import d2compiler
    from d2compiler.execution.memory import peak_rss_mb

    model = d2compiler.load(pruned)
    ids = torch.randint(0, model.config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    del model
    start = time.perf_counter()
    session = ort.InferenceSession(str(Path(onnx_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    print("RESULT " + json.dumps({"ort_load_s": load_s, "max_abs_diff": float(np.abs(got - want).max()),
                                  "logit_scale": float(np.abs(want).max()), "peak_rss_mb": peak_rss_mb()}), flush=True)


def step(flag: str, job: Any, *args: str) -> dict[str, Any]:
    """One step in its own process (its own wall time and peak RSS); in a smoke run, in this one (the
    same code, without an interpreter start per step)."""
    if not protocol.smoke():
        return protocol.run_job([sys.executable, __file__, flag, *args])[0]
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        job(*args)
    return json.loads(out.getvalue().strip().splitlines()[-1].removeprefix("RESULT "))


def markdown(record: dict[str, Any]) -> str:
    m, p, e, c = record["model"], record["prune"], record["export"], record["check"]
    gib = 2**30
    return "\n".join([
        "# ONNX export past the 2 GiB protobuf limit", "", protocol.provenance_line(record["provenance"]), "",
        f"Model: synthetic Llama ({MODEL} of bench/scale.py: random weights, {m['parameters'] / 1e6:.0f}M parameters, "
        f"{m['fp32_mb'] * 2**20 / gib:.2f} GiB in float32), pruned 2:4 by magnitude (sparsity {p['sparsity']:.3f}), exported in float32.",
        "", "| step | wall (s) | peak RSS (MiB) | result |", "|---|---|---|---|",
        f"| prune (streaming) | {p['wall_s']:.1f} | {p['peak_rss_mb']:.0f} | sparsity {p['sparsity']:.3f} |",
        f"| `d2c export --format onnx` (checker included) | {e['wall_s']:.1f} | {e['peak_rss_mb']:.0f} | model.onnx "
        f"{e['bytes'] / 2**20:.1f} MiB + model.onnx.data {e['external_data_bytes'] / gib:.2f} GiB |",
        f"| ONNX Runtime load + 1x{TOKENS} forward vs PyTorch | {c['ort_load_s']:.1f} (load) | {c['peak_rss_mb']:.0f} | "
        f"max abs logit diff {c['max_abs_diff']:.2e} (largest logit {c['logit_scale']:.2f}) |",
        "", "The weights went to external data because they pass 1 GiB (`--external-data auto`); a single protobuf "
        "cannot hold more than 2 GiB.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol.add_smoke_flag(parser)
    parser.add_argument("--prune-job", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--export-job", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--check-job", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag, job in (("prune_job", prune_job), ("export_job", export_job), ("check_job", check_job)):
        if getattr(args, flag):
            return job(*getattr(args, flag))
    protocol.start(args.smoke)
    folder = synthetic_folder(MODEL)
    work = protocol.work_dir("onnx-large")
    pruned, onnx_dir = str(work / "pruned"), str(work / "onnx")
    record: dict[str, Any] = {"model": sizes(folder)}
    record["prune"] = step("--prune-job", prune_job, str(folder), pruned)
    record["export"] = step("--export-job", export_job, pruned, onnx_dir)
    record["check"] = step("--check-job", check_job, pruned, onnx_dir)
    record["provenance"] = protocol.provenance()
    protocol.publish("onnx_large", record, markdown(record))


if __name__ == "__main__":
    main()
