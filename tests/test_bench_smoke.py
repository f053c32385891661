"""Every script in bench/ runs at HEAD in smoke mode, so no benchmark can rot unseen (tests/bench_smoke.py).
This file runs the tuning, quality and layer-error scripts; test_bench_smoke_scale.py and test_bench_smoke_moe.py the
rest, so that `--dist loadfile` puts the three on different workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_smoke import BENCH, SCRIPTS, run_smoke

SPLIT = {  # test file -> its scripts, about a third of the smoke time each (durations of `make test`)
    # in this order and in one folder: best_options.py and run_d2prune.sh read the tuning.json tune_d2prune.sh writes
    "test_bench_smoke.py": ["tune_d2prune.sh", "best_options.py", "run_d2prune.sh", "quality.py", "layer_errors.py"],
    "test_bench_smoke_scale.py": ["scale.py", "deploy.py", "cost.py", "dtypes.py", "compressed_export.py", "ct_layout.py",
                                  "attention_fidelity.py", "zeroshot.py", "digits_vit.py"],
    "test_bench_smoke_moe.py": ["moe_scale.py", "moe.py", "gpu_check.py", "moe_allocation.py", "distributed.py", "arch.py",
                                "onnx_large.py", "moe_solves.py"],
}


def test_every_bench_script_is_covered_once():
    scripts = {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh") and p.name != "protocol.py"}
    assert scripts == set(SCRIPTS) | {"llmc_job.py", "llmc_quant_job.py", "upcycle.py"}  # run by cost.py and ct_layout.py
    # (in their own venv) and by moe.py
    split = [s for names in SPLIT.values() for s in names]
    assert sorted(split) == sorted(SCRIPTS), "every script in exactly one smoke test file"
    assert all((Path(__file__).parent / name).is_file() for name in SPLIT)


@pytest.mark.parametrize("script", SPLIT["test_bench_smoke.py"])
def test_bench_script_smoke(script, smoke_dir):
    run_smoke(script, smoke_dir)
