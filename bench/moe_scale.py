"""MoE at scale on this machine (issue 28, item 3; not run in CI): a synthetic MoE with the layer shapes of
Qwen3-30B-A3B (hidden 2048, 128 experts of intermediate 768, top-8, 32 query / 4 KV heads of 128)
and 4 layers, random bf16 weights written once under the d2compiler cache (never in git), pruned
with SparseGPT 50% in a streaming run (one block read at a time) whose experts are held in groups
of `--group-size` (`experts.group_size`) and solved in batches. Each run in its own process:
first `d2c plan`'s estimate (memory, time, the projections for 1 and 8 processes), then the run.

Recorded: peak RSS against the plan's estimate, wall time per phase, time per layer and per expert,
the expert groups of each block, and every expert matrix's zeros read back from the output.
Results: bench/results/moe_scale.{json,md}.

    python bench/moe_scale.py [--samples 16] [--seq-len 512] [--group-size 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import protocol  # noqa: E402
from scale import add_job_flags, child_job, sizes  # noqa: E402

SHAPE = dict(layers=4, hidden=2048, experts=128, inner=768, top_k=8, heads=32, kv_heads=4, head_dim=128)
SMOKE_SHAPE = dict(layers=2, hidden=64, experts=8, inner=32, top_k=2, heads=4, kv_heads=2, head_dim=16)
NAME = "qwen3-30b-a3b-shaped-4-layers"


def synthetic_folder() -> Path:
    """The synthetic MoE, written once (bf16 shards of at most 1 GB, built in bf16) and reused."""
    import torch
    import transformers

    from d2compiler.evaluation.synthetic import tiny_tokenizer
    from d2compiler.loading.models import cache_dir

    s = protocol.pick(SHAPE, SMOKE_SHAPE)
    root = protocol.work_dir("moe-scale") if protocol.smoke() else cache_dir() / "bench"
    folder = root / f"synthetic-qwen3moe-l{s['layers']}-h{s['hidden']}-e{s['experts']}"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = tiny_tokenizer()
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], num_experts=s["experts"], num_experts_per_tok=s["top_k"],
        moe_intermediate_size=s["inner"], intermediate_size=4 * s["inner"], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="1GB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def recipe(source: str, out: str, samples: int, seq_len: int, group_size: int) -> Any:
    from d2compiler.recipe.schema import validate_recipe

    return validate_recipe({
        "version": 1, "model": {"source": source, "dtype": "float32", "device": "cpu", "streaming": True},
        "data": {"calibration": {"source": protocol.calibration_source(), "samples": samples, "seq_len": seq_len}},
        "experts": {"group_size": group_size},
        "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}],
        "output": {"path": out, "resume": False},
    })


def expert_zeros(folder: Path) -> dict[str, float]:
    """The least and most zeros of any expert matrix in the output (read bank by bank, never all at once)."""
    from safetensors import safe_open

    fractions = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if ".experts." in key:
                    t = f.get_tensor(key)
                    per = (t == 0).flatten(-2).float().mean(-1) if t.dim() == 3 else (t == 0).float().mean().reshape(1)
                    fractions += per.tolist()
    return {"expert_matrices": len(fractions), "min_zeros": min(fractions), "max_zeros": max(fractions)}


def markdown(r: dict[str, Any]) -> str:
    s, plan = r["shape"], r["plan"]
    p = r["phases_s"]
    lines = ["# MoE at scale: a Qwen3-30B-A3B-shaped MoE pruned with streaming on this machine", "",
             protocol.provenance_line(r["provenance"]), "",
             f"Synthetic random bf16 Qwen3-MoE: {s['layers']} layers, hidden {s['hidden']}, {s['experts']} experts of intermediate "
             f"{s['inner']} (top-{s['top_k']}), {s['heads']} query / {s['kv_heads']} KV heads of {s['head_dim']}; "
             f"{r['parameters'] / 1e9:.2f}B parameters, {r['disk_mb'] / 1024:.1f} GiB on disk. SparseGPT 50% with streaming "
             f"(fp32 compute), calibration {r['calibration']}, `experts.group_size = {r['group_size']}`; one process on this CPU "
             f"({r['threads']} threads).", "",
             "| measured | value |", "|---|---|",
             f"| peak RSS | {r['peak_rss_mb']:.0f} MiB ({r['peak_rss_mb'] / 1024:.1f} GiB) |",
             f"| `d2c plan` estimate of the peak | {plan['estimate_mb']['peak (sum)']:.0f} MiB "
             f"(estimate / measured {plan['estimate_mb']['peak (sum)'] / r['peak_rss_mb']:.3f}) |",
             f"| experts (plan) | {plan['experts']} |",
             f"| wall time | {r['wall_s']:.0f} s (observe {p.get('observe', 0):.0f}, sparsegpt {p.get('sparsegpt', 0):.0f}, "
             f"propagate {p.get('propagate', 0):.0f}) |",
             f"| time per layer (pruning, mean) | {r['per_layer_s']:.0f} s |",
             f"| time per expert (observing and solving its three matrices) | {r['per_expert_s']:.2f} s |",
             f"| expert matrices read back | {r['zeros']['expert_matrices']}, zeros {r['zeros']['min_zeros']:.4f}–{r['zeros']['max_zeros']:.4f} |",
             "", "Projections of `d2c plan` for this 4-layer model (a cost model at this CPU's measured rates, not measurements):", "",
             "| processes | projected total (s) |", "|---|---|"]
    for n, parts in plan["projections"].items():
        lines.append(f"| {n} | {parts['total']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (16; smoke: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (512; smoke: 32)")
    parser.add_argument("--group-size", type=int, default=None, help="experts per group (32; smoke: 3)")
    add_job_flags(parser, 5)
    protocol.add_smoke_flag(parser)
    args = parser.parse_args()
    protocol.start(args.smoke)
    if child_job(args, lambda source, out, samples, seq_len, group: recipe(source, out, int(samples), int(seq_len), int(group)),
                 nprocs=(1, 8)):
        return 0
    samples, seq_len = args.samples or protocol.pick(16, 2), args.seq_len or protocol.pick(512, 32)
    group = args.group_size or protocol.pick(32, 3)
    folder, out = synthetic_folder(), protocol.work_dir("moe-scale-run")
    job_args = [str(folder), str(out), str(samples), str(seq_len), str(group)]
    plan, _ = protocol.run_job([sys.executable, __file__, "--plan-job", *job_args])
    result = protocol.run_job([sys.executable, __file__, "--job", *job_args])[0] | sizes(folder)
    shape = protocol.pick(SHAPE, SMOKE_SHAPE)
    import torch

    prune_s = [b["times_s"]["total"] for b in result["blocks"]]
    record = {"model": NAME, "shape": shape, "calibration": f"{protocol.pick('c4', 'python-docs')} first {samples} x {seq_len} tokens",
              "group_size": group, "threads": torch.get_num_threads(), **result, "plan": plan,
              "per_layer_s": sum(prune_s) / len(prune_s), "per_expert_s": sum(prune_s) / (len(prune_s) * shape["experts"]),
              "zeros": expert_zeros(out), "provenance": protocol.provenance()}
    print(json.dumps({k: v for k, v in record.items() if k != "blocks"}), flush=True)
    protocol.publish("moe_scale", record, markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
