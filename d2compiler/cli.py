"""The `d2c` command line: schema, validate, plan, run, export, inspect, eval."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from d2compiler.driver.launch import report_error
from d2compiler.errors import D2Error

log = logging.getLogger("d2compiler")


def _cmd_schema(args: argparse.Namespace) -> int:
    from d2compiler.recipe.schema import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
    return 0


def _load(args: argparse.Namespace):
    from d2compiler.recipe.recipe_text import apply_overrides, read_recipe_file
    from d2compiler.recipe.schema import validate_recipe

    data = read_recipe_file(args.recipe)
    values = {}
    if getattr(args, "model", None):
        values["model.source"] = args.model
    if getattr(args, "output", None):
        values["output.path"] = args.output
    if getattr(args, "restart", False):
        values["output.resume"] = False
    return validate_recipe(apply_overrides(data, list(args.set or []), args.recipe, values), args.recipe)


def _cmd_validate(args: argparse.Namespace) -> int:
    from d2compiler.recipe.passmanager import PassManager

    recipe = _load(args)
    schedule = PassManager(list(recipe.passes)).schedule
    print(f"{args.recipe}: valid recipe; pass schedule: {' -> '.join(p.name for p in schedule)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from d2compiler.driver.launch import launch, without_nproc
    from d2compiler.driver.pipeline import compress, preflight
    from d2compiler.driver.process_limit import check_nproc
    from d2compiler.execution.distributed import launched_size

    if args.nproc > 1 and launched_size() == 1:
        recipe = _load(args)
        preflight(recipe, args.overwrite)  # a bad recipe or output path is reported once, before any process starts
        check_nproc(args.nproc, recipe, oversubscribe=args.oversubscribe)
        return launch(args.nproc, without_nproc(args.argv))
    recipe = _load(args)
    summary = compress(recipe, quiet=args.quiet, overwrite=args.overwrite)
    if summary.rank == 0:
        print(summary.table())
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from d2compiler.driver.plan import make_plan

    plan = make_plan(_load(args))
    if args.nproc > 1:
        plan.project(args.nproc, args.link_gbs)
    print(plan.render())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from d2compiler.driver.convert import export_output

    summary = export_output(args.output_dir, args.format, args.to, dtype=args.dtype, overwrite=args.overwrite,
                            sparse_initializers=args.sparse_initializers,
                            external_data={"auto": None, "always": True, "never": False}[args.external_data])
    print(json.dumps(summary))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from d2compiler.evaluation.model_kind import dummy_input
    from d2compiler.execution.block_io import capture_block_inputs
    from d2compiler.execution.executor import BlockExecutor
    from d2compiler.graph.blocks import other_stacks
    from d2compiler.loading.models import load_model

    loaded = load_model(args.model, "float32", "cpu")
    model = loaded.model
    executor = BlockExecutor(model, [], device=torch.device("cpu"), quiet=True)  # its block discovery, tracing and experts
    path, blocks = executor.blocks_path, executor.blocks
    sample = capture_block_inputs(model, blocks, [dummy_input(model, args.tokens)], torch.device("cpu"))[0]
    all_layers = [layer for i in range(len(blocks)) for layer in executor.layers_of(i, executor.structure(i, sample))]
    structure = executor.structure(0, sample)
    layers = [layer for layer in all_layers if layer.name.startswith(f"{path}.0.") and not layer.is_expert]
    coverage = executor.coverage({0: {layer.name for layer in all_layers}}, all_layers)  # as `targets = ["Linear"]`
    print(f"model: {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    print(f"blocks: {path} x {len(blocks)} ({type(blocks[0]).__name__})")
    others = other_stacks(model, path)
    if others:  # a recipe can name them all in model.blocks
        print("other stacks of blocks (model.blocks): " + ", ".join(f"{name} x {count}" for name, count, _p in others))
    print("coverage (every linear layer targeted, as `targets = [\"Linear\"]`): " + "\n".join(coverage.lines()))
    print(f"attention: {len(structure.attention)} site(s) " + ", ".join(f"{s.kind}" for s in structure.attention))
    groups = {name: i for i, g in enumerate(structure.input_groups) for name in g}
    width = max([len(layer.local_name) for layer in layers] + [len(b.local_name) + 7 for s in executor.structures() for b in s.experts])
    print(f"  {'linear':<{width}}  {'class':<8} {'role':<6} {'out x in':<12} {'input':<6} rows")
    first_entry: dict[str, str] = {}
    for layer in layers:
        out_f, in_f = layer.shape
        rows = _rows_text(layer.rows) if layer.rows else ""
        name, experts = layer.local_name, structure.expert_lists.get(layer.expert_list or "")
        if experts:  # the first expert stands for its list
            entry, _, inner = name[len(layer.expert_list) + 1 :].partition(".")
            if first_entry.setdefault(layer.expert_list, entry) != entry:
                continue
            name, rows = f"{layer.expert_list}.*.{inner}", f"x {experts} experts (a list of modules)"
        print(f"  {name:<{width}}  {type(layer.module).__name__:<8} {layer.role:<6} "
              f"{f'{out_f}x{in_f}':<12} {f'#{groups.get(layer.owner, -1)}':<6} {rows}".rstrip())
    shown = set()
    for bank in (b for s in executor.structures() for b in s.experts):
        if bank.local_name in shown:
            continue
        shown.add(bank.local_name)
        how = f"x {bank.experts} experts (a 3-D bank{', used transposed' if bank.transposed else ''})"
        pieces = {la.local_name: la for la in all_layers if la.is_expert and la.owner == f"{bank.local_name}.0"}
        for expert in pieces.values():  # expert 0 of each block stands for the bank (its pieces, once)
            out_f, in_f = expert.shape
            name = bank.local_name + (expert.local_name[len(expert.owner):] if expert.rows else "")
            print(f"  {name:<{width}}  {'experts':<8} {expert.role:<6} {f'{out_f}x{in_f}':<12} {'-':<6} {how}"
                  + (f", {_rows_text(expert.rows)}" if expert.rows else ""))
    return 0


def _rows_text(rows: tuple[int, ...]) -> str:
    """`rows 0..32 of the fused weight`, or `rows 0..64 step 2` for an interleaved slice."""
    step = f" step {rows[2]}" if len(rows) > 2 and rows[2] != 1 else ""
    return f"rows {rows[0]}..{rows[1]}{step} of the fused weight"


def _eval_runner(args: argparse.Namespace, source: str) -> tuple[Any, Any]:
    """(the model, a `ModelRunner` over it) for `d2c eval`: loaded whole, or with --streaming read block by
    block from its files. Either way one block is on the device at a time."""
    from d2compiler.execution.runner import ModelRunner
    from d2compiler.loading.dtypes import resolve_device
    from d2compiler.loading.models import load_model, load_streamed

    device = resolve_device(args.device)
    if args.streaming:
        loaded, streamed = load_streamed(source, args.dtype, args.device)
        return loaded, ModelRunner(loaded.model, device, streamed=streamed)
    loaded = load_model(source, args.dtype, args.device)
    return loaded, ModelRunner(loaded.model, device)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from d2compiler.evaluation.evaluate import make_metric
    from d2compiler.evaluation.sources import resolve_source
    from d2compiler.recipe.schema import EvaluationData

    loaded, runner = _eval_runner(args, args.model)
    if args.task:
        return _zero_shot(args, loaded, runner)
    try:
        spec = EvaluationData(source=args.data, config=args.config, split=args.split, field=args.field, seq_len=args.seq_len,
                              max_windows=args.max_windows, metric=args.metric)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise D2Error(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    metric = make_metric(resolve_source(spec, loaded.model, "data.evaluation"), loaded.model, loaded.tokenizer, quiet=args.quiet)
    if metric.needs_dense:
        if not args.reference:
            raise D2Error(f"--reference: {metric.name} compares {args.model} with a dense model; name it with --reference")
        metric.dense(_eval_runner(args, args.reference)[1])
    value = metric.measure(runner)
    out = {"model": args.model, "data": args.data, "metric": metric.name, "value": value, "count": metric.count}
    if metric.name == "perplexity":
        out |= {"seq_len": args.seq_len, "windows": metric.count, "ppl": value}
    print(json.dumps(out))
    return 0


def _zero_shot(args: argparse.Namespace, loaded: Any, runner: Any) -> int:
    from pathlib import Path

    from d2compiler.evaluation.zeroshot import DEFAULT_FILES, evaluate_task, load_task

    options = {"include_path": args.include_path, "limit": args.limit, "num_fewshot": args.num_fewshot,
               "batch_size": args.batch_size, "quiet": args.quiet}
    extra = {}
    if args.task in DEFAULT_FILES and args.data != "hub" and not args.include_path:
        path = Path(args.data) if args.data != "builtin:python-docs" else Path("../shared/data") / DEFAULT_FILES[args.task]
        items = load_task(args.task, path)[: args.limit]
        result = evaluate_task(runner, loaded.model, loaded.tokenizer, args.task, items=items, **{**options, "limit": None})
        extra["data"] = str(path)
    else:
        result = evaluate_task(runner, loaded.model, loaded.tokenizer, args.task, **options)
    print(json.dumps({"model": args.model, "task": args.task, **result, **extra}))
    return 0


def _at_least(low: int):
    """An argparse type: an integer >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        return value
    return parse


