"""Experts in groups (issue 28, item 1): a block whose experts' statistics would not fit at once is
observed and pruned group by group, with the weights of the one-group run."""

from __future__ import annotations

import pytest
import torch

from d2compiler.execution.expert_groups import plan_groups, statistics_bytes

from .test_moe import D2PRUNE, moe_models, run  # noqa: F401  (moe_models: the module's fixture)

SPARSEGPT = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
TRUE_SEQUENTIAL = SPARSEGPT + "true_sequential = true\n"
GPTQ_AFTER = SPARSEGPT + '[[passes]]\ntype = "gptq"\nbits = 4\ngroup_size = 32\n'


def test_the_group_size_comes_from_the_budget():
    per_expert = statistics_bytes([2048, 768])  # a Qwen3-30B-A3B expert: gate/up input 2048, down input 768
    assert per_expert == 12 * (2048**2 + 768**2)
    assert plan_groups(128, per_expert, None, 2**40).groups == 1  # everything fits
    tight = plan_groups(128, per_expert, None, 1 * 2**30)  # 1 GiB free: half of it for statistics
    assert tight.size == int(0.5 * 2**30 // per_expert) and tight.groups == -(-128 // tight.size)
    assert tight.statistics_bytes <= 0.5 * 2**30
    assert plan_groups(128, per_expert, 100, None).groups == 2
    assert plan_groups(3, per_expert, 1, None).groups == 3
    assert plan_groups(128, per_expert, None, 1.0).size == 1  # at least one expert per group


@pytest.mark.parametrize(("family", "passes"), [
    ("qwen3_moe", D2PRUNE), ("deepseek_v3", SPARSEGPT), ("mixtral", TRUE_SEQUENTIAL), ("gpt_oss", GPTQ_AFTER),
], ids=["qwen3_moe-d2prune", "deepseek_v3-sparsegpt", "mixtral-true_sequential", "gpt_oss-sparsegpt+gptq"])
def test_groups_of_experts_give_the_one_group_weights(family, passes, moe_models, tmp_path):  # noqa: F811
    code, whole = run(tmp_path, moe_models[family], passes, name="whole")
    assert code == 0
    for size, groups in ((1, 4), (3, 2)):
        code, grouped = run(tmp_path, moe_models[family], passes, name=f"groups{size}",
                            extra=f"\n[experts]\ngroup_size = {size}\n")
        assert code == 0
        assert grouped["weights_sha256"] == whole["weights_sha256"], f"group_size = {size}"
        memory = [b["memory"] for b in grouped["blocks"] if "expert_groups" in b["memory"]]
        assert memory and all(m["expert_groups"] == groups and m["expert_group_size"] == size for m in memory)
        tokens = {k: v.get("calibration_tokens") for k, v in grouped["layers"].items()}
        assert tokens == {k: v.get("calibration_tokens") for k, v in whole["layers"].items()}


def test_plan_shows_the_statistics_and_the_groups(moe_models, tmp_path, capsys):  # noqa: F811
    from d2compiler.cli import main

    from .conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.toml", str(moe_models["qwen3_moe"]), SPARSEGPT, samples=4, seq_len=32,
                          extra="[experts]\ngroup_size = 3\n")
    assert main(["plan", str(recipe)]) == 0
    per_expert = 12 * (64**2 + 32**2) / 2**20  # gate/up input 64, down input 32
    out = capsys.readouterr().out
    assert f"experts: 4 per block, statistics {per_expert:.1f} MiB each" in out
    assert "2 groups of 3 (1 more routed forward per block)" in out


def test_the_budget_leaves_room_for_the_other_layers_statistics_and_weights_read_by_group(monkeypatch):
    from types import SimpleNamespace

    from d2compiler.execution import expert_groups

    def expert(e: int, role: str, shape: tuple[int, int]) -> SimpleNamespace:
        return SimpleNamespace(is_expert=True, module=SimpleNamespace(index=e), expert_list=None, owner=f"{role}.{e}",
                               shape=shape)

    layers = [expert(e, role, shape) for e in range(64) for role, shape in (("up", (96, 64)), ("down", (64, 96)))]
    attention = SimpleNamespace(is_expert=False, expert_list=None, owner="o_proj", shape=(64, 256), local_name="o_proj")
    monkeypatch.setattr(expert_groups, "free_memory_bytes", lambda _device: 2.0 * 2**20)
    per_expert = statistics_bytes([64, 96])

    def size(targeted: list, weights: int = 0) -> int:
        return expert_groups.layer_grouping(targeted, lambda owner: [owner], [], None, torch.device("cpu"),
                                            weight_bytes=weights).size

    assert size(layers) == int(0.5 * 2 * 2**20 // per_expert)
    others = statistics_bytes([256])
    assert size([*layers, attention]) == int((0.5 * 2 * 2**20 - others) // per_expert)  # beside the o_proj statistics
    with_weights = per_expert + 4 * (96 * 64 + 64 * 96)
    grouped = expert_groups.layer_grouping([*layers, attention], lambda owner: [owner], [], None, torch.device("cpu"),
                                           weight_bytes=4)
    assert grouped.size == int((0.5 * 2 * 2**20 - others) // with_weights) and grouped.bytes_per_expert == per_expert
