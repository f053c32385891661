"""Experts held one group at a time (issue 28: a DeepSeek-V3 layer's experts are 45 GB in float32):
one expert is read from the checkpoint without its bank, and a block whose banks stay on the meta
device runs over its inputs group by group with the outputs and expert statistics of the whole
block."""

from __future__ import annotations

import pytest
import torch

from d2compiler.execution.block_io import capture_block_inputs, forward_block
from d2compiler.execution.lazy_experts import record_calls, run_block
from d2compiler.execution.streaming import StreamedModel, WeightSource, _release, empty_model
from d2compiler.graph.expert_store import ExpertStore, attach_store
from d2compiler.graph.experts import attach_experts, probe_banks, use_eager_experts

from .test_moe import FAMILIES, moe_models  # noqa: F401  (moe_models: the module's fixture)


def _streamed(folder) -> StreamedModel:
    model = empty_model(folder, torch.float32)
    use_eager_experts(model)
    return StreamedModel(model, WeightSource(folder), torch.float32)


def _block_inputs(streamed: StreamedModel, index: int, windows: int = 2):
    """The inputs of block `index` for `windows` seeded token windows (the blocks before run dense)."""
    streamed.load_outside_blocks()
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, streamed.model.config.vocab_size, (1, 24), generator=generator) for _ in range(windows)]
    inputs = capture_block_inputs(streamed.model, streamed.blocks, ids, torch.device("cpu"))
    for before in range(index):
        with streamed.block(before) as block:
            inputs = [inp.with_hidden(h) for inp, h in zip(inputs, forward_block(block, inputs))]
    return inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_one_expert_is_read_without_its_bank(family, moe_models):  # noqa: F811
    streamed = _streamed(moe_models[family])
    block = streamed.load_block(1)
    prefix = streamed.block_prefix(1)
    banks = {name: p.detach().clone() for name, p in block.named_parameters() if p.dim() == 3}
    assert banks
    for name, bank in banks.items():
        for e in range(bank.shape[0]):
            assert torch.equal(streamed.read_source_expert(prefix + name, e).to(bank.dtype), bank[e]), (name, e)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_block_run_group_by_group_gives_the_whole_blocks_outputs_and_statistics(family, moe_models):  # noqa: F811
    streamed = _streamed(moe_models[family])
    inputs = _block_inputs(streamed, 1)
    block = streamed.load_block(1)
    found = probe_banks(block, lambda: forward_block(block, inputs[:1]))
    slices = attach_experts(block, found)
    owner_name = found[0].owner_name
    owner = block.get_submodule(owner_name)
    seen: dict[str, list[torch.Tensor]] = {}

    def watch(name):
        return lambda _m, args, _out: seen.setdefault(name, []).append(args[0].detach().clone())

    handles = [s.register_forward_hook(watch(name)) for name, s in slices.items()]
    dense = forward_block(block, inputs)
    dense_seen, seen = seen, {}

    _release(block, lambda p: p.dim() == 3)  # the banks go back to the meta device; the rest stays
    assert all(p.is_meta for p in block.parameters() if p.dim() == 3)
    prefix = f"{streamed.block_prefix(1)}{owner_name}."
    reads: list[tuple[str, int, set[int]]] = []  # (bank, expert, the experts resident when it was read)

    def read(attr: str, e: int) -> torch.Tensor:
        reads.append((attr, e, set(store.experts())))
        return streamed.read_source_expert(prefix + attr, e)

    store = ExpertStore([b.attr for b in found], read, torch.float32, torch.device("cpu"), group_size=2)
    attach_store(owner, store)
    experts = found[0].experts
    lazy = run_block(block, inputs)[0]
    for handle in handles:
        handle.remove()
    assert not store.resident  # every group dropped once its outputs are in
    assert sorted((attr, e) for attr, e, _ in reads) == sorted((b.attr, e) for b in found for e in range(experts))  # once each
    assert all(resident <= ({0, 1} if e < 2 else set(range(2, experts))) for _, e, resident in reads)  # one group at a time
    for got, want in zip(lazy, dense):
        assert torch.equal(got, want)  # the same sums in the same order
    assert dense_seen and set(seen) == set(dense_seen)  # every expert that saw tokens saw them again, and only those
    for name, rows in dense_seen.items():
        torch.testing.assert_close(torch.cat(seen[name]), torch.cat(rows), rtol=1e-5, atol=1e-5)


def test_an_experts_module_that_is_never_called_is_a_located_error(moe_models):  # noqa: F811
    streamed = _streamed(moe_models["qwen3_moe"])
    inputs = _block_inputs(streamed, 0)
    block = streamed.load_block(0)
    stray = torch.nn.Linear(2, 2)
    with pytest.raises(Exception, match="was called 0 times over 2 inputs"):
        record_calls(block, stray, inputs)
