"""Progress bars (tqdm on stderr), silenced by `--quiet`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, disable: bool = False, total: int | None = None,
             initial: int = 0) -> Iterable[T]:
    """Wrap an iterable in a progress bar unless `disable`."""
    return tqdm(items, desc=desc, disable=disable, total=total, initial=initial, leave=False, dynamic_ncols=True)


def counter(total: int, *, desc: str, disable: bool = False) -> tqdm:
    """A progress bar advanced by hand (`.update(1)`); close it when done."""
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)
