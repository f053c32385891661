"""Deployment benchmark on SmolLM2-135M (not run in CI). Writes bench/results/deploy.json and .md.

1. Prunes with recipes/d2prune-2of4.toml (D²Prune 2:4, plain folder) and recipes/d2prune-2of4-w4.toml
   (the same + GPTQ int4 g128 + pack_2_4, packed checkpoint), both with the bench/quality.py protocol
   (C4 32 x 512 calibration, perplexity on the first 32 x 512 windows of WikiText-2 test).
2. Disk size of the weight files, all with fp16 floats: the dense original, the pruned model as a
   plain dense folder, the packed 2:4 checkpoint, and packed + int4. Measured on the files written.
3. Exactness: the packed checkpoints loaded with d2compiler.load give the same logits as the
   unpacked models (max abs diff, must be 0).
4. ONNX: exports the pruned model and the pruned+int4 model (QDQ), runs onnx.checker, and compares
   ONNX Runtime logits with torch (max abs diff) and CPU latency (median of repeated forwards of one
   sequence, ORT vs torch, same threads, side by side).

    python bench/deploy.py [--skip-prune] [--tokens 128] [--reps 10]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from protocol import (  # noqa: E402
    SMOKE_SEQ_LEN,
    add_smoke_flag,
    lm_source,
    pick,
    provenance,
    provenance_line,
    publish,
    smoke,
    start,
    work_dir,
)


def smoke_overrides() -> list[str]:
    """In a smoke run: the tiny model and a few short windows of the builtin corpus."""
    if not smoke():
        return []
    data = {"data.calibration.source": '"builtin:python-docs"', "data.calibration.samples": "4",
            "data.calibration.seq_len": str(SMOKE_SEQ_LEN), "data.evaluation.source": '"builtin:python-docs"',
            "data.evaluation.seq_len": str(SMOKE_SEQ_LEN), "data.evaluation.max_windows": "2"}
    return ["--model", lm_source(), *[arg for key, value in data.items() for arg in ("--set", f"{key}={value}")]]


def d2c(*args: str) -> str:
    """`d2c --quiet ARGS` in this process (no interpreter start per command); its standard output."""
    from contextlib import chdir, redirect_stderr, redirect_stdout

    from d2compiler.cli import main as d2c_main

    out, err = io.StringIO(), io.StringIO()
    with chdir(ROOT), redirect_stdout(out), redirect_stderr(err):  # recipes name data paths relative to the repository
        status = d2c_main(["--quiet", *args])
    if status:
        raise SystemExit(f"d2c {' '.join(args)} failed:\n{err.getvalue()[-3000:]}")
    return out.getvalue()


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def linear_bytes(folder: Path) -> int:
    """Bytes of the decoder linears' tensors (weights, or packed values/levels/positions/scales)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if ".layers." in key and "_proj." in key and not key.endswith(".bias"):
                    t = f.get_slice(key)
                    shape, dtype = t.get_shape(), t.get_dtype()
                    total += math.prod(shape) * {"F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I8": 1}[dtype]
    return total


