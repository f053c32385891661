"""Evaluation metrics, one per kind of model:

- `perplexity` (causal LMs), with the standard SparseGPT/Wanda protocol: the corpus joined with
  "\\n\\n", tokenized once, cut into non-overlapping windows of seq_len; ppl = exp(mean next-token
  NLL over all predicted tokens of all windows);
- `embedding_cosine` (encoders): each held-out paragraph is embedded by mean pooling the last hidden
  state over its tokens (the sentence-transformers convention); the score is the mean cosine
  similarity of the compressed model's embeddings to the dense model's (1.0 = unchanged);
- `accuracy` (image classifiers): top-1 accuracy on a labelled image set.

A metric measures the dense model first (`dense`), then the compressed one (`measure`), through a
`runner.ModelRunner`: the model runs with one block on the compute device at a time, whether it is
in memory or streamed from its files, so evaluation never needs the whole model on the device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from d2compiler.errors import DataError
from d2compiler.evaluation.data import (
    evaluation_windows,
    load_rows,
    load_text,
    load_token_windows,
    select_windows,
    tokenize,
)
from d2compiler.evaluation.images import fit_to_model, load_images
from d2compiler.evaluation.model_kind import model_task
from d2compiler.evaluation.sources import ResolvedSource
from d2compiler.execution.runner import ModelRunner

MIN_PARAGRAPH_WORDS = 8
EMBED_BATCH = 16
IMAGE_BATCH = 256


def perplexity(runner: ModelRunner, windows: list[torch.Tensor], *, quiet: bool = False, desc: str = "perplexity") -> float:
    """Perplexity of a causal LM on token windows shaped (1, seq_len), one block on the device at a
    time (see `runner`)."""
    total = _NLL()
    runner.run([{"input_ids": ids} for ids in windows], lambda i, out: total.add(windows[i], out.logits), desc=desc, quiet=quiet)
    return math.exp(runner.group.total(total.nll) / runner.group.total(total.tokens))


class _NLL:
    """Next-token negative log-likelihood summed over windows (the perplexity protocol)."""

    def __init__(self) -> None:
        self.nll, self.tokens = 0.0, 0

    def add(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        ids = ids.to(logits.device)
        self.nll += float(nn.functional.cross_entropy(logits.float()[0, :-1], ids[0, 1:], reduction="sum"))
        self.tokens += ids.shape[1] - 1


class Metric(ABC):
    """One evaluation: `dense(runner)` before compressing, `measure(runner)` after. A runner
    (`runner.ModelRunner`) runs the model with one block on the device at a time, from memory or
    streamed from its files. `count`: windows, paragraphs or images evaluated."""

    name: str
    higher_is_better: bool
    count: int
    needs_dense = False  # True when `dense` records the reference that `measure` compares with

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def dense(self, runner: ModelRunner) -> float:
        return self.measure(runner, desc=f"dense {self.name}")

    @abstractmethod
    def measure(self, runner: ModelRunner, desc: str | None = None) -> float: ...


class Perplexity(Metric):
    name, higher_is_better = "perplexity", False

    def __init__(self, windows: list[torch.Tensor], quiet: bool):
        super().__init__(quiet)
        self.windows, self.count = windows, len(windows)

    def measure(self, runner: ModelRunner, desc: str | None = None) -> float:
        return perplexity(runner, self.windows, quiet=self.quiet, desc=desc or self.name)


def paragraphs(rows: list[str], limit: int | None) -> list[str]:
    """Paragraphs (blank-line separated) of at least MIN_PARAGRAPH_WORDS words, in order."""
    out = []
    for row in rows:
        for para in row.split("\n\n"):
            para = " ".join(para.split())
            if len(para.split()) >= MIN_PARAGRAPH_WORDS:
                out.append(para)
                if limit is not None and len(out) >= limit:
                    return out
    return out


def sentence_embeddings(runner: ModelRunner, batches: list[dict[str, torch.Tensor]], *, quiet: bool = False,
                        desc: str = "embeddings") -> torch.Tensor:
    """Mean-pooled last hidden states, one row per text (of this process's share), float32 on the CPU."""
    out: list[torch.Tensor] = []

    def pool(i: int, result: Any) -> None:
        hidden = getattr(result, "last_hidden_state", None)
        hidden = (hidden if hidden is not None else result.hidden_states[-1]).float()
        mask = batches[i]["attention_mask"].to(hidden.device).unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())

    runner.run([b | {"output_hidden_states": True} for b in batches], pool, desc=desc, quiet=quiet)
    return torch.cat(out) if out else torch.zeros(0, 0)


