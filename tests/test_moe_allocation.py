"""An allocation across the experts of one layer (issue 27, item 4): `sparsity_allocation.expert_lmbda`
spreads each block's sparsity over its experts by the tokens routed to each, exactly."""

from __future__ import annotations

from passes.allocation import expert_sparsities

from .test_moe import moe_models, run  # noqa: F401  (moe_models: the module's fixture)


def test_the_rule_prunes_the_most_used_expert_least():
    spread = expert_sparsities([10, 30, 20, 0], 0.6, 0.1)
    assert spread[1] == min(spread) and spread[3] == max(spread)
    assert all(0.5 - 1e-12 <= s <= 0.7 + 1e-12 for s in spread)
    assert expert_sparsities([5, 5, 5], 0.6, 0.1) == [0.6] * 3


def test_experts_of_a_layer_get_sparsities_by_their_tokens(moe_models, tmp_path):  # noqa: F811
    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsity_allocation"\nprofile = "error"\n'
              'owl_lmbda = 0.05\nexpert_lmbda = 0.1\nsurvey_samples = 4\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.6\n')
    code, record = run(tmp_path, moe_models["qwen3_moe"], passes)
    assert code == 0
    assert record["sparsity_allocation"]["expert_lmbda"] == 0.1
    experts = {name: m for name, m in record["layers"].items() if ".experts.down_proj." in name}
    for block in ("model.layers.0", "model.layers.1"):
        mine = {n: m for n, m in experts.items() if n.startswith(block + ".")}
        sparsity = {n: m["sparsity"] for n, m in mine.items()}
        assert len({round(s, 3) for s in sparsity.values()}) > 1, sparsity
        if block.endswith(".0"):  # the first block routes the survey's samples (all of them) as the calibration does
            tokens = {n: m["calibration_tokens"] for n, m in mine.items()}
            assert max(tokens, key=tokens.get) == min(sparsity, key=sparsity.get)
            assert min(tokens, key=tokens.get) == max(sparsity, key=sparsity.get)
    assert abs(record["overall_sparsity"] - 0.6) < 0.005  # the total stays exact over the targeted layers
