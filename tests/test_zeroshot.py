"""Zero-shot multiple choice (lm-eval conventions) on the local PIQA / ARC-Easy files."""

from __future__ import annotations

import json

import pytest
import torch

from d2compiler.cli import main
from d2compiler.errors import DataError
from d2compiler.runner import ModelRunner
from d2compiler.zeroshot import Item, _encode_pair, evaluate_task, load_task

from .conftest import SHARED_DATA


def test_real_files_parse():
    piqa = load_task("piqa", SHARED_DATA / "zeroshot/piqa/valid.jsonl")
    arc = load_task("arc_easy", SHARED_DATA / "zeroshot/arc/ARC-Easy-test.jsonl")
    assert len(piqa) == 1838 and len(arc) == 2376  # the lm-eval splits
    assert piqa[0].context.startswith("Question: How do I ready a guinea pig cage") and piqa[0].context.endswith("\nAnswer:")
    assert all(0 <= it.gold < len(it.choices) for it in piqa + arc)
    assert {len(it.choices) for it in arc} >= {3, 4, 5}  # a few items have 3 or 5 choices, as upstream


def test_bad_files(tmp_path):
    (tmp_path / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(DataError, match="labels file not found"):
        load_task("piqa", tmp_path / "valid.jsonl")
    (tmp_path / "arc.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="arc.jsonl:1: not a arc_easy item"):
        load_task("arc_easy", tmp_path / "arc.jsonl")


def test_encode_pair_moves_trailing_space(tokenizer):
    ctx, cont = _encode_pair(tokenizer, "Question: x\nAnswer: ", "yes")
    assert tokenizer.decode(ctx) == "Question: x\nAnswer:" and tokenizer.decode(cont) == " yes"


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(1, 1)

    def forward(self, hidden):
        return hidden


class _Oracle(torch.nn.Module):
    """A 'model' (one pass-through block) that puts all probability on one fixed token: choices made
    of it win."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.vocab, self.token = vocab, token
        self.layers = torch.nn.ModuleList([_Block()])

    def forward(self, input_ids, **_):
        hidden = self.layers[0](torch.zeros(*input_ids.shape, 1))
        logits = torch.full((*input_ids.shape, self.vocab), -20.0) + hidden
        logits[..., self.token] = 20.0
        return type("Out", (), {"logits": logits})()


def test_acc_and_acc_norm_follow_the_scores(tokenizer):
    token = tokenizer(" def", add_special_tokens=False).input_ids[0]
    items = [Item("Question: q\nAnswer:", ["zzzz qqqq", "def"], 1), Item("Question: q\nAnswer:", ["def", "xx yy zz"], 0),
             Item("Question: q\nAnswer:", ["def", "ww"], 1)]
    scores = evaluate_task(ModelRunner(_Oracle(len(tokenizer), token), torch.device("cpu")), tokenizer, items, quiet=True)
    assert scores["acc"] == pytest.approx(2 / 3) and scores["items"] == 3


def test_cli_task_on_tiny_model(tiny_models, capsys):
    assert main(["--quiet", "eval", str(tiny_models["llama"]), "--task", "arc_easy", "--limit", "5",
                 "--data", str(SHARED_DATA / "zeroshot/arc/ARC-Easy-test.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["items"] == 5 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1


@pytest.mark.parametrize("task,rel", [("piqa", "zeroshot/piqa/valid.jsonl"), ("arc_easy", "zeroshot/arc/ARC-Easy-test.jsonl")])
def test_scores_match_lm_eval_harness(task, rel, tiny_models, capsys):
    """The same items scored by this module and by lm-eval-harness (a local task) agree exactly."""
    pytest.importorskip("lm_eval")
    path = str(SHARED_DATA / rel)
    common = ["--quiet", "eval", str(tiny_models["llama"]), "--task", task, "--data", path, "--limit", "24", "--device", "cpu"]
    assert main(common) == 0
    ours = json.loads(capsys.readouterr().out)
    assert main([*common, "--harness"]) == 0
    harness = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert harness["items"] == ours["items"] == 24
    assert harness["acc"] == pytest.approx(ours["acc"]) and harness["acc_norm"] == pytest.approx(ours["acc_norm"])
