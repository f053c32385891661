"""Whose layout is wrong when an asymmetric compressed-tensors checkpoint does not load with plain
`from_pretrained`? (issue 26, group 7.) One tiny random Llama, GPTQ W4A16 asymmetric (group 32),
exported twice: by d2compiler (`format = "compressed-tensors"`) and by llm-compressor (in its own
venv, .venv-llmc: see bench/cost.py --setup-llmc; skipped when absent). For each checkpoint: the
stored zero point's shape and dtype for one linear, and whether transformers loads it plainly
(compressed mode) and with `CompressedTensorsConfig(dequantize=True)`, in this venv and (for
llm-compressor's) in llm-compressor's own. The symmetric default is loaded plainly too.

Results: bench/results/ct_layout.{json,md}.

    python bench/ct_layout.py [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import protocol  # noqa: E402
from cost import LLMC_VENV  # noqa: E402
from deploy import d2c  # noqa: E402

LAYER = "model.layers.0.mlp.down_proj"


def stored_zero_point(folder: Path) -> str:
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            if f"{LAYER}.weight_zero_point" in f.keys():
                piece = f.get_slice(f"{LAYER}.weight_zero_point")
                return f"{piece.get_dtype()} {list(piece.get_shape())}"
    return "none (symmetric)"


def load_verdicts(folder: Path, ids: Any) -> dict[str, str]:
    """Plain `from_pretrained` and `dequantize=True`: 'loads' (plain: with its logits' relative
    difference from the dequantized model's) or the error."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    def logits(**kwargs: Any) -> Any:
        try:
            with torch.no_grad():
                return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()(ids).logits
        except Exception as exc:  # whatever transformers raises is the finding
            return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    reference, plain = logits(quantization_config=CompressedTensorsConfig(dequantize=True)), logits()
    if not isinstance(plain, str) and not isinstance(reference, str):
        plain = f"loads; logits differ from dequantize=True by {float((plain - reference).norm() / reference.norm()):.2g} (relative)"
    return {"plain": plain, "dequantize": reference if isinstance(reference, str) else "loads"}


def d2c_export(model: str, ids: Path, out: Path, symmetric: bool) -> Path:
    import json

    recipe = {"version": 1, "model": {"source": model, "dtype": "float32", "device": "cpu"},
              "data": {"calibration": {"source": str(ids), "samples": 8, "seq_len": 64}},
              "passes": [{"type": "calibrate"}, {"type": "gptq", "bits": 4, "group_size": 32, "symmetric": symmetric}],
              "output": {"path": str(out), "format": "compressed-tensors"}}
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(recipe))
    d2c("run", str(path), "--overwrite")
    return out


def main() -> None:
    protocol.parse(__doc__)
    import compressed_tensors
    import torch
    import transformers
    from safetensors.torch import save_file

    from d2compiler.evaluation.synthetic import save_random_model, tiny_llama_config, tiny_tokenizer

    work = protocol.work_dir("ct-layout")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    model = save_random_model(tiny_llama_config(len(tokenizer)), work / "model", tokenizer)
    ids = work / "ids.safetensors"
    windows = torch.randint(0, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": windows}, str(ids))
    first = windows[:1]

    rows: dict[str, dict[str, str]] = {}
    for name, symmetric in (("d2compiler, asymmetric", False), ("d2compiler, symmetric (the default)", True)):
        out = d2c_export(str(model), ids, work / ("d2c-sym" if symmetric else "d2c-asym"), symmetric)
        rows[name] = {"zero point stored": stored_zero_point(out), **load_verdicts(out, first)}
    llmc_out = work / "llmc-asym"
    if (LLMC_VENV / "bin" / "python").exists():
        own, _wall = protocol.run_job([str(LLMC_VENV / "bin" / "python"), "bench/llmc_quant_job.py", str(model), str(ids),
                                       str(llmc_out)])
        rows["llm-compressor, asymmetric"] = {"zero point stored": stored_zero_point(llmc_out), **load_verdicts(llmc_out, first)}
        versions = own["versions"]
        rows["llm-compressor, asymmetric, in its own venv"] = {"zero point stored": "(the same files)",
                                                               "plain": own["plain"], "dequantize": own["dequantize"]}
    else:
        versions = {"skipped": f"{LLMC_VENV.name} is absent"}
    record = {"layer": LAYER, "rows": rows, "llm_compressor_venv": versions,
              "this_venv": {"transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__}}
    lines = [f"# compressed-tensors W4A16 g32 layout: who writes what, who loads it ({LAYER})", "",
             f"This venv: transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}; "
             f"llm-compressor's venv: {', '.join(f'{k} {v}' for k, v in versions.items())}.", "",
             "| checkpoint | zero point stored | plain `from_pretrained` | `dequantize=True` |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['zero point stored']} | {r['plain']} | {r['dequantize']} |" for name, r in rows.items()]
    lines += ["", protocol.provenance_line(protocol.provenance())]
    protocol.publish("ct_layout", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
