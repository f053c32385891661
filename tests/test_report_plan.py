"""`report.html` (rendered in headless Chromium) and `d2c plan`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from d2compiler.cli import main

from .conftest import write_recipe

D2 = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\n'
      '[[passes]]\ntype = "dual_taylor_mask"\nsparsity = 0.6\nignore = ["role:down"]\n')


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("report")
    recipe = write_recipe(root / "r.toml", str(tiny_models["llama"]), D2, output=root / "out",
                          extra='[data.evaluation]\nsource = "builtin:python-docs"\nseq_len = 64\nmax_windows = 2\n')
    assert main(["--quiet", "run", str(recipe)]) == 0
    return root / "out"


def test_report_has_every_section(pruned):
    page = (pruned / "report.html").read_text()
    for title in ("Sparsity per layer", "reconstruction error", "Attention KL", "Time per block", "Memory"):
        assert title in page
    record = json.loads((pruned / "sparsity.json").read_text())
    assert f"{record['results']['pruned_ppl']:.4g}" in page and f"{record['results']['dense_ppl']:.4g}" in page
    for png in re.findall(r'src="(report/[^"]+\.png)"', page):
        assert (pruned / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (make browser)")
def test_report_renders_in_headless_chromium(pruned, tmp_path):
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
           f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*cmd, "--dump-dom", (pruned / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, dom.stderr[-2000:]
    assert loaded.group(1) == loaded.group(2) and int(loaded.group(2)) >= 5  # every figure decoded
    shot = tmp_path / "page.png"
    subprocess.run([*cmd, f"--screenshot={shot}", "--window-size=1200,2000", (pruned / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a page with figures, not a blank screen


def test_plan_lists_schedule_layers_and_estimates(tmp_path, tiny_models, capsys):
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), D2)
    assert main(["--quiet", "plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "1. calibrate" in out and "2. attention_kl_update" in out and "3. dual_taylor_mask" in out
    assert "blocks 0-1:" in out
    touched = re.search(r"dual_taylor_mask\s+(.*)", out.split("per block")[1]).group(1)
    assert "self_attn.q_proj (q)" in touched and "mlp.gate_proj (gate)" in touched and "down_proj" not in touched
    assert re.search(r"time\s+total\s+[\d.]+ s", out) and re.search(r"memory peak \(sum\)\s+\d+ MiB", out)
    assert not (tmp_path / "out").exists()


def test_plan_counts_the_survey_and_true_sequential_forwards(tmp_path, tiny_models, capsys):
    from d2compiler.driver.plan import make_plan
    from d2compiler.recipe.schema import load_recipe

    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsity_allocation"\nprofile = "error"\n'
              '[[passes]]\ntype = "sparsegpt"\nsparsity = 0.6\ntrue_sequential = true\n')
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes)
    assert main(["--quiet", "plan", str(recipe)]) == 0
    assert "further block forwards (survey, true-sequential stages, expert groups, block-output scoring)" in capsys.readouterr().out
    estimate = make_plan(load_recipe(recipe)).estimate_s
    further = estimate["further block forwards (survey, true-sequential stages, expert groups, block-output scoring)"]
    # 3 stages more, and the survey's dense run and trial on all 4 samples (it asks for 8): 5 against the usual 2
    assert further == pytest.approx(2.5 * estimate["block forwards (observe + re-forward)"])


def test_plan_counts_the_dense_targets_kept_inputs(tmp_path, tiny_models):
    """The dense target holds a block's observed layer inputs (one float32 per shared input) and a second
    stream of hidden states: the plan's memory says so, sized from the block's input widths."""
    from d2compiler.driver.plan import make_plan
    from d2compiler.recipe.schema import load_recipe

    passes = '[[passes]]\ntype = "calibrate"\n{}[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
    line = "kept layer inputs and a second hidden-state stream"
    plain = make_plan(load_recipe(write_recipe(tmp_path / "a.toml", str(tiny_models["llama"]), passes.format(""))))
    target = '[[passes]]\ntype = "dense_target"\n'
    kept = make_plan(load_recipe(write_recipe(tmp_path / "b.toml", str(tiny_models["llama"]), passes.format(target))))
    assert line not in plain.estimate_mb and kept.estimate_mb[line] > 0
    fixed = {"process before loading", "peak (sum)", line}  # the first is measured (this process's memory now)
    assert {k: v for k, v in kept.estimate_mb.items() if k not in fixed} == {k: v for k, v in plain.estimate_mb.items() if k not in fixed}
    assert kept.estimate_mb["peak (sum)"] == pytest.approx(sum(v for k, v in kept.estimate_mb.items() if k != "peak (sum)"))
