"""`d2c eval --task`: lm-eval tasks (the local PIQA / ARC-Easy files, and any task YAML over local files)."""

from __future__ import annotations

import json

import pytest

from d2compiler.cli import main
from d2compiler.errors import DataError
from d2compiler.evaluation.zeroshot import load_task, write_local_task

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


def test_cli_task_on_tiny_model(tiny_models, capsys):
    pytest.importorskip("lm_eval")
    assert main(["--quiet", "eval", str(tiny_models["llama"]), "--task", "arc_easy", "--limit", "5",
                 "--data", str(SHARED_DATA / "zeroshot/arc/ARC-Easy-test.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["items"] == 5 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
    assert result["acc_stderr"] >= 0


@pytest.mark.parametrize("task,rel", [("piqa", "zeroshot/piqa/valid.jsonl"), ("arc_easy", "zeroshot/arc/ARC-Easy-test.jsonl")])
def test_block_by_block_scores_equal_plain_hflm(task, rel, tiny_models, tmp_path, capsys):
    """`d2c eval --task` (lm-eval's HFLM with the forward run block by block) scores exactly as plain
    lm-eval on the whole model, on the same local items."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from d2compiler.loading.models import load_model

    path = SHARED_DATA / rel
    assert main(["--quiet", "eval", str(tiny_models["llama"]), "--task", task, "--data", str(path), "--limit", "24",
                 "--device", "cpu"]) == 0
    ours = json.loads(capsys.readouterr().out)
    write_local_task(tmp_path, "plain", load_task(task, path)[:24])
    loaded = load_model(str(tiny_models["llama"]), "float32", "cpu")
    plain = simple_evaluate(model=HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=8), tasks=["plain"],
                            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=False)
    want = plain["results"]["plain"]
    assert ours["items"] == 24
    assert ours["acc"] == want["acc,none"] and ours["acc_norm"] == want["acc_norm,none"]


ROLLING_TASK = """task: local_wikitext_lines
dataset_path: text
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
process_docs: !function utils.non_empty
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

MC_TASK = """task: local_odd_one_out
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_any_lm_eval_task_from_local_files_offline(tiny_models, tmp_path, capsys):
    """Two user tasks from local files through --include-path: a rolling log-likelihood over the local
    WikiText-2 valid file, and a few-shot multiple choice over a JSONL; no network (HF_HUB_OFFLINE)."""
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rolling.yaml").write_text(ROLLING_TASK.format(data=json.dumps(str(SHARED_DATA / "wikitext-2-raw-v1/wiki.valid.raw"))))
    (tasks / "utils.py").write_text("def non_empty(dataset):\n    return dataset.filter(lambda d: len(d['text'].split()) > 20)\n")
    rows = [{"question": f"Which is not a number: {a}, {b} or {c}?", "choices": [a, b, c], "answer": 2}
            for a, b, c in [("one", "two", "red"), ("three", "four", "blue"), ("five", "six", "green"), ("seven", "ten", "cat")]]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=json.dumps(str(tmp_path / "mc.jsonl"))))
    base = ["--quiet", "eval", str(tiny_models["llama"]), "--include-path", str(tasks), "--device", "cpu"]
    assert main([*base, "--task", "local_wikitext_lines", "--limit", "3"]) == 0
    rolling = json.loads(capsys.readouterr().out)
    assert rolling["items"] == 3 and rolling["word_perplexity"] > 1 and rolling["bits_per_byte"] > 0
    assert main([*base, "--task", "local_odd_one_out", "--num-fewshot", "2", "--batch-size", "2"]) == 0
    few = json.loads(capsys.readouterr().out)
    assert few["items"] == 4 and 0 <= few["acc"] <= 1
    assert main([*base, "--task", "no_such_task"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --task no_such_task: no such lm-eval task among lm-eval's registered tasks or under {tasks}"]
    assert main([*base[:-4], "--include-path", str(tmp_path / "missing"), "--device", "cpu", "--task", "x"]) == 2
    assert "--include-path" in capsys.readouterr().err


def test_a_task_yaml_that_does_not_parse_is_named_and_git_says_nothing(tiny_models, tmp_path, capsys):
    """A malformed YAML under --include-path: the error names its file, line and problem (lm-eval
    skips it silently). A task run outside a git repository prints nothing about git."""
    pytest.importorskip("lm_eval")
    import os
    import subprocess
    import sys

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"Odd one out: {a}, {b} or {c}?", "choices": [a, b, c], "answer": 2}
            for a, b, c in [("one", "two", "red"), ("three", "four", "blue")]]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=json.dumps(str(tmp_path / "mc.jsonl"))))
    (tasks / "broken.yaml").write_text("task: broken_task\ndataset_path: json\n  output_type: [unclosed\n")
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    base = [sys.executable, "-m", "d2compiler", "--quiet", "eval", str(tiny_models["llama"]), "--include-path", str(tasks),
            "--device", "cpu", "--task"]
    assert main([*base[3:], "broken_task"]) == 2  # in this process: the located line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"could not be parsed (lm-eval skips them), the first: {tasks / 'broken.yaml'}:3:" in err[0]
    fine = subprocess.run([*base, "local_odd_one_out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert fine.returncode == 0 and "git" not in fine.stderr and "fatal" not in fine.stderr, fine.stderr
