"""MoE at scale on this machine (issue 28, item 3; not run in CI): synthetic MoEs with random bf16
weights written once under the d2compiler cache (never in git), pruned with SparseGPT 50% in a
streaming run (one block read at a time), each run in its own process: first `d2c plan`'s estimate
(memory, time, the projections for 1 and 8 processes), then the run.

- `--shape qwen3` (default): the layer shapes of Qwen3-30B-A3B (hidden 2048, 128 experts of
  intermediate 768, top-8, 32 query / 4 KV heads of 128), 4 layers; the block is read whole, its
  experts' statistics held in groups of `--group-size` (`experts.group_size`) and solved in batches.
- `--shape deepseek`: one DeepSeek-V3 MoE layer (hidden 7168, 256 routed experts of intermediate 2048,
  top-8 of 8 groups, one shared expert, MLA attention with 128 heads); its experts are 22.5 GB in bf16
  and 45 GB in float32, so they are never whole in memory: `experts.load = "group"` reads, observes,
  prunes and writes `--group-size` experts at a time. The checkpoint is written expert by expert too.

Recorded: peak RSS against the plan's estimate, wall time per phase, time per layer and per expert,
the expert groups of each block, and every expert matrix's zeros read back from the output.
Results: bench/results/moe_scale.{json,md}, one record per shape.

    python bench/moe_scale.py [--shape qwen3|deepseek|qwen3,deepseek] [--samples 16] [--seq-len 512] [--group-size N]
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

SHAPES = {
    "qwen3": dict(layers=4, hidden=2048, experts=128, inner=768, top_k=8, heads=32, kv_heads=4, head_dim=128, group=32),
    "deepseek": dict(layers=1, hidden=7168, experts=256, inner=2048, top_k=8, heads=128, group=16),
}
SMOKE_SHAPES = {
    "qwen3": dict(layers=2, hidden=64, experts=8, inner=32, top_k=2, heads=4, kv_heads=2, head_dim=16, group=3),
    "deepseek": dict(layers=1, hidden=64, experts=8, inner=32, top_k=2, heads=4, group=3),
}
NAMES = {"qwen3": "qwen3-30b-a3b-shaped-4-layers", "deepseek": "deepseek-v3-shaped-moe-layer"}


def synthetic_folder(shape: str) -> Path:
    """The synthetic MoE of `shape`, written once and reused."""
    from d2compiler.loading.models import cache_dir

    s = protocol.pick(SHAPES, SMOKE_SHAPES)[shape]
    root = protocol.work_dir("moe-scale") if protocol.smoke() else cache_dir() / "bench"
    folder = root / (f"synthetic-qwen3moe-l{s['layers']}-h{s['hidden']}-e{s['experts']}" if shape == "qwen3"
                     else f"synthetic-deepseekv3-l{s['layers']}-h{s['hidden']}-e{s['experts']}")
    if not (folder / "config.json").is_file():
        (qwen3_moe if shape == "qwen3" else deepseek_v3)(folder, s)
    return folder


def qwen3_moe(folder: Path, s: dict[str, int]) -> None:
    """The Qwen3-MoE (bf16 shards of at most 1 GB, built in bf16 by transformers)."""
    import torch
    import transformers

    from d2compiler.evaluation.synthetic import tiny_tokenizer

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


def deepseek_v3(folder: Path, s: dict[str, int]) -> None:
    """The DeepSeek-V3 layer, never whole in memory: the model is built on the meta device and each
    tensor (each expert of a bank) is drawn, seeded, and written into one safetensors file as it
    comes (`tensor_file`); norms are ones, biases zeros, the rest N(0, 0.02²). Banks are stored under
    the model's own names (`mlp.experts.gate_up_proj` [E, 2I, H])."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    from d2compiler.evaluation.synthetic import tiny_tokenizer
    from d2compiler.tensor_file import TensorFileWriter

    tokenizer = tiny_tokenizer()
    mla = protocol.pick(dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             n_group=8, topk_group=4),
                        dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                             n_group=1, topk_group=1))
    config = transformers.DeepseekV3Config(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], num_hidden_layers=s["layers"], intermediate_size=4 * s["inner"],
        moe_intermediate_size=s["inner"], n_routed_experts=s["experts"], num_experts_per_tok=s["top_k"], n_shared_experts=1,
        first_k_dense_replace=0, num_attention_heads=s["heads"], num_key_value_heads=s["heads"], max_position_embeddings=4096,
        tie_word_embeddings=False, **mla)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = dict(model.state_dict())
    writer = TensorFileWriter(tmp / "model.safetensors", header_bytes=None)
    for name, t in tensors.items():
        writer.declare(name, t.dtype, tuple(t.shape))
    generator = torch.Generator().manual_seed(0)

    def draw(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if "norm" in name:
            return torch.ones(shape, dtype=dtype)
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=dtype)
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype)

    for name, t in tensors.items():
        if t.dim() == 3:
            for e in range(t.shape[0]):
                writer.write_entry(name, e, draw(name, tuple(t.shape[1:]), t.dtype))
        else:
            writer.write(name, draw(name, tuple(t.shape), t.dtype))
    writer.close()
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def recipe(source: str, out: str, samples: int, seq_len: int, group_size: int, load: str = "block") -> Any:
    """SparseGPT 50%, streaming; experts read by group (`load = "group"`) store the checkpoint's bf16
    (`model.dtype = "auto"`: float32 compute on the CPU), the Qwen3 run float32 as before."""
    from d2compiler.recipe.schema import validate_recipe

    dtype = "auto" if load == "group" else "float32"
    return validate_recipe({
        "version": 1, "model": {"source": source, "dtype": dtype, "device": "cpu", "streaming": True},
        "data": {"calibration": {"source": protocol.calibration_source(), "samples": samples, "seq_len": seq_len}},
        "experts": {"group_size": group_size, "load": load},
        "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}],
        "output": {"path": out, "resume": False},
    })