def _global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", default=default, help="no progress bars or info logs")
    parser.add_argument("--verbose", "-v", action="store_true", default=default, help="debug logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2c", description="d2compiler: declarative, pass-based compression of transformer models.")
    _global_flags(parser, False)
    common = argparse.ArgumentParser(add_help=False)  # the same flags after the subcommand
    _global_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    real_add = sub.add_parser
    sub.add_parser = lambda *a, **k: real_add(*a, parents=[common], **k)  # type: ignore[method-assign]

    sub.add_parser("schema", help="print the recipe JSON Schema").set_defaults(func=_cmd_schema)

    def recipe_cmd(name: str, help_: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="recipe file (.toml or .json)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. passes.1.sparsity=0.6 (repeatable)")
        p.add_argument("--model", help="override model.source")
        p.set_defaults(func=func)
        return p

    recipe_cmd("validate", "check a recipe without running it", _cmd_validate)
    run = recipe_cmd("run", "compress a model as a recipe says", _cmd_run)
    run.add_argument("--output", help="override output.path")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--restart", action="store_true", help="ignore checkpoints of an earlier killed run (output.resume=false)")
    run.add_argument("--nproc", type=_at_least(1), default=1, help="run in N processes on this machine (torchrun; gloo on the "
                     "CPU, one GPU each with NCCL): calibration windows and layer solves are shared; see docs/distributed.md. "
                     "N is checked first against the GPUs, the CPU cores and the memory `d2c plan` estimates per process")
    run.add_argument("--oversubscribe", action="store_true", help="--nproc: start N processes even beyond the CPU cores "
                     "or the memory available (never beyond the GPUs)")

    plan = recipe_cmd("plan", "without running: the pass schedule per block, the linears each pass touches, "
                      "and an estimate of peak memory and time", _cmd_plan)
    plan.add_argument("--nproc", type=_at_least(1), default=1, help="also project the time for N processes (d2c run --nproc N)")
    plan.add_argument("--link-gbs", type=float, default=100.0, help="--nproc: bandwidth between processes assumed by the "
                      "projection, GB/s (default 100: NVLink-class; ~25 for PCIe)")

    exp = sub.add_parser("export", help="convert a d2c output folder: ONNX, the packed 2:4 checkpoint, compressed-tensors, or a dense folder")
    exp.add_argument("output_dir", help="a folder written by `d2c run`")
    exp.add_argument("--format", required=True, choices=["onnx", "d2c-packed", "hf", "compressed-tensors"],
                     help="compressed-tensors: the int4/int8 checkpoint vLLM and transformers load (needs quantized layers)")
    exp.add_argument("--to", required=True, help="destination folder (written atomically)")
    exp.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="cast floating weights (not for onnx)")
    exp.add_argument("--sparse-initializers", action="store_true", help="onnx: store pruned weights as sparse_initializer")
    exp.add_argument("--external-data", choices=["auto", "always", "never"], default="auto",
                     help="onnx: store the weights in model.onnx.data beside model.onnx (auto: when they pass 1 GiB; "
                     "a single protobuf cannot hold more than 2 GiB)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    exp.set_defaults(func=_cmd_export)

    insp = sub.add_parser("inspect", help="show blocks, linears, roles and shapes of a model")
    insp.add_argument("model", help="HF id or folder, .gguf, .safetensors, or builtin:smollm2-135m")
    insp.add_argument("--tokens", type=_at_least(2), default=16, help="length of the dummy input used for tracing")
    insp.set_defaults(func=_cmd_inspect)

    ev = sub.add_parser("eval", help="perplexity, embedding similarity, accuracy or zero-shot accuracy of a model "
                        "or of a d2c output folder")
    ev.add_argument("model")
    ev.add_argument("--data", default="builtin:python-docs", help="text or image source (see `d2c schema`, DataSource); "
                    "with --task, the task's JSONL (default ../shared/data/zeroshot/...)")
    ev.add_argument("--metric", default="auto", choices=["auto", "perplexity", "embedding_cosine", "accuracy"],
                    help="auto: perplexity for causal LMs, accuracy for image classifiers, embedding_cosine for encoders")
    ev.add_argument("--reference", default=None, help="embedding_cosine: the dense model to compare with")
    ev.add_argument("--task", help="an lm-eval-harness task, scored by lm-eval (acc, acc_norm, ...) instead of "
                    "perplexity: piqa and arc_easy read the local files (--data; default ../shared/data/zeroshot/...), "
                    "any other name is a task YAML under --include-path or one of lm-eval's registered tasks")
    ev.add_argument("--include-path", default=None, help="--task: a folder of lm-eval task YAMLs (e.g. over local files, offline)")
    ev.add_argument("--limit", type=_at_least(1), default=None, help="--task: score only the first N items")
    ev.add_argument("--num-fewshot", type=_at_least(0), default=None, help="--task: few-shot examples per item (lm-eval)")
    ev.add_argument("--batch-size", type=_at_least(1), default=8, help="--task: requests per forward (lm-eval)")
    ev.add_argument("--config", default=None)
    ev.add_argument("--split", default="test")
    ev.add_argument("--field", default="text")
    ev.add_argument("--seq-len", type=_at_least(8), default=512)
    ev.add_argument("--max-windows", type=_at_least(1), default=None)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--streaming", action="store_true", help="never hold the whole model in memory: read each block "
                    "from the safetensors files when its turn comes (a GGUF or hub model is converted once)")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line. Exit status: 0 done, 2 a problem with the input or environment (one
    located line on stderr), 1 a bug in d2compiler (a traceback under a one-line summary)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if args.quiet and args.command != "schema":  # transformers' own weight-loading bars
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        return args.func(args)
    except D2Error as exc:
        if args.verbose and exc.__cause__ is not None:  # e.g. the exception a pass raised (`invariants.blamed`)
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(report_error(2, f"error: {exc}"), file=sys.stderr)
        return 2
    except RecursionError:
        print("error: input nested too deeply to process", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `d2c schema | head -1`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception:
        print(report_error(1, "internal error: this is a bug in d2compiler; please report it with the traceback below"),
              file=sys.stderr)
        traceback.print_exc()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
