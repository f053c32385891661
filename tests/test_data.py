"""Text sources, the "\\n\\n" protocol, and windows."""

from __future__ import annotations

import pytest
import torch

from d2compiler.errors import DataError
from d2compiler.evaluation.data import calibration_windows, evaluation_windows, load_rows, python_docs_rows

from .conftest import SHARED_DATA


def test_python_docs_parts_are_disjoint_and_cover_everything():
    from pydoc_data.topics import topics

    cal, ev = python_docs_rows("calibration"), python_docs_rows("evaluation")
    assert cal and ev and not set(cal) & set(ev)
    assert len(cal) + len(ev) == len(topics)
    assert sum(map(len, cal)) > 2 * sum(map(len, ev))


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_wikitext_rows_match_hf_protocol():
    rows = load_rows(str(SHARED_DATA / "wikitext-2-raw-v1" / "wiki.test.raw"), "evaluation")
    assert len(rows) == 4358  # the HF num_examples of the test split
    assert sum(len(r.encode()) + 4 for r in rows) == 1_305_088  # HF dataset_info num_bytes
    c4 = load_rows(str(SHARED_DATA / "c4" / "c4_demo_llamafactory.jsonl"), "calibration")
    assert len(c4) == 300


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no string field 'text'"):
        load_rows(str(bad), "calibration")
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "missing.txt"), "calibration")
    with pytest.raises(DataError, match="unknown builtin"):
        load_rows("builtin:nope", "calibration")


def test_windows():
    ids = torch.arange(1000).view(1, -1)
    wins = calibration_windows(ids, 3, 100)
    assert [w[0, 0].item() for w in wins] == [0, 100, 200]
    rnd = calibration_windows(ids, 3, 100, sampling="random", seed=1)
    assert rnd[0].shape == (1, 100)
    assert all(torch.equal(a, b) for a, b in zip(rnd, calibration_windows(ids, 3, 100, sampling="random", seed=1)))
    assert len(evaluation_windows(ids, 300)) == 3
    assert len(evaluation_windows(ids, 300, max_windows=2)) == 2
    with pytest.raises(DataError, match="too little calibration text: 1000 tokens"):
        calibration_windows(ids, 11, 100)
    with pytest.raises(DataError, match="too little evaluation text"):
        evaluation_windows(ids, 2000)
    with pytest.raises(DataError, match="^corpus.txt: too little evaluation text"):
        evaluation_windows(ids, 2000, source="corpus.txt")
    with pytest.raises(DataError, match="^corpus.txt: too little calibration text"):
        calibration_windows(ids, 11, 100, source="corpus.txt")


def test_calibration_offset_gives_disjoint_sets():
    """Seed k of a benchmark: offset = k x samples, the k-th disjoint block of consecutive windows."""
    from d2compiler.evaluation.data import select_windows
    from d2compiler.recipe.schema import validate_recipe

    ids = torch.arange(1000).view(1, -1)
    sets = [calibration_windows(ids, 3, 100, offset=3 * k) for k in range(3)]
    starts = [[w[0, 0].item() for w in s] for s in sets]
    assert starts == [[0, 100, 200], [300, 400, 500], [600, 700, 800]]
    with pytest.raises(DataError, match="after 8 skipped windows"):
        calibration_windows(ids, 3, 100, offset=8)
    rows = torch.arange(20).view(10, 2)
    assert [r[0, 0].item() for r in select_windows(rows, 2, offset=4)] == [8, 10]
    with pytest.raises(DataError, match="from row 9"):
        select_windows(rows, 2, offset=9)
    with pytest.raises(Exception, match="'offset' applies to sampling = 'sequential' only"):
        validate_recipe({"version": 1, "model": {"source": "x"}, "passes": [{"type": "calibrate"}],
                         "data": {"calibration": {"offset": 32, "sampling": "random"}}})