class EmbeddingCosine(Metric):
    name, higher_is_better, needs_dense = "embedding_cosine", True, True

    def __init__(self, batches: list[dict[str, torch.Tensor]], quiet: bool):
        super().__init__(quiet)
        self.batches = batches
        self.count = sum(len(b["input_ids"]) for b in batches)
        self.reference: torch.Tensor | None = None

    def dense(self, runner: ModelRunner) -> float:
        self.reference = sentence_embeddings(runner, self.batches, quiet=self.quiet, desc="dense embeddings")
        return 1.0

    def measure(self, runner: ModelRunner, desc: str | None = None) -> float:
        if self.reference is None:
            raise RuntimeError("embedding_cosine needs the dense model's embeddings first (call dense)")
        emb = sentence_embeddings(runner, self.batches, quiet=self.quiet, desc=desc or "embeddings")
        cosines = nn.functional.cosine_similarity(emb, self.reference, dim=-1) if len(emb) else torch.zeros(0)
        return runner.group.total(float(cosines.sum())) / runner.group.total(len(cosines))


class Accuracy(Metric):
    name, higher_is_better = "accuracy", True

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, quiet: bool):
        super().__init__(quiet)
        self.pixels, self.labels, self.count = pixels, labels, len(labels)

    def measure(self, runner: ModelRunner, desc: str | None = None) -> float:
        starts = list(range(0, len(self.labels), IMAGE_BATCH))
        hits = []

        def score(i: int, result: Any) -> None:
            labels = self.labels[starts[i] : starts[i] + IMAGE_BATCH]
            hits.append((result.logits.argmax(-1).cpu() == labels).sum())

        runner.run([{"pixel_values": self.pixels[s : s + IMAGE_BATCH]} for s in starts], score, desc=desc or self.name,
                   quiet=self.quiet)
        return runner.group.total(int(sum(hits))) / len(self.labels)


def _text_batches(tokenizer: Any, texts: list[str], seq_len: int) -> list[dict[str, torch.Tensor]]:
    if tokenizer is None:
        raise DataError("this model has no tokenizer, so text data cannot be used with it")
    size = EMBED_BATCH if tokenizer.pad_token is not None else 1  # padding needs a pad token
    return [dict(tokenizer(texts[i : i + size], padding=size > 1, truncation=True, max_length=seq_len, return_tensors="pt"))
            for i in range(0, len(texts), size)]


def pick_metric(resolved: ResolvedSource, model: nn.Module) -> str:
    """The metric `auto` means for this model and source; an explicit one is checked against them."""
    task = model_task(model)
    wanted = resolved.spec.metric
    if wanted == "auto":
        wanted = {"causal-lm": "perplexity", "image-classification": "accuracy"}.get(task, "embedding_cosine")
    if wanted == "perplexity" and task != "causal-lm":
        raise DataError(f"data.evaluation.metric: perplexity needs a causal LM; {type(model).__name__} is not one "
                        "(use embedding_cosine for encoders, accuracy for image classifiers)")
    if wanted == "accuracy" and task != "image-classification":
        raise DataError(f"data.evaluation.metric: accuracy needs an image classifier; {type(model).__name__} is not one")
    if wanted == "embedding_cosine" and resolved.kind == "images":
        raise DataError("data.evaluation.metric: embedding_cosine needs text, not images")
    return wanted


def make_metric(resolved: ResolvedSource, model: nn.Module, tokenizer: Any, *, quiet: bool = False) -> Metric:
    """The metric for `resolved` (an `EvaluationData` resolved for `model`) with its data loaded."""
    spec = resolved.spec
    name = pick_metric(resolved, model)
    if name == "accuracy":
        images = load_images(spec.source, "evaluation")
        if images.labels is None:
            raise DataError(f"data.evaluation.source: {spec.source} has no `labels`, so accuracy cannot be measured")
        count = spec.max_windows or len(images.labels)
        return Accuracy(fit_to_model(images.pixels[:count], model.config, tokenizer), images.labels[:count], quiet)
    if name == "embedding_cosine":
        texts = paragraphs(load_rows(spec.source, "evaluation", config=spec.config, split=spec.split, field=spec.field),
                           spec.max_windows)
        if not texts:
            raise DataError(f"data.evaluation.source: {spec.source} has no paragraph of {MIN_PARAGRAPH_WORDS}+ words")
        return EmbeddingCosine(_text_batches(tokenizer, texts, spec.seq_len), quiet)
    if resolved.kind == "token-windows":
        ids = load_token_windows(spec.source, spec.seq_len, getattr(model.config, "vocab_size", None))
        windows = select_windows(ids, min(ids.shape[0], spec.max_windows or ids.shape[0]), source=spec.source)
        if not windows:
            raise DataError(f"{spec.source}: no windows")
        return Perplexity(windows, quiet)
    ids = tokenize(tokenizer, load_text(spec.source, "evaluation", config=spec.config, split=spec.split, field=spec.field))
    return Perplexity(evaluation_windows(ids, spec.seq_len, spec.max_windows, source=spec.source), quiet)
