"""The transformers output folder: config, tokenizer, safetensors weights, `sparsity.json` and
`report.html`, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .output_dir import atomic_output_dir
from .report import write_report


def write_hf_folder(path: Path, model: nn.Module, tokenizer: Any, record: dict[str, Any], *, overwrite: bool) -> Path:
    """Write a folder that `from_pretrained` loads; nothing appears at `path` until it is complete."""
    with atomic_output_dir(path, overwrite) as tmp:
        model.to("cpu")
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "sparsity.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        write_report(tmp, json.loads(json.dumps(record, default=str)))
    return path
