"""Zero-shot multiple choice by log-likelihood, with lm-eval-harness conventions.

Each item is a context and 2+ continuations; the model scores each continuation by the sum of its
tokens' log-probabilities given the context (tokenized as lm-eval does: the context alone, and the
continuation as the tokens of context + continuation beyond the context's tokens). `acc` takes the
argmax of the sums; `acc_norm` divides each sum by the continuation's length in characters first.

Tasks read local files (no download):
- `piqa`: `valid.jsonl` (goal, sol1, sol2) + `valid-labels.lst` beside it. Context
  "Question: {goal}\\nAnswer:", continuations " {sol}";
- `arc_easy`: a JSONL of HF `ai2_arc` rows (question, choices.text/label, answerKey). Context
  "Question: {question}\\nAnswer:", continuations " {choice}".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DataError
from .runner import ModelRunner

DEFAULT_FILES = {"piqa": "zeroshot/piqa/valid.jsonl", "arc_easy": "zeroshot/arc/ARC-Easy-test.jsonl"}


@dataclass
class Item:
    context: str
    choices: list[str]
    gold: int


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None
    return rows


def load_task(task: str, path: str | Path) -> list[Item]:
    """The items of `task` from `path` (see the module docstring for the formats)."""
    path = Path(path)
    if task not in DEFAULT_FILES:
        raise DataError(f"unknown task {task!r}; expected piqa or arc_easy")
    rows = _read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no items")
    labels: list[str] = []
    if task == "piqa":
        labels_file = path.with_name(path.stem + "-labels.lst")
        if not labels_file.is_file():
            raise DataError(f"{labels_file}: PIQA labels file not found beside {path.name}")
        labels = labels_file.read_text().split()
        if len(labels) != len(rows):
            raise DataError(f"{labels_file}: {len(labels)} labels for {len(rows)} items")
    items = []
    for number, row in enumerate(rows, 1):
        try:
            item = _piqa_item(row, labels[number - 1]) if task == "piqa" else _arc_item(row)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{path}:{number}: not a {task} item ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(item.context, str) or not all(isinstance(c, str) for c in item.choices) or len(item.choices) < 2:
            raise DataError(f"{path}:{number}: a {task} item needs a question and at least two text choices")
        if not 0 <= item.gold < len(item.choices):
            raise DataError(f"{path}:{number}: label {item.gold} is out of range for {len(item.choices)} choices")
        items.append(item)
    return items


def _piqa_item(row: dict[str, Any], label: str) -> Item:
    if not isinstance(row["goal"], str):
        raise TypeError("goal is not text")
    return Item(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(label))


def _arc_item(row: dict[str, Any]) -> Item:
    if not isinstance(row["question"], str):
        raise TypeError("question is not text")
    return Item(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]),
                list(row["choices"]["label"]).index(row["answerKey"]))


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def choice_batch(pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """The (context + continuation) token pairs of one item as one right-padded batch of inputs
    (causal attention never looks at the padding after a sequence), the last token left out."""
    seqs = [ctx + cont for ctx, cont in pairs]
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs) - 1, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq) - 1] = torch.tensor(seq[:-1])
    return ids


def loglikelihoods(logits: torch.Tensor, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Sum of log P(continuation | context) for each (context, continuation) token pair, from the
    logits of `choice_batch(pairs)` (one host sync)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    sums = []
    for row, (ctx, cont) in enumerate(pairs):
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=logprobs.device)
        sums.append(logprobs[row, positions, torch.tensor(cont, device=logprobs.device)].sum())
    return torch.stack(sums).tolist()


def evaluate_task(runner: ModelRunner, tokenizer: Any, items: list[Item], *, quiet: bool = False,
                  desc: str = "zero-shot") -> dict[str, float]:
    """acc and acc_norm (lm-eval conventions) over `items`, with their standard errors. The model runs
    with one block on the device at a time (`runner`)."""
    if tokenizer is None:
        raise DataError("zero-shot evaluation needs the model's tokenizer")
    pairs = [[_encode_pair(tokenizer, item.context, " " + c) for c in item.choices] for item in items]
    hits = norm_hits = 0

    def score(i: int, out: Any) -> None:
        nonlocal hits, norm_hits
        item, scores = items[i], loglikelihoods(out.logits, pairs[i])
        hits += int(max(range(len(scores)), key=scores.__getitem__) == item.gold)
        normed = [s / max(len(c), 1) for s, c in zip(scores, item.choices)]
        norm_hits += int(max(range(len(normed)), key=normed.__getitem__) == item.gold)

    runner.run([{"input_ids": choice_batch(p)} for p in pairs], score, desc=desc, quiet=quiet)
    n = len(items)
    acc, acc_norm = hits / n, norm_hits / n
    return {"acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / max(n - 1, 1)),
            "acc_norm": acc_norm, "acc_norm_stderr": math.sqrt(acc_norm * (1 - acc_norm) / max(n - 1, 1)), "items": n}


LOCAL_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def run_lm_eval(model: nn.Module, tokenizer: Any, task: str, limit: int | None, items: list[Item] | None = None,
                batch_size: int = 8) -> dict[str, Any]:
    """Score with lm-eval-harness through its HFLM wrapper (needs the `lm_eval` package). With
    `items`, lm-eval runs them as a local task (a JSON file and task YAML in a temporary folder,
    no download), which cross-checks this module's scorer; without, lm-eval's own registered
    `task`, whose data it fetches from the hub. `limit`: the first N items only."""
    import tempfile

    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DataError("--harness needs the lm-eval package (pip install lm-eval)") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if items is None:
        results = simple_evaluate(model=lm, tasks=[task], limit=limit)
        return results["results"][task]
    name, items = f"d2c_local_{task}", items[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "items.jsonl"
        data.write_text("".join(json.dumps({"context": i.context, "choices": i.choices, "gold": i.gold}) + "\n"
                                for i in items))
        (Path(tmp) / f"{name}.yaml").write_text(LOCAL_TASK_YAML.format(name=name, data=json.dumps(str(data))))
        results = simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=tmp))
    metrics = results["results"][name]
    return {key.split(",")[0]: value for key, value in metrics.items() if key.startswith("acc")} | {"items": len(items)}