def expert_zeros(folder: Path) -> dict[str, float]:
    """The least and most zeros of any expert matrix in the output (a bank read one expert at a time)."""
    from safetensors import safe_open

    fractions = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if ".experts." not in key:
                    continue
                part = f.get_slice(key)
                experts = part.get_shape()[0] if len(part.get_shape()) == 3 else 0
                for e in range(experts):
                    fractions.append(float((part[e : e + 1] == 0).float().mean()))
                if not experts:
                    fractions.append(float((f.get_tensor(key) == 0).float().mean()))
    return {"expert_matrices": len(fractions), "min_zeros": min(fractions), "max_zeros": max(fractions)}


def describe(r: dict[str, Any]) -> str:
    s = r["shape"]
    if r["shape_name"] == "qwen3":
        return (f"Synthetic random bf16 Qwen3-MoE: {s['layers']} layers, hidden {s['hidden']}, {s['experts']} experts of intermediate "
                f"{s['inner']} (top-{s['top_k']}), {s['heads']} query / {s['kv_heads']} KV heads of {s['head_dim']}")
    return (f"Synthetic random bf16 DeepSeek-V3 MoE layer: hidden {s['hidden']}, {s['experts']} routed experts of intermediate "
            f"{s['inner']} (top-{s['top_k']}) and one shared expert, MLA attention with {s['heads']} heads")


