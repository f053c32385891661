"""Content keys of source files, remembered by where the file is and when it last changed.

A converted-model cache keyed by a file's path and mtime grows by one full copy every time the same
file appears under a new path or with a new mtime (a fresh virtual environment reinstalls the model
package: same bytes, new path). Keying by the file's sha256 instead converts the same bytes once.
Hashing a large file on every load would cost seconds, so the sha256 of each (path, size, mtime) is
remembered in a small JSON index beside the cache; a file whose stat changed is hashed again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from d2compiler.execution.checkpoint import file_sha256

log = logging.getLogger(__name__)


def _stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_index(index: Path) -> dict[str, str]:
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: it is only a memo, rebuilt by hashing
    return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(entries, dict) else {}


def content_key(path: Path, index: Path) -> str:
    """The sha256 of `path`'s bytes; taken from `index` when this path, size and mtime were hashed
    before, else computed and recorded there (written atomically; an index that cannot be written
    costs a rehash next time, nothing else). Entries of files that no longer exist are dropped."""
    entries = _read_index(index)
    key = _stat_key(path)
    if key in entries:
        return entries[key]
    log.info("hashing %s (once per path, size and mtime)", path)
    digest = file_sha256(path)
    kept = {k: v for k, v in entries.items() if Path(k.rsplit("|", 2)[0]).exists()}
    kept[key] = digest
    tmp = None
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{index.name}-", dir=index.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(kept, f, indent=0, sort_keys=True)
        os.replace(tmp, index)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return digest


def known_digests(index: Path) -> set[str]:
    """The sha256 values `index` remembers (of files that existed when it was last written)."""
    return set(_read_index(index).values())
