"""compressed-tensors end to end on SmolLM2-135M (issue: ship into the runtimes). Not run in CI.

1. Prunes SparseGPT 50% + GPTQ int4 (group 64, asymmetric) with the fixed protocol (C4 32 x 512
   calibration; perplexity on the first 32 x 512 windows of WikiText-2 test), a plain `hf` output.
2. `d2c export OUT --format compressed-tensors`.
3. Loads the export with plain transformers (`CompressedTensorsConfig(dequantize=True)`) and compares
   with d2compiler's own dequantized model: the largest logit difference on one 128-token sequence,
   and whether every pruned layer's zeros are exactly where they were (exact sparsity).
4. `d2c eval` perplexity of the export (read through transformers' compressed-tensors loader) vs
   the run's pruned perplexity, and the weight bytes on disk of both folders.

Results: bench/results/compressed_tensors.{json,md}.

    python bench/compressed_export.py [--smoke]
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
from deploy import d2c, weight_bytes  # noqa: E402

TOKENS = 128


def recipe(out: Path) -> dict[str, Any]:
    return {"version": 1, "model": {"source": protocol.lm_source(), "dtype": "float32"},
            "data": {"calibration": {"source": protocol.calibration_source(), "samples": protocol.pick(32, 4),
                                     "seq_len": protocol.seq_len()},
                     "evaluation": {"source": protocol.evaluation_source(), "seq_len": protocol.seq_len(),
                                    "max_windows": protocol.pick(32, 2)}},
            "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5},
                       {"type": "gptq", "bits": 4, "group_size": protocol.pick(64, 16), "symmetric": False}],
            "output": {"path": str(out), "resume": False}}


def compare(pruned: Path, exported: Path, layers: dict[str, Any]) -> dict[str, Any]:
    """Logits and zeros of the export loaded by plain transformers vs d2compiler's model."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import d2compiler

    ours = d2compiler.load(pruned)
    theirs = AutoModelForCausalLM.from_pretrained(exported, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    zeros_equal = all(torch.equal(ours.get_submodule(n).weight == 0, theirs.get_submodule(n).weight == 0) for n in layers)
    weights_equal = all(torch.equal(ours.get_submodule(n).weight, theirs.get_submodule(n).weight) for n in layers)
    sparsity = sum(int((theirs.get_submodule(n).weight == 0).sum()) for n in layers) / sum(
        theirs.get_submodule(n).weight.numel() for n in layers)
    return {"max_abs_logit_diff": float((a - b).abs().max()), "largest_logit": float(a.abs().max()),
            "zeros_equal": zeros_equal, "weights_equal": weights_equal, "sparsity_after_load": sparsity}


def markdown(r: dict[str, Any]) -> str:
    c = r["compare"]
    return "\n".join([
        "# compressed-tensors: SmolLM2-135M, SparseGPT 50% + GPTQ int4 (g64), loaded by plain transformers", "",
        protocol.provenance_line(r["provenance"]), "",
        "Protocol: calibration on the first 32 x 512 tokens of C4, perplexity on the first 32 x 512 windows of "
        "WikiText-2 test. The export is loaded with `AutoModelForCausalLM.from_pretrained(folder, "
        "quantization_config=CompressedTensorsConfig(dequantize=True))`.", "",
        "| quantity | value |", "|---|---|",
        f"| compressed-tensors format | `{r['format']}`, {r['config_groups']} config group(s), {r['ignored']} linear(s) ignored |",
        f"| largest logit difference, transformers vs d2compiler ({TOKENS} tokens) | {c['max_abs_logit_diff']:.2e} "
        f"(largest logit {c['largest_logit']:.1f}) |",
        f"| decompressed weights equal d2compiler's / zeros where they were | {c['weights_equal']} / {c['zeros_equal']} |",
        f"| sparsity of the pruned linears after loading | {c['sparsity_after_load']:.4f} |",
        f"| perplexity: dense / pruned+int4 run / export read back | {r['dense_ppl']:.3f} / {r['pruned_ppl']:.3f} / "
        f"{r['export_ppl']:.3f} |",
        f"| weight bytes: hf output (fp32) / compressed-tensors | {r['hf_bytes'] / 2**20:.1f} MiB / {r['ct_bytes'] / 2**20:.1f} MiB |",
        f"| wall: prune + GPTQ + evaluation / export | {r['run_s']:.1f} s / {r['export_s']:.1f} s |", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol.add_smoke_flag(parser)
    protocol.start(parser.parse_args().smoke)
    work = protocol.work_dir("compressed-tensors")
    work.mkdir(parents=True, exist_ok=True)
    pruned, exported = work / "pruned-w4", work / "pruned-w4-ct"
    (work / "recipe.json").write_text(json.dumps(recipe(pruned)))
    begin = time.perf_counter()
    d2c("run", str(work / "recipe.json"), "--overwrite", "--restart")
    run_s = time.perf_counter() - begin
    begin = time.perf_counter()
    d2c("export", str(pruned), "--format", "compressed-tensors", "--to", str(exported), "--overwrite")
    export_s = time.perf_counter() - begin
    record = json.loads((pruned / "sparsity.json").read_text())
    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    ev = recipe(pruned)["data"]["evaluation"]
    read_back = json.loads(d2c("eval", str(exported), "--data", ev["source"], "--seq-len", str(ev["seq_len"]),
                               "--max-windows", str(ev["max_windows"]), "--device", "cpu").strip().splitlines()[-1])
    result = {"format": config["format"], "config_groups": len(config["config_groups"]), "ignored": len(config["ignore"]),
              "compare": compare(pruned, exported, record["layers"]), "dense_ppl": record["results"]["dense_ppl"],
              "pruned_ppl": record["results"]["pruned_ppl"], "export_ppl": read_back["value"],
              "hf_bytes": weight_bytes(pruned), "ct_bytes": weight_bytes(exported), "run_s": run_s, "export_s": export_s,
              "provenance": protocol.provenance()}
    protocol.publish("compressed_tensors", result, markdown(result))


if __name__ == "__main__":
    main()
