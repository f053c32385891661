"""Shared fixtures: a small BPE tokenizer trained on the stdlib docs, tiny random models of several
architectures saved as transformers folders, and the real SmolLM2 (converted once, then cached)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tokenizer():
    from d2compiler.evaluation.synthetic import tiny_tokenizer

    return tiny_tokenizer()


def tiny_config(arch: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common)
    if arch == "mistral":
        return tf.MistralConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "opt":
        return tf.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=512, **common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2)
    if arch == "bert":
        return tf.BertConfig(intermediate_size=128, max_position_embeddings=512, **common)
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=8,
                  patch_size=2, num_channels=1, num_labels=10)
    if arch == "vit":
        return tf.ViTConfig(**vision)
    if arch == "deit":
        return tf.DeiTConfig(**vision)
    raise ValueError(arch)


LANGUAGE_MODELS = ("llama", "opt", "qwen3", "mistral", "gpt2")
VISION_MODELS = ("vit", "deit")


def build_tiny(arch: str, tokenizer, folder: Path, attn: str = "sdpa") -> Path:
    """A tiny random model saved as a transformers folder: a causal LM, a BERT encoder (`AutoModel`) or
    an image classifier on 8x8 grey images; text models get `tokenizer`."""
    import transformers as tf

    torch.manual_seed(0)
    config = tiny_config(arch, len(tokenizer))
    config._attn_implementation = attn
    if arch in VISION_MODELS:  # DeiT maps to two classes in the auto mapping: name the one wanted
        model = {"vit": tf.ViTForImageClassification, "deit": tf.DeiTForImageClassification}[arch](config)
    else:
        model = (tf.AutoModelForCausalLM if arch in LANGUAGE_MODELS else tf.AutoModel).from_config(config)
    model.save_pretrained(folder)
    if arch not in VISION_MODELS:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """arch -> folder of a tiny random model (llama, opt, qwen3, mistral, gpt2, bert, vit, deit)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny(arch, tokenizer, root / arch) for arch in (*LANGUAGE_MODELS, "bert", *VISION_MODELS)}


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M as a safetensors folder (GGUF converted once into the cache)."""
    from d2compiler.loading.models import builtin_smollm2_folder

    return builtin_smollm2_folder()


def write_recipe(path: Path, model: str, passes: str, *, samples: int = 4, seq_len: int = 64,
                 output: Path | None = None, extra: str = "") -> Path:
    out = f'[output]\npath = "{output}"\n' if output else ""
    path.write_text(
        f"""version = 1
[model]
source = "{model}"
device = "cpu"
[data.calibration]
source = "builtin:python-docs"
samples = {samples}
seq_len = {seq_len}
{extra}
{passes}
{out}"""
    )
    return path


def tiny_bart(tmp_path: Path, tokenizer: Any, *, decoder_layers: int = 2) -> Path:
    """A seeded tiny BART (an encoder stack of 2 blocks and a decoder stack), saved with `tokenizer`."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BartConfig(vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=decoder_layers,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                           max_position_embeddings=128)
    folder = tmp_path / "bart"
    tf.BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def kill_after_blocks(cmd: list[str], state_file: Path, blocks: int, *, group: bool = False) -> int:
    """Start `cmd`, SIGKILL it (its whole process group with `group`) once its checkpoint state says
    `blocks` blocks are finished, and return the blocks finished then. Fails if it ends first."""
    import json
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=group,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(state_file.read_text())["blocks_done"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= blocks:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return json.loads(state_file.read_text())["blocks_done"]


_PUBLISHED: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module")
def record_expert_hessians():
    """A pass (registered once) that keeps the Hessians calibrate published for block 0's layers
    (Mixture-of-Experts tests: experts of banks and of lists)."""
    from d2compiler.contract import Pass, PassResult, TargetedParams
    from d2compiler.recipe.registry import PASSES

    class RecordHessians(Pass):
        name = "test_record_expert_hessians"
        Params = TargetedParams
        requires = frozenset({"hessian"})
        reads_only = True

        def apply(self, ctx):
            for layer in ctx.layers:
                hessian = ctx.artifact("hessian", layer.name)
                if ctx.index == 0 and hessian is not None:
                    _PUBLISHED[layer.local_name] = hessian.double().cpu()
            return PassResult(modified=False)

    _PUBLISHED.clear()
    with PASSES.temporarily(RecordHessians):
        yield _PUBLISHED


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> Path:
    """One results folder per test module for the bench/ smoke runs (tests/bench_smoke.py): scripts of
    one file share it, so later ones read what earlier ones wrote (run_d2prune.sh reads tuning.json)."""
    return tmp_path_factory.mktemp("bench-smoke")
