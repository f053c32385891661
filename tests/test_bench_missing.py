"""`bench/quality.py --missing` (also `bench/moe.py --missing`): an interrupted table continues only
at the commit it started from, with a clean tree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402


def _record(key: str, commit: str, dirty: bool = False) -> dict:
    return {"key": key, "provenance": {"commit": commit, "dirty": dirty}}


@pytest.mark.parametrize(("here_dirty", "left"), [(False, ["b", "c", "d"]), (True, ["a", "b", "c", "d"])])
def test_missing_keeps_what_this_clean_commit_has_not_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               here_dirty: bool, left: list[str]) -> None:
    out = tmp_path / "quality.json"
    out.write_text(json.dumps([_record("a", "c1"), _record("b", "c0"), _record("c", "c1", dirty=True)]))
    monkeypatch.setattr(quality, "provenance", lambda: {"commit": "c1", "dirty": here_dirty})
    configs = [{"name": name} for name in "abcd"]
    kept = quality.missing(configs, out, lambda cfg: cfg["name"])
    assert [cfg["name"] for cfg in kept] == left


def test_missing_without_a_results_file_keeps_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality, "provenance", lambda: {"commit": "c1", "dirty": False})
    assert quality.missing([{"name": "a"}], tmp_path / "absent.json", lambda cfg: cfg["name"]) == [{"name": "a"}]
