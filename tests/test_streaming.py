"""Streaming (`model.streaming = true`): one block in memory at a time, the output written shard by
shard. The result is the in-memory run's, bit for bit, and peak memory follows the block size, not
the layer count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2compiler.cli import main

from .conftest import write_recipe

SPARSEGPT = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
EVAL = '[data.evaluation]\nsource = "builtin:python-docs"\nseq_len = 32\nmax_windows = 3\n'


def _record(output: Path) -> dict:
    return json.loads((output / "sparsity.json").read_text())


def _run(tmp_path: Path, model: Path, name: str, streaming: bool, passes: str = SPARSEGPT, evaluation: str = EVAL) -> Path:
    output = tmp_path / name
    recipe = write_recipe(tmp_path / f"{name}.toml", str(model), passes, samples=4, seq_len=32, output=output)
    recipe.write_text(recipe.read_text().replace('device = "cpu"', f'device = "cpu"\nstreaming = {str(streaming).lower()}')
                      + evaluation)
    assert main(["--quiet", "run", str(recipe)]) == 0
    return output


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen3", "bert"])
def test_streaming_equals_in_memory(arch, tmp_path, tiny_models):
    import transformers

    dense = _run(tmp_path, tiny_models[arch], "in-memory", False)
    streamed = _run(tmp_path, tiny_models[arch], "streamed", True)
    a, b = _record(dense), _record(streamed)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["results"]["metric"] == ("embedding_cosine" if arch == "bert" else "perplexity")  # any metric streams
    assert a["results"]["dense"] == b["results"]["dense"] and a["results"]["pruned"] == b["results"]["pruned"]
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 1 + len(b["blocks"]) or arch == "bert"
    cls = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    ids = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        out = [getattr(cls.from_pretrained(folder)(ids), "logits", None) for folder in (dense, streamed)]
    if out[0] is not None:
        assert torch.equal(out[0], out[1])


def test_streaming_with_tied_embeddings(tmp_path, tokenizer):
    from d2compiler.evaluation.synthetic import save_random_model, tiny_llama_config

    config = tiny_llama_config(len(tokenizer), layers=3)
    config.tie_word_embeddings = True
    model = save_random_model(config, tmp_path / "tied", tokenizer)
    a, b = (_record(_run(tmp_path, model, name, flag)) for name, flag in (("a", False), ("b", True)))
    assert a["weights_sha256"] == b["weights_sha256"] and a["results"]["pruned_ppl"] == b["results"]["pruned_ppl"]


@pytest.mark.parametrize("change, expected", [
    ('[[passes]]\ntype = "quantize_rtn"\nbits = 8\n', "passes[2]: 'quantize_rtn' changes how weights are stored"),
    ("", "output.path: model.streaming writes the pruned blocks as output shards"),
])
def test_streaming_refuses_what_it_cannot_do(change, expected, tmp_path, tiny_models, capsys):
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), SPARSEGPT + change,
                          output=None if not change else tmp_path / "out")
    recipe.write_text(recipe.read_text().replace('device = "cpu"', 'device = "cpu"\nstreaming = true'))
    assert main(["validate", str(recipe)]) == 2
    assert expected in capsys.readouterr().err


PEAK = """
import json, sys
from d2compiler.execution.memory import peak_rss_mb
from d2compiler.driver.pipeline import compress
from d2compiler.recipe.schema import validate_recipe
recipe = validate_recipe({"version": 1, "model": {"source": sys.argv[1], "device": "cpu", "streaming": True},
    "data": {"calibration": {"source": "builtin:python-docs", "samples": 2, "seq_len": 32}},
    "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}], "output": {"path": sys.argv[2]}})
summary = compress(recipe, quiet=True)
print(json.dumps({"peak": peak_rss_mb(), "blocks": [b["memory"]["peak_rss_mb"] for b in summary.record["blocks"]]}))
"""


def test_peak_memory_follows_the_block_not_the_layer_count(tmp_path, tokenizer):
    """Two synthetic Llamas of about 100 and 190 MB (fp32) that differ only in their layer count: the
    streaming run's peak RSS grows by less than half of the size difference (it holds one block)."""
    import transformers

    from d2compiler.evaluation.synthetic import save_random_model

    peaks, sizes = {}, {}
    for layers in (8, 16):
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536,
                                          num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2)
        folder = save_random_model(config, tmp_path / f"llama-{layers}", tokenizer)
        sizes[layers] = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        proc = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(tmp_path / f"out-{layers}")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(layers, result)
        peaks[layers] = result["peak"]
    growth, size_difference = peaks[16] - peaks[8], sizes[16] - sizes[8]
    assert size_difference > 80
    assert growth < 0.5 * size_difference, (peaks, sizes)


def test_eval_streams_any_metric_and_task(tmp_path, tiny_models, capsys):
    """`d2c eval --streaming` gives the in-memory numbers: perplexity, embedding cosine, zero-shot."""
    from .conftest import SHARED_DATA

    arc = str(SHARED_DATA / "zeroshot/arc/ARC-Easy-test.jsonl")
    cases = [[str(tiny_models["llama"]), "--seq-len", "32", "--max-windows", "3"],
             [str(tiny_models["bert"]), "--reference", str(tiny_models["bert"]), "--seq-len", "32", "--max-windows", "4"],
             [str(tiny_models["llama"]), "--task", "arc_easy", "--limit", "6", "--data", arc]]
    for case in cases:
        results = []
        for flags in ([], ["--streaming"]):
            assert main(["--quiet", "eval", *case, "--device", "cpu", *flags]) == 0
            results.append(json.loads(capsys.readouterr().out))
        assert results[0] == results[1]


def test_gguf_streams_from_a_converted_folder(monkeypatch, tmp_path):
    """A GGUF source is converted once into a cached safetensors folder, which is then streamed."""
    from d2compiler.loading import models

    gguf = models.smollm2_gguf_path()
    folder = models.gguf_folder(gguf)
    assert folder == models.builtin_smollm2_folder() and (folder / "config.json").is_file()
    loaded, streamed = models.load_streamed(str(gguf), "float32", "cpu")
    assert streamed.source.folder == folder and all(p.parent == folder for p in loaded.files)
    assert all(p.is_meta for p in streamed.blocks.parameters())


def test_hub_ids_stream_from_the_hub_cache(monkeypatch, tiny_models):
    """A hub id streams from huggingface_hub's snapshot of its safetensors (never a pickle)."""
    import huggingface_hub

    from d2compiler.loading import models

    asked = {}

    def snapshot(repo_id, revision=None, allow_patterns=None):
        asked.update(repo=repo_id, revision=revision, patterns=allow_patterns)
        return str(tiny_models["llama"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    loaded, streamed = models.load_streamed("someone/tiny-llama", "float32", "cpu", revision="v1")
    assert asked["repo"] == "someone/tiny-llama" and asked["revision"] == "v1"
    assert not [p for p in asked["patterns"] if p.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl", "*"))]
    assert streamed.source.folder == tiny_models["llama"]