def section(r: dict[str, Any]) -> list[str]:
    plan, p = r["plan"], r["phases_s"]
    held = ("every expert loaded with its block, the statistics of" if r.get("load", "block") == "block"
            else "experts read, observed, pruned and written")
    lines = [f"## {r['model']}", "", protocol.provenance_line(r["provenance"]), "",
             f"{describe(r)}; {r['parameters'] / 1e9:.2f}B parameters, {r['disk_mb'] / 1024:.1f} GiB on disk. SparseGPT 50% with "
             f"streaming (fp32 compute, {'stored in the checkpoint' + chr(39) + 's bf16' if r.get('load') == 'group' else 'fp32 output'}), calibration {r['calibration']}, `experts.load = \"{r.get('load', 'block')}\"` ({held} "
             f"{r['group_size']} at a time: `experts.group_size = {r['group_size']}`); one process on this CPU ({r['threads']} threads).", "",
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
             "", f"Projections of `d2c plan` for this {r['shape']['layers']}-layer model (a cost model at this CPU's measured rates, "
             "not measurements):", "", "| processes | projected total (s) |", "|---|---|"]
    return lines + [f"| {n} | {parts['total']:.0f} |" for n, parts in plan["projections"].items()] + [""]


def markdown(records: dict[str, dict[str, Any]]) -> str:
    lines = ["# MoE at scale: synthetic MoEs pruned with streaming on this machine", "",
             "Each section is one run of `python bench/moe_scale.py --shape NAME` (its commit in its provenance line).", ""]
    for name in ("qwen3", "deepseek"):
        if name in records:
            lines += section(records[name])
    return "\n".join(lines)


def earlier_records() -> dict[str, dict[str, Any]]:
    """The records of bench/results/moe_scale.json by shape (a file of one record: the Qwen3 run)."""
    path = protocol.results_dir() / "moe_scale.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if "runs" in data:
        return data["runs"]
    return {"qwen3": {**data, "shape_name": "qwen3", "load": "block"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3", help="qwen3, deepseek, or both as a comma list (each its own run)")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (16; smoke: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (512; smoke: 32)")
    parser.add_argument("--group-size", type=int, default=None, help="experts per group (qwen3 32, deepseek 16; smoke: 3)")
    add_job_flags(parser, 6)
    protocol.add_smoke_flag(parser)
    args = parser.parse_args()
    protocol.start(args.smoke)
    if child_job(args, lambda source, out, samples, seq_len, group, load: recipe(source, out, int(samples), int(seq_len), int(group), load),
                 nprocs=(1, 8)):
        return 0
    names = args.shape.split(",")
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        parser.error(f"--shape: {unknown[0]!r} is not one of {', '.join(sorted(SHAPES))}")
    records = earlier_records()
    for name in names:
        records[name] = measure(name, args)
    protocol.publish("moe_scale", {"runs": records}, markdown(records))
    return 0


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The plan and the run of shape `name`, each in its own process, as one record."""
    import torch

    shape = protocol.pick(SHAPES, SMOKE_SHAPES)[name]
    samples, seq_len = args.samples or protocol.pick(16, 2), args.seq_len or protocol.pick(512, 32)
    group, load = args.group_size or shape["group"], "group" if name == "deepseek" else "block"
    folder, out = synthetic_folder(name), protocol.work_dir("moe-scale-run")
    job_args = [str(folder), str(out), str(samples), str(seq_len), str(group), load]
    plan, _ = protocol.run_job([sys.executable, __file__, "--plan-job", *job_args])
    result = protocol.run_job([sys.executable, __file__, "--job", *job_args])[0] | sizes(folder)
    prune_s = [b["times_s"]["total"] for b in result["blocks"]]
    record = {"model": NAMES[name], "shape_name": name, "shape": shape, "load": load,
              "calibration": f"{protocol.pick('c4', 'python-docs')} first {samples} x {seq_len} tokens",
              "group_size": group, "threads": torch.get_num_threads(), **result, "plan": plan,
              "per_layer_s": sum(prune_s) / len(prune_s), "per_expert_s": sum(prune_s) / (len(prune_s) * shape["experts"]),
              "zeros": expert_zeros(out), "provenance": protocol.provenance()}
    print(json.dumps({k: v for k, v in record.items() if k != "blocks"}), flush=True)
    return record

if __name__ == "__main__":
    sys.exit(main())
