"""GPU check, one command (about 8 minutes on one H200): the CUDA path, measured against the CPU.

1. the tests marked `cuda` (executor and every pass on CUDA vs CPU, packed 2:4 matmul vs dense,
   streaming evaluation), which must all pass (not skip);
2. `d2c run` of SparseGPT and D²Prune-KL at 60% on a seeded synthetic model of SmolLM2-135M's shapes
   (30 layers, hidden 576, 9 heads / 3 KV heads, intermediate 1536, vocabulary 49152: the real GGUF
   cannot travel to the GPU machine), in float32 and bfloat16, on CUDA and on the CPU with identical
   weights: perplexity on CUDA must be within 1% of the CPU run; the pruning wall time per phase;
3. the same for a seeded synthetic Mixture-of-Experts (Qwen3-MoE layout: 3-D expert banks, 8 layers
   of hidden 576, 8 experts of intermediate 768, top-2): SparseGPT at 60% in float32, every expert
   pruned on its routed tokens, CUDA within 1% of the CPU;
4. `Packed24Linear` (CUDA semi-structured sparse) vs a dense matmul for 4096x4096 and 11008x4096
   fp16 weights at 1, 16 and 2048 tokens.

Writes bench/results/gpu.{json,md}. Without a CUDA device it stops at once with exit status 2: it
never falls back to the CPU. `--smoke` runs the same steps on the CPU on a tiny model (CPU vs CPU),
results in a temporary folder, so the script cannot rot where there is no GPU.

    python bench/gpu_check.py [--smoke]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import protocol  # noqa: E402

SMOLLM2_SHAPE = dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)
TINY_SHAPE = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512)
MOE_SHAPE = dict(layers=8, hidden=576, intermediate=1536, moe_intermediate=768, experts=8, top_k=2, heads=9, kv_heads=3,
                 vocab=49152)
TINY_MOE_SHAPE = dict(layers=2, hidden=64, intermediate=128, moe_intermediate=32, experts=4, top_k=2, heads=4, kv_heads=2,
                      vocab=512)
METHODS = {
    "sparsegpt": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.6}],
    "d2prune-kl": [{"type": "calibrate"}, {"type": "attention_kl_update", "strategy": "kl"},
                   {"type": "dual_taylor_mask", "sparsity": 0.6, "lambda1": 100.0}],
}
MATMULS = [(4096, 4096), (11008, 4096)]
TOKENS = [1, 16, 2048]


def synthetic_model() -> Path:
    import transformers

    from d2compiler.evaluation.synthetic import save_random_model, tiny_tokenizer

    shape = protocol.pick(SMOLLM2_SHAPE, TINY_SHAPE)
    folder = protocol.work_dir("gpu") / "synthetic-smollm2-shape"
    if not (folder / "config.json").is_file():
        tokenizer = tiny_tokenizer()
        config = transformers.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                                          num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                          num_key_value_heads=shape["kv_heads"], tie_word_embeddings=True)
        save_random_model(config, folder, tokenizer)
    return folder


def synthetic_moe() -> Path:
    """A seeded random Qwen3-MoE-layout model (3-D expert banks), written once to the work folder."""
    import transformers

    from d2compiler.evaluation.synthetic import save_random_model, tiny_tokenizer

    shape = protocol.pick(MOE_SHAPE, TINY_MOE_SHAPE)
    folder = protocol.work_dir("gpu") / "synthetic-moe"
    if not (folder / "config.json").is_file():
        config = transformers.Qwen3MoeConfig(
            vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
            moe_intermediate_size=shape["moe_intermediate"], num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
            head_dim=shape["hidden"] // shape["heads"], tie_word_embeddings=True)
        save_random_model(config, folder, tiny_tokenizer())
    return folder


def cuda_tests() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=ROOT)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"returncode": proc.returncode, "summary": summary}


def prune(model: Path, method: str, dtype: str, device: str, out: Path) -> dict[str, Any]:
    from d2compiler.driver.pipeline import compress
    from d2compiler.recipe.schema import validate_recipe

    samples, seq = protocol.pick(16, 2), protocol.pick(256, 32)
    recipe = validate_recipe({
        "version": 1, "model": {"source": str(model), "dtype": dtype, "device": device},
        "data": {"calibration": {"source": "builtin:python-docs", "samples": samples, "seq_len": seq},
                 "evaluation": {"source": "builtin:python-docs", "seq_len": seq, "max_windows": protocol.pick(8, 2)}},
        "passes": METHODS[method], "output": {"path": str(out / f"{method}-{dtype}-{device}"), "resume": False},
    })
    summary = compress(recipe, quiet=True, overwrite=True)
    phases = protocol.phase_seconds(summary.record)
    return {"dense_ppl": summary.dense_ppl, "pruned_ppl": summary.pruned_ppl, "prune_s": summary.prune_s, "phases_s": phases,
            "peak_cuda_mb": summary.peak_cuda_mb}


def matmul_times(device: str) -> list[dict[str, Any]]:
    import torch

    from d2compiler.graph.packing import Packed24Linear

    rows = []
    dtype = torch.float16 if device == "cuda" else torch.float32
    for out_f, in_f in protocol.pick(MATMULS, [(256, 128)]):
        weight = torch.randn(out_f, in_f)
        groups = weight.reshape(out_f, in_f // 4, 4)
        groups.scatter_(-1, groups.abs().argsort(-1)[..., :2], 0.0)
        packed = Packed24Linear.from_weight(weight, None).to(device, dtype)
        dense = weight.to(device, dtype)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
            times = {}
            calls = (("dense", lambda x=x, w=dense: torch.nn.functional.linear(x, w)), ("packed", lambda x=x, p=packed: p(x)))
            for name, fn in calls:
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                start, reps = time.perf_counter(), 0
                while time.perf_counter() - start < 0.2:
                    fn()
                    reps += 1
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name] = (time.perf_counter() - start) / reps * 1e3
            err = float((packed(x).float() - torch.nn.functional.linear(x, dense).float()).abs().max())
            rows.append({"weight": f"{out_f}x{in_f}", "tokens": tokens, "dense_ms": times["dense"], "packed_ms": times["packed"],
                         "speedup": times["dense"] / times["packed"], "max_abs_diff": err,
                         "sparse_kernel": packed._sparse_weight() is not None})
    return rows


def markdown(r: dict[str, Any]) -> str:
    lines = ["# GPU check", "", protocol.provenance_line(r["provenance"]), "", f"Device: {r['device']}.", "",
             f"Tests marked `cuda`: {r['cuda_tests']['summary']}.", "",
             "| method | dtype | CPU ppl | CUDA ppl | CUDA / CPU | CPU prune s | CUDA prune s | CUDA phases (s) |", "|---|---|---|---|---|---|---|---|"]
    for row in r["runs"]:
        c, g = row["cpu"], row["cuda"]
        lines.append(f"| {row['method']} | {row['dtype']} | {c['pruned_ppl']:.3f} | {g['pruned_ppl']:.3f} | {row['ratio']:.4f} | "
                     f"{c['prune_s']:.1f} | {g['prune_s']:.1f} | {json.dumps(g['phases_s'])} |")
    lines += ["", "| weight | tokens | dense ms | packed 2:4 ms | speedup | max abs diff | sparse kernel |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['weight']} | {m['tokens']} | {m['dense_ms']:.4f} | {m['packed_ms']:.4f} | {m['speedup']:.2f} | "
              f"{m['max_abs_diff']:.3g} | {m['sparse_kernel']} |" for m in r["matmul"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = protocol.parse(__doc__)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: bench/gpu_check.py needs a CUDA device and found none; it never falls back to the CPU "
              "(--smoke runs its code path on the CPU)", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    started = time.perf_counter()
    tests = cuda_tests()
    if not args.smoke and (tests["returncode"] != 0 or "skipped" in tests["summary"]):
        print(f"error: the cuda tests did not all pass: {tests['summary']}", file=sys.stderr)
        return 1
    model, out = synthetic_model(), protocol.work_dir("gpu") / "runs"
    runs = []
    cases = [(model, method, dtype) for method in METHODS for dtype in ("float32", "bfloat16")]
    cases.append((synthetic_moe(), "sparsegpt", "float32"))  # the experts: per-expert statistics and solves on CUDA
    for source, method, dtype in cases:
        label = method + (" (MoE)" if source.name == "synthetic-moe" else "")
        cpu, gpu = (prune(source, method, dtype, where, out / source.name) for where in ("cpu", device))
        runs.append({"method": label, "dtype": dtype, "cpu": cpu, "cuda": gpu, "ratio": gpu["pruned_ppl"] / cpu["pruned_ppl"]})
        print(json.dumps(runs[-1]), flush=True)
    record = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)", "cuda_tests": tests, "runs": runs,
              "matmul": matmul_times(device), "wall_s": time.perf_counter() - started, "provenance": protocol.provenance()}
    protocol.publish("gpu", record, markdown(record))
    off = [r for r in runs if abs(r["ratio"] - 1) > 0.01]
    if off:
        print(f"error: CUDA perplexity is more than 1% away from the CPU run for {[(r['method'], r['dtype']) for r in off]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
