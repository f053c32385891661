"""Synthetic models for tests, smoke benchmarks and scale checks: random weights from a transformers
config, saved as a normal safetensors folder with a small byte-level BPE tokenizer trained on the
stdlib's Python docs (no download). Deterministic for a given seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TOKENIZER_VOCAB = 512


def tiny_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """A byte-level BPE tokenizer trained on the calibration part of `builtin:python-docs`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from d2compiler.evaluation.data import python_docs_rows

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(python_docs_rows("calibration"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama_config(vocab_size: int, *, layers: int = 2, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                      kv_heads: int = 2) -> Any:
    """A Llama config of the given shape (GQA when `kv_heads` < `heads`)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048)


def save_random_model(config: Any, folder: Path, tokenizer: Any = None, *, seed: int = 0, model_class: Any = None,
                      dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
    """Instantiate `config` with seeded random weights (a causal LM unless `model_class` says
    otherwise), save it to `folder` in `dtype` (in shards of `max_shard_size`, e.g. "1GB") with
    `tokenizer`, and return the folder."""
    import transformers

    torch.manual_seed(seed)
    cls = model_class or transformers.AutoModelForCausalLM
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
