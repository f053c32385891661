"""The scale share of the bench/ smoke runs (tests/test_bench_smoke.py has the split and its check)."""

from __future__ import annotations

import pytest

from tests.bench_smoke import run_smoke
from tests.test_bench_smoke import SPLIT


@pytest.mark.parametrize("script", SPLIT["test_bench_smoke_scale.py"])
def test_bench_script_smoke(script, smoke_dir):
    run_smoke(script, smoke_dir)
