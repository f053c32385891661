"""Text corpora and token windows for calibration and evaluation.

Every source is reduced to a list of rows joined with "\\n\\n", the protocol SparseGPT and Wanda use
for WikiText-2 (see `../shared/data/README.md`): a text file gives one row per line, with
whitespace-only lines as empty rows, exactly as the HF `text` loader does; a jsonl file gives the
`field` of each line; an HF dataset gives the `field` of each row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from d2compiler.errors import DataError

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
TOKEN_WINDOWS_KEY = "input_ids"
CALIBRATION_FRACTION = 0.75

Part = Literal["calibration", "evaluation"]


def python_docs_rows(part: Part) -> list[str]:
    """The stdlib `pydoc_data.topics` prose, topics in sorted order. The first 75% of topics (by
    characters) are the calibration part and the rest the evaluation part, so they never overlap."""
    from pydoc_data.topics import topics

    rows = [topics[k] for k in sorted(topics)]
    total = sum(len(r) for r in rows)
    seen, cut = 0, len(rows)
    for i, row in enumerate(rows):
        if seen >= CALIBRATION_FRACTION * total:
            cut = i
            break
        seen += len(row)
    return rows[:cut] if part == "calibration" else rows[cut:]


def _text_file_rows(path: Path, max_chars: int | None = None) -> list[str]:
    rows: list[str] = []
    total = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if max_chars is not None and total >= max_chars:
                break
            rows.append(line if line.strip() else "")
            total += len(rows[-1]) + 2
    return rows


def _jsonl_rows(path: Path, field: str, max_chars: int | None = None) -> list[str]:
    rows: list[str] = []
    total = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_chars is not None and total >= max_chars:
                break
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(item, dict) or not isinstance(item.get(field), str):
                raise DataError(f"{path}:{lineno}: no string field {field!r}")
            rows.append(item[field])
            total += len(item[field]) + 2
    return rows


def _hf_rows(name: str, config: str | None, split: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a required dependency
        raise DataError(f"{name}: the `datasets` package is needed for hub datasets") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many unrelated types for a missing dataset
        raise DataError(f"{name}: cannot load dataset (config={config!r}, split={split!r}): {exc}") from None
    if field not in ds.column_names:
        raise DataError(f"{name}: no column {field!r}; columns: {ds.column_names}")
    return list(ds[field])


def load_rows(source: str, part: Part, *, config: str | None = None, split: str = "test", field: str = "text",
              max_chars: int | None = None) -> list[str]:
    """The rows of a text source (see the module docstring). `max_chars`: a local file is read only
    until its rows hold that many characters (joined), plus at most one row."""
    if source == BUILTIN_PYTHON_DOCS:
        return python_docs_rows(part)
    if source.startswith("builtin:"):
        raise DataError(f"unknown builtin corpus {source!r}; the builtin is {BUILTIN_PYTHON_DOCS!r}")
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return _jsonl_rows(path, field, max_chars) if path.suffix == ".jsonl" else _text_file_rows(path, max_chars)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text: {exc}") from None
    if path.exists():
        raise DataError(f"{source}: not a file")
    if source.startswith((".", "/", "~")) or path.suffix in (".txt", ".raw", ".jsonl", ".json"):
        raise DataError(f"{source}: no such file")
    return _hf_rows(source, config, split, field)


def load_text(source: str, part: Part, **kwargs: Any) -> str:
    """Rows joined with "\\n\\n"."""
    return "\n\n".join(load_rows(source, part, **kwargs))


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of the whole text, shape (1, n), without a length warning."""
    if tokenizer is None:
        raise DataError("this model has no tokenizer, so text data cannot be used with it")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids


SLACK_TOKENS = 64  # tokens beyond the ones needed: a cut text changes at most its last word's tokens


def leading_tokens(tokenizer: Any, source: str, part: Part, need: int, **kwargs: Any) -> torch.Tensor:
    """The token ids of `source` ("\n\n"-joined rows), at least its first `need` of them (all when
    it has fewer), equal to those of tokenizing the whole text: a local file is read and tokenized
    only as far as they need (8 characters per token at first, doubled until there is `need` +
    SLACK_TOKENS), so a huge corpus costs what the windows cost."""
    chars = 8 * (need + SLACK_TOKENS)
    while True:
        text = load_text(source, part, max_chars=chars, **kwargs)
        if len(text) <= chars:
            return tokenize(tokenizer, text)  # the whole source
        ids = tokenize(tokenizer, text[:chars])
        if ids.shape[1] >= need + SLACK_TOKENS:
            return ids
        chars *= 2


