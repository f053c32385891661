"""The llm-compressor side of bench/ct_layout.py, run in .venv-llmc: GPTQ W4A16 asymmetric (4 bits,
group 32) on MODEL_DIR with the token windows of IDS.safetensors, saved compressed. Then it loads the
saved folder with this venv's transformers, plain and with dequantize=True. Prints `RESULT {...}`.

    .venv-llmc/bin/python bench/llmc_quant_job.py MODEL_DIR IDS.safetensors OUT_DIR
"""

import json
import sys

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

model_dir, ids_file, out_dir = sys.argv[1:4]
torch.manual_seed(0)
ids = load_file(ids_file)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                             "group_size": 32}}
oneshot(model=model, dataset=dataset, recipe=GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
        num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], pipeline="sequential")
model.save_pretrained(out_dir, save_compressed=True)


def logits(**kwargs) -> torch.Tensor | str:
    try:
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(out_dir, **kwargs).eval()(ids[:1]).logits
    except Exception as exc:  # whatever transformers raises is the finding
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def verdict(got, want) -> str:
    if isinstance(got, str):
        return got
    if isinstance(want, str):
        return "loads"
    return f"loads; logits differ from dequantize=True by {float((got - want).norm() / want.norm()):.2g} (relative)"


import compressed_tensors  # noqa: E402
import llmcompressor  # noqa: E402
import transformers  # noqa: E402

reference = logits(quantization_config=CompressedTensorsConfig(dequantize=True))
print("RESULT " + json.dumps({"plain": verdict(logits(), reference), "dequantize": "loads" if not isinstance(reference, str) else reference,
                              "versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                                           "compressed_tensors": compressed_tensors.__version__}}), flush=True)
