"""Output folders that never destroy what d2compiler does not own.

- Paths given by the user expand `~` and are resolved against the working directory.
- An output path may not be the working directory (or contain it), and may not be equal to, inside of
  or contain a protected path (the model source, the data files).
- An existing output is replaced only with `overwrite` (the command line's `--overwrite`), and only
  when it is empty or was written by d2compiler (`sparsity.json` with `written_by = "d2compiler"`).
- Everything is written to a temporary sibling (`.NAME.tmp-*`) renamed onto the path when complete;
  a run holds `.NAME.d2c-lock` (an advisory `flock`, released by the kernel when the process dies),
  so two runs never write one output, and the holder removes temporary siblings that killed runs left.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from d2compiler.errors import OutputError

OWNER_KEY = "written_by"
OWNER = "d2compiler"
RECORD_FILE = "sparsity.json"


def user_path(raw: str | Path) -> Path:
    """A user-given path: `~` expanded, made absolute against the working directory."""
    return Path(os.path.abspath(Path(raw).expanduser()))


def owned_by_us(path: Path) -> bool:
    """True for an empty folder or one that d2compiler wrote (its record carries our marker)."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        record = json.loads((path / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get(OWNER_KEY) == OWNER


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (null), so that it is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Write `sparsity.json` into an output being assembled, with the marker that makes it ours.
    Standard JSON: a value that is not finite (a diverged perplexity) is written as null."""
    record = finite_json(json.loads(json.dumps({**record, OWNER_KEY: OWNER}, default=str)))
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")


def _related(a: Path, b: Path) -> str | None:
    """How `a` relates to `b`: 'is', 'is inside' or 'contains' (None: unrelated)."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


SIBLING_EXTRA = len(".") + len(".tmp-") + 8  # the longest sibling a run writes: `.NAME.tmp-XXXXXXXX`


def name_max(path: Path) -> int:
    """The longest file name (bytes) the file system of `path`'s nearest existing ancestor allows."""
    for ancestor in path.parents:
        try:
            return os.pathconf(ancestor, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def check_name_lengths(path: Path) -> None:
    """Refuse a path with a name the file system cannot hold, counting the siblings a run writes
    beside the output (`.NAME.tmp-XXXXXXXX`, `.NAME.d2c-work`, `.NAME.d2c-lock`)."""
    limit = name_max(path)
    for part in path.parts[:-1]:
        if len(os.fsencode(part)) > limit:
            raise OutputError(f"{path}: the folder name {part[:40]}... is {len(os.fsencode(part))} bytes; the file system "
                              f"allows {limit}")
    size = len(os.fsencode(path.name))
    if size > limit - SIBLING_EXTRA:
        raise OutputError(f"{path.parent / (path.name[:40] + '...')}: the output name is {size} bytes; at most "
                          f"{limit - SIBLING_EXTRA} (the file system allows {limit}, and a run writes "
                          f"`.NAME.tmp-XXXXXXXX` beside the output)")
    if len(os.fsencode(str(path))) >= os.pathconf("/", "PC_PATH_MAX") - SIBLING_EXTRA - 64:
        raise OutputError(f"{str(path)[:60]}...: the output path is {len(os.fsencode(str(path)))} bytes, too long for "
                          "this system's paths")


def check_output_path(path: Path, overwrite: bool, protected: Iterable[Path] = ()) -> None:
    """Fail early (before any compute) if `path` cannot be written without harm."""
    path = user_path(path)
    check_name_lengths(path)
    cwd = Path.cwd().resolve()
    real = path.resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{path}: the output may not be the working directory or contain it")
    for item in protected:
        relation = _related(real, user_path(item).resolve())
        if relation:
            raise OutputError(f"{path}: the output {relation} {item}, which this run reads; choose another output path")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
        if path.is_symlink() or not path.is_dir():
            raise OutputError(f"{path}: exists and is not a folder; refusing to replace it")
        if not owned_by_us(path):
            raise OutputError(f"{path}: not written by d2compiler (no {RECORD_FILE} with its marker) and not empty; "
                              "refusing to replace it")
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write to {probe}")


def check_free_space(path: Path, needed_bytes: int) -> None:
    """Refuse to start when the file system of `path` has less than `needed_bytes` free."""
    probe = user_path(path)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise OutputError(f"{path}: {free / 2**20:.0f} MiB free on that file system, but the output and its "
                          f"checkpoints need about {needed_bytes / 2**20:.0f} MiB")


def _siblings(path: Path, *suffixes: str) -> list[Path]:
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].startswith(suffixes)]


@contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold `.NAME.d2c-lock` beside `path` for the duration; a second holder is refused. The holder
    removes `.NAME.tmp-*` / `.NAME.old-*` folders that killed runs left."""
    path = user_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.d2c-lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create the lock file {lock}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(f"{path}: another d2c process is writing this output (it holds {lock}); "
                                  "wait for it to finish or choose another output path") from None
            raise
        try:  # the previous holder may have unlinked the file between our open and flock: retry
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        for stale in _siblings(path, "tmp-", "old-"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def atomic_output_dir(path: Path, overwrite: bool, protected: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `path`, on failure it is removed. Write errors
    (a full disk) become an `OutputError` naming the path."""
    path = user_path(path)
    check_output_path(path, overwrite, protected)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        try:
            yield tmp
        except OSError as exc:
            raise OutputError(f"{path}: writing the output failed: {exc.strerror or exc}") from None
        except Exception as exc:
            if "No space left" in str(exc) or "Disk quota" in str(exc) or type(exc).__name__ == "SafetensorError":
                raise OutputError(f"{path}: writing the output failed: {exc}") from None
            raise
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(trash / "old")
            tmp.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
