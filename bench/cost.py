"""Cost benchmark: the same SparseGPT-50% job in d2compiler and in llm-compressor, side by side in
one run (not run in CI). Writes bench/results/cost.json and cost.md.

Protocol: SmolLM2-135M (the cached safetensors folder of builtin:smollm2-135m, fp32, CPU), the
first 32 x 512 tokens of ../shared/data/c4 as calibration (the *same token windows* are handed to
both tools), SparseGPT at 50% unstructured on every linear of the decoder layers (lm_head kept),
block size 128, dampening 0.01. Each tool runs in its own process (llm-compressor in its own
virtual environment, `.venv-llmc`, with torch==2.13.0: see --setup-llmc); both outputs are then
scored on the same first 32 windows of WikiText-2 test.

Reported: wall time of each job (process start to saved model, and the compression step alone),
the ratio, peak RSS, perplexities, d2compiler's per-block breakdown (dense observe forward,
statistics, mask + update, re-forward), the `d2c plan` estimate next to the measured numbers, and
the physical floor: two forward passes of the dense model over the calibration tokens.

The calibration windows reach d2compiler as a documented recipe data source: a `.safetensors` file
of pre-tokenized `input_ids` (windows, seq_len), the same file llm-compressor reads.

    python bench/cost.py [--setup-llmc] [--smoke]

`--smoke` runs the same code on a tiny random Llama (bench/protocol.py) and skips the llm-compressor
side unless .venv-llmc exists; results go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import protocol  # noqa: E402

LLMC_VENV = ROOT / ".venv-llmc"


def setup_llmc() -> None:
    """Create .venv-llmc: torch==2.13.0 first (the CPU wheel), then llm-compressor."""
    subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
    pip = [str(LLMC_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "llmcompressor==0.14.0.1"], check=True)


def job_recipe(model_dir: str, ids_file: str, samples: int, length: int, out_dir: str) -> Any:
    """The d2compiler job: calibration from the pre-tokenized windows file both tools read."""
    from d2compiler.recipe.schema import validate_recipe

    return validate_recipe({
        "version": 1, "model": {"source": model_dir, "dtype": "float32", "device": "cpu"},
        "data": {"calibration": {"source": ids_file, "samples": samples, "seq_len": length}},
        "passes": [{"type": "calibrate", "hessian": True},
                   {"type": "sparsegpt", "sparsity": 0.5, "block_size": 128, "dampening_frac": 0.01}],
        "output": {"path": out_dir, "resume": False},
    })


def _windows_shape(ids_file: str) -> tuple[int, int]:
    from safetensors import safe_open

    with safe_open(ids_file, "pt") as f:
        rows, length = f.get_slice("input_ids").get_shape()
    return rows, length


def plan_job(model_dir: str, ids_file: str, out_dir: str) -> None:
    """`d2c plan`'s estimate of the same job, in a fresh process (so its memory baseline is clean)."""
    from d2compiler.driver.plan import make_plan, plan_summary

    print("RESULT " + json.dumps(plan_summary(make_plan(job_recipe(model_dir, ids_file, *_windows_shape(ids_file), out_dir)))),
          flush=True)


def d2c_job(model_dir: str, ids_file: str, out_dir: str) -> None:
    """The d2compiler side (run in a subprocess of this script): prints `RESULT {...}`."""
    start = time.perf_counter()
    import torch

    from d2compiler.driver.pipeline import compress
    from d2compiler.loading.models import load_model

    recipe = job_recipe(model_dir, ids_file, *_windows_shape(ids_file), out_dir)
    loaded = load_model(model_dir, "float32", "cpu")
    t0 = time.perf_counter()
    summary = compress(recipe, loaded=loaded, quiet=True)
    compress_s = time.perf_counter() - t0
    phases = protocol.phase_seconds(summary.record)
    print("RESULT " + json.dumps({"compress_s": compress_s, "prune_s": summary.prune_s, "total_s": time.perf_counter() - start,
                                  "threads": torch.get_num_threads(), "peak_rss_mb": summary.peak_rss_mb, "phases_s": phases}),
          flush=True)


def dense_forward_s(model_dir: str, ids_file: str) -> float:
    """One dense forward pass of the whole model over the calibration windows (the floor's unit)."""
    import torch
    from safetensors.torch import load_file

    from d2compiler.loading.models import load_model

    model = load_model(model_dir, "float32", "cpu").model.eval()
    ids = load_file(ids_file)["input_ids"]
    with torch.no_grad():
        model(ids[:1])
        start = time.perf_counter()
        for i in range(ids.shape[0]):
            model.model(ids[i : i + 1])  # the decoder only: pruning never needs the vocabulary projection
    return time.perf_counter() - start