def median_latency(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-prune", action="store_true", help="reuse out/deploy/* from an earlier run")
    parser.add_argument("--tokens", type=int, default=None, help="latency and exactness input length (128; smoke: 16)")
    parser.add_argument("--reps", type=int, default=None, help="latency repetitions (10; smoke: 1)")
    add_smoke_flag(parser)
    args = parser.parse_args()
    start(args.smoke)
    args.tokens, args.reps = args.tokens or pick(128, 16), args.reps or pick(10, 1)
    import numpy as np
    import onnxruntime as ort
    import torch

    import d2compiler
    from d2compiler.loading.models import load_model

    OUT = work_dir("deploy")
    pruned, w4 = OUT / "d2prune-2of4", OUT / "d2prune-2of4-w4"
    timings: dict[str, float] = {}
    if not args.skip_prune:
        for recipe, out in (("recipes/d2prune-2of4.toml", pruned), ("recipes/d2prune-2of4-w4.toml", w4)):
            begin = time.perf_counter()
            d2c("run", recipe, "--output", str(out), "--overwrite", "--restart", *smoke_overrides())
            timings[out.name] = time.perf_counter() - begin
    records = {out.name: json.loads((out / "sparsity.json").read_text()) for out in (pruned, w4)}

    # Disk sizes, all with fp16 floats.
    original = OUT / "original-fp16"
    model = load_model(lm_source(), "float32", "cpu").model.half()
    model.save_pretrained(OUT / "original-fp16-tmp", safe_serialization=True)
    if original.exists():
        subprocess.run(["rm", "-rf", str(original)], check=True)
    (OUT / "original-fp16-tmp").rename(original)
    exports = {"pruned-dense-fp16": ("hf", pruned), "pruned-packed-fp16": ("d2c-packed", pruned),
               "pruned-int4-packed-fp16": ("d2c-packed", w4)}
    sizes = {"original-dense-fp16": weight_bytes(original)}
    linear_sizes = {"original-dense-fp16": linear_bytes(original)}
    for name, (fmt, src) in exports.items():
        d2c("export", str(src), "--format", fmt, "--to", str(OUT / name), "--dtype", "float16", "--overwrite")
        sizes[name] = weight_bytes(OUT / name)
        linear_sizes[name] = linear_bytes(OUT / name)

    # Exactness of the packed checkpoints against their unpacked models.
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    exact = {}
    with torch.no_grad():
        for packed, dense in (("pruned-packed-fp16", "pruned-dense-fp16"),):
            a = d2compiler.load(OUT / dense).float()(ids).logits
            b = d2compiler.load(OUT / packed).float()(ids).logits
            exact[f"{packed} vs {dense}"] = float((a - b).abs().max())
        a = d2compiler.load(w4)(ids).logits
        d2c("export", str(w4), "--format", "hf", "--to", str(OUT / "pruned-int4-dense"), "--overwrite")
        b = d2compiler.load(OUT / "pruned-int4-dense")(ids).logits
        exact["pruned-int4-packed vs its dense folder (fp32)"] = float((a - b).abs().max())

    # ONNX: export, check, ORT vs torch logits and latency.
    onnx_rows = {}
    threads = torch.get_num_threads()
    for name, src in (("pruned", pruned), ("pruned-int4", w4)):
        summary = json.loads(d2c("export", str(src), "--format", "onnx", "--to", str(OUT / f"onnx-{name}"), "--overwrite"))
        torch_model = d2compiler.load(src)
        feed = {"input_ids": ids.numpy()}
        with torch.no_grad():
            reference = torch_model(ids).logits.numpy()
            torch_s = median_latency(lambda m=torch_model: m(ids), args.reps)
        # ORT's default fuses DequantizeLinear+MatMul into MatMulNBits with int8 activations;
        # accuracy level 0 keeps fp32 activations (exact)
        for variant, level in (("ORT default", None), ("ORT fp32 activations", "0")):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            if level is not None:
                options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
            session = ort.InferenceSession(summary["path"], options, providers=["CPUExecutionProvider"])
            ort_logits = session.run(None, feed)[0]
            ort_s = median_latency(lambda s=session, f=feed: s.run(None, f), args.reps)
            onnx_rows[f"{name}, {variant}"] = {**summary, "max_abs_diff": float(np.abs(reference - ort_logits).max()),
                                               "torch_ms": 1000 * torch_s, "ort_ms": 1000 * ort_s, "ort_speedup": torch_s / ort_s}
            if summary["quantized"] == 0:
                break  # no QDQ: both variants are the same graph
    sparse = json.loads(d2c("export", str(pruned), "--format", "onnx", "--to", str(OUT / "onnx-pruned-sparse"),
                            "--sparse-initializers", "--overwrite"))
    onnx_rows["pruned (sparse_initializer)"] = {**sparse}

    record = {
        "protocol": {"model": pick("SmolLM2-135M-Instruct", "tiny random Llama (smoke)"),
                     "calibration": pick("c4 first 32 x 512", f"python-docs first 4 x {SMOKE_SEQ_LEN}"),
                     "evaluation": pick("wikitext-2 test first 32 x 512", f"python-docs first 2 x {SMOKE_SEQ_LEN}"), "latency": f"1 x {args.tokens} tokens, median of {args.reps}",
                     "threads": threads, "onnxruntime": ort.__version__, "torch": torch.__version__},
        "perplexity": {name: r["results"]["pruned_ppl"] for name, r in records.items()}
        | {"dense": records[pruned.name]["results"]["dense_ppl"]},
        "prune_wall_s": timings, "sizes_bytes": sizes,
        "size_ratio_vs_pruned_dense_fp16": {k: v / sizes["pruned-dense-fp16"] for k, v in sizes.items()},
        "linear_bytes": linear_sizes,
        "linear_ratio_vs_pruned_dense_fp16": {k: v / linear_sizes["pruned-dense-fp16"] for k, v in linear_sizes.items()},
        "exactness_max_abs_diff": exact, "onnx": onnx_rows,
    }
    record["provenance"] = provenance()
    publish("deploy", record, markdown(record))
    return 0


def markdown(r: dict[str, Any]) -> str:
    p = r["protocol"]
    lines = ["# Deployment benchmark: SmolLM2-135M", "", provenance_line(r.get("provenance")), "",
             f"Generated by `python bench/deploy.py`. Calibration {p['calibration']}; perplexity on {p['evaluation']}; "
             f"latency {p['latency']}, {p['threads']} threads, onnxruntime {p['onnxruntime']}, torch {p['torch']}.", "",
             "## Perplexity", "", "| model | ppl |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["perplexity"].items() if v is not None]
    lines += ["", "## Disk size (fp16 floats)", "",
              "Whole weight file, and the decoder linears' tensors alone (the embedding table, 28% of the dense file, is not packed).", "",
              "| checkpoint | file bytes | vs pruned dense fp16 | linear tensors, bytes | vs pruned dense fp16 |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v:,} | {r['size_ratio_vs_pruned_dense_fp16'][k]:.3f} | {r['linear_bytes'][k]:,} | "
              f"{r['linear_ratio_vs_pruned_dense_fp16'][k]:.3f} |" for k, v in r["sizes_bytes"].items()]
    lines += ["", "## Exactness (max abs logit difference)", "", "| comparison | max abs diff |", "|---|---|"]
    lines += [f"| {k} | {v:g} |" for k, v in r["exactness_max_abs_diff"].items()]
    lines += ["", "## ONNX", "", "| model | file bytes | quantized initializers | sparse initializers | max abs diff vs torch | torch ms | ORT ms | ORT speedup |",
              "|---|---|---|---|---|---|---|---|"]
    for k, v in r["onnx"].items():
        lines.append(f"| {k} | {v['bytes']:,} | {v['quantized']} | {v['sparse_initializers']} | {v.get('max_abs_diff', float('nan')):.3g} | "
                     f"{v.get('torch_ms', float('nan')):.1f} | {v.get('ort_ms', float('nan')):.1f} | {v.get('ort_speedup', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
