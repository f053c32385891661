"""Batched per-expert OBS solves against the loop of one solve per expert (issue 28, item 2; not run in CI).

For expert shapes of real MoEs, a group of E experts gets seeded synthetic weights and Hessians
(correlated inputs, a few outlier channels, the routed token count of top-k of all experts on the
protocol's 16,384 calibration tokens); each of the expert's three matrices (gate, up: [I, H];
down: [H, I]) is pruned at 50% with SparseGPT's blocked OBS, once one expert at a time
(`passes.obs.obs_prune`, what every dense layer uses) and once the experts of the group together
(`passes.obs_batch.obs_prune_many`, what the pruning passes use for experts). Both run in this process,
one after the other, on this CPU; the factorisations are included in both (fresh caches). Checked:
the weights and masks are identical. Writes bench/results/moe_solves.{json,md}.

    python bench/moe_solves.py [--experts 16] [--shapes upcycled-smollm2,qwen3-30b-a3b]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import add_smoke_flag, pick, provenance, provenance_line, publish, start  # noqa: E402

from passes.obs import _FACTORS, obs_prune  # noqa: E402
from passes.obs_batch import ObsProblem, obs_prune_many  # noqa: E402

# name: (hidden H, expert intermediate I, experts per layer, routed per token)
SHAPES = {"upcycled-smollm2": (576, 1536, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8), "deepseek-v3": (7168, 2048, 256, 8)}
TOKENS = 32 * 512


def synthetic_hessian(width: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, width, generator=gen) * (1 + torch.rand(width, generator=gen))
    x[:, :4] *= 8
    return x.t() @ x / tokens


def problems(hidden: int, inner: int, experts: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, ObsProblem]]:
    """(weight, H, problem) of gate, up and down of each expert."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for e in range(experts):
        h_in, h_mid = synthetic_hessian(hidden, tokens, gen), synthetic_hessian(inner, tokens, gen)
        for role, (rows, cols), h in (("gate", (inner, hidden), h_in), ("up", (inner, hidden), h_in), ("down", (hidden, inner), h_mid)):
            out.append((torch.randn(rows, cols, generator=gen), h, ObsProblem(f"experts.{e}.{role}", 0.5, None, 128, 0.01)))
    return out


def measure(name: str, experts: int) -> dict[str, Any]:
    hidden, inner, total, top_k = SHAPES[name]
    hidden, inner = pick(hidden, 64), pick(inner, 32)
    tokens = max(TOKENS * top_k // total, 16)
    work = problems(hidden, inner, experts, tokens)
    _FACTORS.clear()
    begin = time.perf_counter()
    alone = [obs_prune(w, h, sparsity=p.sparsity, n_of_m=None, block_size=p.block_size, damping=p.damping, layer=p.layer)
             for w, h, p in work]
    loop_s = time.perf_counter() - begin
    _FACTORS.clear()
    begin = time.perf_counter()
    batched = obs_prune_many([w for w, _h, _p in work], [h for _w, h, _p in work], [p for _w, _h, p in work])
    batch_s = time.perf_counter() - begin
    identical = all(torch.equal(a.weight, b.weight) and torch.equal(a.keep, b.keep) for a, b in zip(alone, batched))
    row = {"shape": name, "hidden": hidden, "inner": inner, "experts": experts, "tokens_per_expert": tokens,
           "loop_s": round(loop_s, 3), "batched_s": round(batch_s, 3), "per_expert_loop_s": round(loop_s / experts, 4),
           "per_expert_batched_s": round(batch_s / experts, 4), "speedup": round(loop_s / batch_s, 3), "identical": identical,
           "threads": torch.get_num_threads()}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", type=int, default=16, help="experts in the group (default 16)")
    parser.add_argument("--shapes", default="upcycled-smollm2,qwen3-30b-a3b")
    add_smoke_flag(parser)
    args = parser.parse_args()
    start(args.smoke)
    rows = [measure(name, pick(args.experts, 2)) for name in args.shapes.split(",")]
    lines = ["# Batched per-expert OBS solves vs one solve per expert", "",
             "SparseGPT's blocked OBS at 50% on the gate, up and down matrices of a group of experts with seeded synthetic "
             "weights and Hessians, on this CPU (both in one process, one after the other; factorisations included). "
             "`identical`: the batched weights and masks equal the loop's bit for bit.", "", provenance_line(provenance()), "",
             "| expert shape | H | I | experts | tokens / expert | loop s | batched s | s / expert (loop / batched) | speedup | identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['hidden']} | {r['inner']} | {r['experts']} | {r['tokens_per_expert']} | {r['loop_s']:.2f} | "
                     f"{r['batched_s']:.2f} | {r['per_expert_loop_s']:.3f} / {r['per_expert_batched_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['identical']} |")
    publish("moe_solves", {"rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
