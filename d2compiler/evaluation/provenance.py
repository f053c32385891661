"""The local files a data source reads, so that a result can record their sha256 (provenance)."""

from __future__ import annotations

from pathlib import Path

from d2compiler.evaluation.data import BUILTIN_PYTHON_DOCS
from d2compiler.evaluation.images import BUILTIN_DIGITS


def data_files(source: str) -> list[Path]:
    """The file itself for a local source; for a builtin corpus the installed file it is read from
    (`pydoc_data/topics.py` differs between Python versions, scikit-learn's digits between releases);
    nothing for a hub dataset (its revision is the hub's to record)."""
    if source == BUILTIN_PYTHON_DOCS:
        import pydoc_data.topics

        return [Path(pydoc_data.topics.__file__)]
    if source == BUILTIN_DIGITS:
        import importlib.util

        spec = importlib.util.find_spec("sklearn")
        found = [] if spec is None or spec.origin is None else sorted(Path(spec.origin).parent.glob("datasets/data/digits.csv*"))
        return found[:1]
    path = Path(source).expanduser()
    return [path.resolve()] if path.is_file() else []