def _at(source: str | None) -> str:
    """The location that starts an error message about `source` ("" when there is none)."""
    return f"{source}: " if source else ""


def calibration_windows(
    ids: torch.Tensor, samples: int, seq_len: int, *, sampling: str = "sequential", seed: int = 0, offset: int = 0,
    source: str | None = None,
) -> list[torch.Tensor]:
    """`samples` windows of `seq_len` tokens, each shaped (1, seq_len): consecutive ones from window
    `offset` on, or at random offsets drawn with `seed`. Too few tokens: a DataError naming `source`."""
    n = ids.shape[1]
    if sampling == "sequential":
        need = (offset + samples) * seq_len
        if n < need:
            skipped = f" after {offset} skipped windows" if offset else ""
            raise DataError(
                f"{_at(source)}too little calibration text: {n} tokens, but {samples} windows of {seq_len}{skipped} "
                f"need {need}; use fewer samples, a shorter seq_len, a smaller offset or a larger corpus"
            )
        return [ids[:, i * seq_len : (i + 1) * seq_len] for i in range(offset, offset + samples)]
    if n <= seq_len:
        raise DataError(f"{_at(source)}too little calibration text: {n} tokens, need more than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len, (samples,), generator=gen).tolist()
    return [ids[:, s : s + seq_len] for s in starts]


def evaluation_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None,
                       source: str | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of `seq_len` tokens (the tail shorter than a window is dropped). Not
    one window: a DataError naming `source`."""
    count = ids.shape[1] // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(f"{_at(source)}too little evaluation text: {ids.shape[1]} tokens, less than one window of {seq_len}")
    return [ids[:, i * seq_len : (i + 1) * seq_len] for i in range(count)]


def is_token_windows_file(source: str) -> bool:
    """A `.safetensors` file holding an `input_ids` tensor: pre-tokenized windows."""
    path = Path(source).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    return TOKEN_WINDOWS_KEY in safetensors_keys(source)  # not readable as safetensors: the image loader reports it


def safetensors_keys(source: str) -> list[str]:
    """The tensor names of a safetensors file ([] when it cannot be read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(source).expanduser()), "pt") as f:
            return sorted(f.keys())
    except Exception:  # safetensors raises its own error type for every kind of damage
        return []


def load_token_windows(source: str, seq_len: int, vocab_size: int | None) -> torch.Tensor:
    """The windows of a pre-tokenized file: `input_ids`, an integer tensor (windows, seq_len), every
    id below `vocab_size`. Used as they are (no tokenizer), so two tools can get the same tokens."""
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    ids = load_file(str(path))[TOKEN_WINDOWS_KEY]
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 2:
        raise DataError(f"{path}: input_ids must be an integer tensor (windows, seq_len), got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[1] != seq_len:
        raise DataError(f"{path}: windows of {ids.shape[1]} tokens, but seq_len is {seq_len}")
    if ids.numel() and (int(ids.min()) < 0 or (vocab_size and int(ids.max()) >= vocab_size)):
        raise DataError(f"{path}: token ids outside the model's vocabulary (0..{vocab_size})")
    return ids.long()


def select_windows(ids: torch.Tensor, samples: int, *, sampling: str = "sequential", seed: int = 0, source: str = "",
                   offset: int = 0) -> list[torch.Tensor]:
    """`samples` of the pre-tokenized windows `ids`: the ones from row `offset` on, or distinct ones drawn with `seed`."""
    if offset + samples > ids.shape[0]:
        raise DataError(f"{source}: {samples} windows asked for{f' from row {offset}' if offset else ''}, the file has {ids.shape[0]}")
    if sampling == "sequential":
        rows = torch.arange(offset, offset + samples)
    else:
        rows = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))[:samples]
    return [ids[int(i) : int(i) + 1] for i in rows]