def gram_s(model_dir: str, ids_file: str) -> dict[str, float]:
    """The statistics' own arithmetic: the Gram products XᵀX a SparseGPT job accumulates (per decoder
    layer: q/k/v's, o's and gate/up's inputs of width hidden, down's of width intermediate), over
    random inputs of the calibration windows' shape; as `passes.gram.Gram` computes them (upper block
    triangle per sample, summed in float64) and as one full float32 product accumulated in place."""
    import torch
    from transformers import AutoConfig

    from passes.gram import Gram

    config = AutoConfig.from_pretrained(model_dir)
    rows, length = _windows_shape(ids_file)
    widths = [config.hidden_size] * 3 + [config.intermediate_size]
    inputs = {d: torch.randn(length, d) for d in set(widths)}
    out = {}
    makers = {"triangle": (Gram, lambda g, x: g.add(x)), "full": (lambda d: torch.zeros(d, d), lambda g, x: g.addmm_(x.t(), x))}
    for name, (make, step) in makers.items():
        grams = {d: make(d) for d in set(widths)}
        start = time.perf_counter()
        for _layer in range(config.num_hidden_layers):
            for _window in range(rows):
                for d in widths:
                    step(grams[d], inputs[d])
        out[name] = time.perf_counter() - start
    return out


def perplexity_of(folder: str, windows: list[Any]) -> float:
    import torch

    from d2compiler.evaluation.evaluate import perplexity
    from d2compiler.execution.runner import ModelRunner
    from d2compiler.loading.models import load_model

    return perplexity(ModelRunner(load_model(folder, "float32", "cpu").model, torch.device("cpu")), windows, quiet=True)


def sparsity_of(folder: str) -> float:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / "model.safetensors"))
    chosen = [t for n, t in tensors.items() if ".layers." in n and n.endswith("proj.weight")]
    return sum(int((t == 0).sum()) for t in chosen) / sum(t.numel() for t in chosen)


def solve_s(d: dict[str, Any]) -> float:
    """Seconds d2compiler spent in the pruning passes themselves (every phase but observe, propagate and
    the statistics pass)."""
    return sum(v for k, v in d["phases_s"].items() if k not in ("observe", "propagate", "calibrate", "total"))


