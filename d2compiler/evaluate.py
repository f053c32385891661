"""Perplexity with the standard SparseGPT/Wanda protocol: the corpus joined with "\\n\\n",
tokenized once, cut into non-overlapping windows of seq_len; ppl = exp(mean next-token NLL over
all predicted tokens of all windows)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .executor import model_call_kwargs
from .progress import progress


@torch.no_grad()
def perplexity(model: nn.Module, windows: list[torch.Tensor], device: torch.device, *, quiet: bool = False,
               desc: str = "perplexity") -> float:
    """Perplexity of a causal LM on token windows shaped (1, seq_len). The model is moved to
    `device` for the evaluation and left there."""
    model.to(device)
    model.eval()
    extra = model_call_kwargs(model)
    total_nll, total_tokens = 0.0, 0
    for ids in progress(windows, desc=desc, disable=quiet):
        ids = ids.to(device)
        logits = model(ids, **extra).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += ids.shape[1] - 1
    return math.exp(total_nll / total_tokens)
