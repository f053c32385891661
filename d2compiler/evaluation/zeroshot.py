"""`d2c eval --task`: lm-eval-harness tasks, scored by lm-eval itself (`HFLM`, `simple_evaluate`),
with the model's forward run block by block through `ModelRunner` (so streamed models work too).

The local PIQA and ARC-Easy files are read here (no download) and run as local lm-eval tasks with
the prompts of lm-eval's own `piqa` and `arc_easy`:
- `piqa`: `valid.jsonl` (goal, sol1, sol2) + `valid-labels.lst` beside it. Context
  "Question: {goal}\\nAnswer:", continuations " {sol}";
- `arc_easy`: a JSONL of HF `ai2_arc` rows (question, choices.text/label, answerKey). Context
  "Question: {question}\\nAnswer:", continuations " {choice}".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2compiler.errors import DataError
from d2compiler.execution.runner import ModelRunner

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


def write_local_task(folder: Path, name: str, items: list[Item]) -> None:
    """`items` as the local lm-eval task `name` in `folder` (`items.jsonl` and `NAME.yaml`), for a
    `TaskManager(include_path=folder)`."""
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"context": i.context, "choices": i.choices, "gold": i.gold}) + "\n" for i in items))
    (folder / f"{name}.yaml").write_text(LOCAL_TASK_YAML.format(name=name, data=json.dumps(str(data))))


def _runner_lm(runner: ModelRunner, model: nn.Module, tokenizer: Any, batch_size: int, quiet: bool) -> Any:
    """lm-eval's `HFLM` around the loaded model, whose forward goes through `runner` (one block on the
    device at a time; the model may be a streamed skeleton): the same requests, batching and scoring
    as lm-eval's own runs, with our placement."""
    from lm_eval.models.huggingface import HFLM

    class RunnerLM(HFLM):
        def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
            if attn_mask is not None or labels is not None:
                raise DataError("lm-eval asked for a sequence-to-sequence call; d2c eval --task runs causal models")
            logits: list[torch.Tensor] = []
            runner.run([{"input_ids": inps.cpu()}], lambda _i, out: logits.append(out.logits), quiet=True)
            return logits[0]

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

    lm = RunnerLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm._device = torch.device("cpu")  # inputs start on the CPU; the runner places every block
    return lm


def _metrics(values: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's `metric,filter` keys as `metric` (filter `none`) or `metric[filter]`."""
    out = {}
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        if filt:
            out[metric if filt == "none" else f"{metric}[{filt}]"] = value
    return out


def yaml_problems(folder: Path) -> list[str]:
    """`file:line:column: problem` for each YAML file under `folder` that does not parse (tags such as
    lm-eval's `!function` are accepted without being run)."""
    import yaml

    class Lenient(yaml.SafeLoader):
        pass

    Lenient.add_multi_constructor("!", lambda _loader, _suffix, _node: None)
    problems = []
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=Lenient)  # noqa: S506 (a safe loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problems.append(f"{where}: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: unreadable ({exc})")
    return problems


def evaluate_task(runner: ModelRunner, model: nn.Module, tokenizer: Any, task: str, *, items: list[Item] | None = None,
                  include_path: str | None = None, limit: int | None = None, num_fewshot: int | None = None,
                  batch_size: int = 8, quiet: bool = False) -> dict[str, Any]:
    """Run lm-eval task `task` with lm-eval's `simple_evaluate` on `model` (through `runner`).

    With `items` (local piqa / arc_easy files), they run as a local lm-eval task with the task's own
    prompt ("Question: ...\\nAnswer:", continuations " choice"), no download. Otherwise `task` is an
    lm-eval task: a YAML under `include_path` (which may read local files, offline), or one of
    lm-eval's registered tasks (its data from the hub or the datasets cache). Returns the task's
    metrics (`acc`, `acc_stderr`, ...) and `items`; a group task adds its subtasks under `subtasks`."""
    import contextlib
    import io
    import logging
    import tempfile
    from unittest import mock

    if tokenizer is None:
        raise DataError("lm-eval tasks need the model's tokenizer")
    if include_path is not None and not Path(include_path).is_dir():
        raise DataError(f"--include-path {include_path}: no such folder (it should hold lm-eval task YAMLs)")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError("d2c eval --task runs lm-eval-harness: install it with pip install 'd2compiler[eval]'") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR if quiet else logging.WARNING)
    lm = _runner_lm(runner, model, tokenizer, batch_size, quiet)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [include_path] if include_path else []
        name = task
        if items is not None:
            name = f"d2c_local_{task}"
            write_local_task(Path(tmp), name, items)
            paths.append(tmp)
        manager = TaskManager(include_path=paths or None, include_defaults=items is None)
        if name not in manager.all_tasks:
            where = f" or under {include_path}" if include_path else " (add --include-path DIR for your own task YAMLs)"
            broken = yaml_problems(Path(include_path)) if include_path else []
            if broken:
                where += (f"; {len(broken)} task YAML(s) there could not be parsed (lm-eval skips them), the first: "
                          f"{broken[0]}")
            raise DataError(f"--task {task}: no such lm-eval task among lm-eval's registered tasks{where}")
        try:  # quiet: lm-eval's and datasets' progress bars (tqdm, on sys.stderr) go nowhere; log records still show
            # lm-eval records the git commit of the working directory by running `git describe`, whose
            # "fatal: not a git repository" reaches the terminal outside a repository: not asked for here
            with (contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext(),
                  mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None)):
                results = simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                          log_samples=False, bootstrap_iters=1000)
        except (FileNotFoundError, ConnectionError) as exc:
            raise DataError(f"--task {task}: lm-eval could not read the task's data ({type(exc).__name__}: {str(exc)[:300]}); "
                            "offline, point a task YAML at local files with --include-path") from None
    out = _metrics(results["results"][name]) | {"items": results["n-samples"].get(name, {}).get("effective")}
    others = {sub: _metrics(values) for sub, values in results["results"].items() if sub != name}
    return out | ({"subtasks": others} if others else {})
