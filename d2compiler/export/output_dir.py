"""Atomic output folders: everything is written to a temporary sibling folder, which is renamed
onto the output path only when complete. An existing output is replaced only with `overwrite`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


def check_output_path(path: Path, overwrite: bool) -> None:
    """Fail early (before any compute) if `path` cannot be (re)written."""
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite (or output.overwrite = true) to replace it")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write to {probe}")


@contextmanager
def atomic_output_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `path`, on failure it is removed."""
    check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(trash / "old")
            tmp.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