def markdown(r: dict[str, Any]) -> str:
    d, m = r["d2compiler"], r.get("llm_compressor")
    p = r["protocol"]
    rows = [
        ("job wall time (process start to saved model), s", d["wall_s"], m and m["wall_s"]),
        ("compression step, s", d["compress_s"], m and m["oneshot_s"]),
        ("peak RSS, MiB", d["peak_rss_mb"], m and m["peak_rss_mb"]),
        (f"{p['evaluation']} perplexity", d["ppl"], m and m["ppl"]),
        ("sparsity of the decoder linears", d["sparsity"], m and m["sparsity"]),
    ]
    lines = [f"# Cost: SparseGPT 50% on {p['model']}, d2compiler vs llm-compressor", "",
             protocol.provenance_line(r.get("provenance")), "",
             f"CPU, one run, side by side. Same model folder, the same {p['calibration']} calibration token windows "
             "(one pre-tokenized safetensors file read by both tools), lm_head kept dense, block size 128, dampening 0.01.", ""]
    if m:
        lines += [f"llm-compressor {m['version']} (torch {m['torch']}, own venv); d2compiler {r['d2compiler_version']}.", ""]
    else:
        lines += [f"llm-compressor side skipped: {r['llm_compressor_skipped']}", ""]
    lines += ["| quantity | d2compiler | llm-compressor |", "|---|---|---|"]
    lines += [f"| {name} | {a:.3f} | {'-' if b is None else f'{b:.3f}'} |" for name, a, b in rows]
    if m:
        lines += ["", f"**Wall-time ratio (d2compiler / llm-compressor): job {r['ratio_wall']:.3f}, compression step "
                  f"{r['ratio_compress']:.3f}.**"]
    lines += ["", "## d2compiler per-phase time (sum over blocks)", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in d["phases_s"].items()]
    f = r["floor"]
    lines += ["", "## Physical floor", "",
              f"One dense forward pass of the decoder over the calibration tokens: {f['one_forward_s']:.2f} s; "
              f"the floor (two passes: statistics, then propagation) is {f['floor_s']:.2f} s. d2compiler's pruning "
              f"time is {d['prune_s']:.2f} s = {f['ours_over_floor']:.2f}x the floor.", "",
              *([f"Half of llm-compressor's job time is {m['wall_s'] / 2:.2f} s; the two forward passes plus this run's "
                 f"mask-and-update solves alone take {f['floor_s'] + solve_s(d):.2f} s, before loading and saving."] if m else []),
              "",
              "## Observe phase vs a plain forward", "",
              f"**observe / plain forward = {r['observe_over_forward']:.3f}** ({d['phases_s']['observe']:.2f} s / "
              f"{f['one_forward_s']:.2f} s): the observe phase is the dense forward of every block with the statistics "
              "hooks on. The statistics' own arithmetic, the Gram products XᵀX over the same token count timed alone, "
              f"is {f['gram_triangle_s']:.2f} s as accumulated (upper block triangle, `passes/gram.py`; "
              f"{f['gram_full_s']:.2f} s as one full product), so the ratio cannot go below "
              f"{1 + f['gram_triangle_s'] / f['one_forward_s']:.2f} with exact fp32 Hessians on this model's shapes.", "",
              "## `d2c plan` estimate vs measured", "", "| quantity | estimate | measured |", "|---|---|---|",
              f"| pruning time, s | {d['plan']['estimate_s']['total']:.1f} | {d['prune_s']:.1f} |",
              f"| peak RSS, MiB | {d['plan']['estimate_mb']['peak (sum)']:.0f} | {d['peak_rss_mb']:.0f} |", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup-llmc", action="store_true", help="create .venv-llmc first")
    parser.add_argument("--d2c-job", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--plan-job", nargs=3, help=argparse.SUPPRESS)
    protocol.add_smoke_flag(parser)
    args = parser.parse_args()
    protocol.start(args.smoke)
    if args.d2c_job:
        d2c_job(*args.d2c_job)
        return 0
    if args.plan_job:
        plan_job(*args.plan_job)
        return 0
    has_llmc = (LLMC_VENV / "bin" / "python").exists()
    if args.setup_llmc or (not has_llmc and not args.smoke):
        setup_llmc()
        has_llmc = True
    import torch
    from safetensors.torch import save_file

    import d2compiler
    from d2compiler.evaluation.data import calibration_windows, evaluation_windows, load_text, tokenize
    from d2compiler.loading.models import load_model

    samples, windows_n, length = protocol.pick(32, 4), protocol.pick(32, 2), protocol.seq_len()
    model_dir = protocol.lm_source()
    if model_dir.startswith("builtin:"):
        from d2compiler.loading.models import builtin_smollm2_folder

        model_dir = str(builtin_smollm2_folder())
    tokenizer = load_model(model_dir, "float32", "cpu").tokenizer
    windows = calibration_windows(tokenize(tokenizer, load_text(protocol.calibration_source(), "calibration")), samples, length)
    eval_windows = evaluation_windows(tokenize(tokenizer, load_text(protocol.evaluation_source("test"), "evaluation")), length, windows_n)
    theirs: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="d2c-cost-") as tmp:
        ids_file = str(Path(tmp) / "ids.safetensors")
        save_file({"input_ids": torch.cat(windows).contiguous()}, ids_file)
        one_forward = dense_forward_s(model_dir, ids_file)
        grams = gram_s(model_dir, ids_file)
        ours, ours_wall = protocol.run_job([sys.executable, __file__, "--d2c-job", model_dir, ids_file, f"{tmp}/d2c"])
        if has_llmc:
            theirs, theirs_wall = protocol.run_job([str(LLMC_VENV / "bin" / "python"), str(ROOT / "bench" / "llmc_job.py"), model_dir,
                                           ids_file, f"{tmp}/llmc"])
        else:
            print(f"llm-compressor side skipped: {LLMC_VENV} is absent (python bench/cost.py --setup-llmc creates it)", flush=True)
        ours["plan"], _ = protocol.run_job([sys.executable, __file__, "--plan-job", model_dir, ids_file, f"{tmp}/plan"])
        ours.update({"wall_s": ours_wall, "ppl": perplexity_of(f"{tmp}/d2c", eval_windows), "sparsity": sparsity_of(f"{tmp}/d2c")})
        if theirs is not None:
            theirs.update({"wall_s": theirs_wall, "ppl": perplexity_of(f"{tmp}/llmc", eval_windows),
                           "sparsity": sparsity_of(f"{tmp}/llmc")})
    record: dict[str, Any] = {
        "protocol": {"model": protocol.pick("SmolLM2-135M-Instruct (fp32, CPU)", "tiny random Llama (smoke)"),
                     "calibration": f"{protocol.pick('c4', 'python-docs')} first {samples} x {length}",
                     "evaluation": f"{protocol.pick('WikiText-2 test', 'python-docs evaluation part')} first {windows_n} x {length}",
                     "method": "SparseGPT 50%, bs 128, damp 0.01", "threads": torch.get_num_threads()},
        "d2compiler_version": d2compiler.__version__,
        "d2compiler": ours, "llm_compressor": theirs,
        "floor": {"one_forward_s": one_forward, "floor_s": 2 * one_forward, "ours_over_floor": ours["prune_s"] / (2 * one_forward),
                  "gram_triangle_s": grams["triangle"], "gram_full_s": grams["full"]},
        "observe_over_forward": ours["phases_s"]["observe"] / one_forward,
        "provenance": protocol.provenance(),
    }
    if theirs is not None:
        record |= {"ratio_wall": ours["wall_s"] / theirs["wall_s"], "ratio_compress": ours["compress_s"] / theirs["oneshot_s"]}
    else:
        record["llm_compressor_skipped"] = f"{LLMC_VENV.name} is absent"
    protocol.publish("cost", record, markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
