"""The llm-compressor side of bench/cost.py, run in its own virtual environment (.venv-llmc, with
torch==2.13.0 and llmcompressor): SparseGPT at 50% on the same model and the same calibration
token windows, then a plain safetensors save. Prints one JSON line `RESULT {...}`.

    .venv-llmc/bin/python bench/llmc_job.py MODEL_DIR IDS.safetensors OUT_DIR [--smoke]

`--smoke` is accepted for uniformity with the other bench scripts and changes nothing: the job is
already sized by the model and token windows it is handed (bench/cost.py --smoke hands it tiny ones).
"""

import json
import resource
import sys
import time

start = time.perf_counter()
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.pruning import SparseGPTModifier  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def peak_rss_mb() -> float:
    """VmHWM, as d2compiler.execution.memory measures it (ru_maxrss would count the parent's memory at fork)."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


model_dir, ids_file, out_dir = [a for a in sys.argv[1:] if a != "--smoke"][:3]
torch.manual_seed(0)
ids = load_file(ids_file)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
loaded = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=SparseGPTModifier(sparsity=0.5, block_size=128, dampening_frac=0.01,
                                                               targets=["Linear"], ignore=["re:.*lm_head"]),
        num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], pipeline="sequential")
compressed = time.perf_counter()
model.save_pretrained(out_dir, safe_serialization=True)
done = time.perf_counter()
import llmcompressor  # noqa: E402

print("RESULT " + json.dumps({"load_s": loaded - start, "oneshot_s": compressed - loaded, "save_s": done - compressed,
                              "total_s": done - start, "peak_rss_mb": peak_rss_mb(),
                              "version": llmcompressor.__version__, "torch": torch.__version__}), flush=True)
