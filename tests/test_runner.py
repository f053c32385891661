"""Block-by-block evaluation (`runner.ModelRunner`) gives a plain forward's outputs bit for bit, for
every kind of model, and places one block at a time; the Gram accumulation (`passes/gram.py`)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from d2compiler.execution import runner as runner_module
from d2compiler.execution.runner import ModelRunner, chunks
from d2compiler.loading.models import load_model
from passes.gram import Gram

CPU = torch.device("cpu")


def _outputs(model, calls, budget=None, monkeypatch=None):
    if budget is not None:
        monkeypatch.setattr(runner_module, "CHUNK_TOKENS", budget)
    got = {}
    ModelRunner(model, CPU).run(calls, lambda i, out: got.__setitem__(i, out), quiet=True)
    return [got[i] for i in range(len(calls))]


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen3", "mistral"])
def test_logits_equal_a_plain_forward(arch, tiny_models, monkeypatch):
    model = load_model(str(tiny_models[arch]), "float32", "cpu").model
    calls = [{"input_ids": torch.randint(0, 500, (1, n))} for n in (12, 7, 12, 30)]
    with torch.no_grad():
        plain = [model(**c, use_cache=False).logits for c in calls]
    for budget in (None, 20):  # one chunk; several chunks of at most 20 tokens
        blockwise = _outputs(model, calls, budget, monkeypatch)
        assert all(torch.equal(a, b.logits) for a, b in zip(plain, blockwise))
    assert all(p.device == CPU for p in model.parameters())


def test_encoder_and_image_outputs_equal_a_plain_forward(tiny_models):
    bert = load_model(str(tiny_models["bert"]), "float32", "cpu")
    ids = torch.randint(5, 500, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])}
    with torch.no_grad():
        plain = bert.model(**batch).last_hidden_state
    assert torch.equal(plain, _outputs(bert.model, [batch])[0].last_hidden_state)
    vit = load_model(str(tiny_models["vit"]), "float32", "cpu").model
    pixels = torch.rand(3, vit.config.num_channels, vit.config.image_size, vit.config.image_size)
    with torch.no_grad():
        plain = vit(pixel_values=pixels).logits
    assert torch.equal(plain, _outputs(vit, [{"pixel_values": pixels}])[0].logits)


def test_one_block_placed_at_a_time(tiny_models, monkeypatch):
    """Every block is placed once per chunk, in order, and never two at once."""
    model = load_model(str(tiny_models["llama"]), "float32", "cpu").model
    run = ModelRunner(model, CPU)
    events, placed = [], set()
    original = run.placement.block

    @contextmanager
    def block(index, read=None):
        assert not placed, f"block {index} placed while {placed} still is"
        placed.add(index)
        events.append(index)
        with original(index, read) as b:
            yield b
        placed.discard(index)

    monkeypatch.setattr(run.placement, "block", block)
    monkeypatch.setattr(runner_module, "CHUNK_TOKENS", 24)
    calls = [{"input_ids": torch.randint(0, 500, (1, 12))} for _ in range(4)]
    run.run(calls, lambda i, out: None, quiet=True)
    n = len(run.placement.blocks)
    assert events == list(range(n)) * 2  # two chunks of 24 tokens


def test_chunks_respect_the_budget():
    calls = [{"input_ids": torch.zeros(1, n)} for n in (10, 10, 30, 5, 5)]
    assert [list(r) for r in chunks(calls, 20)] == [[0, 1], [2], [3, 4]]
    assert [list(r) for r in chunks([torch.zeros(2, 3, 8, 8)] * 3, 4)] == [[0, 1], [2]]  # images count by batch


@pytest.mark.parametrize("width", [5, 191, 576, 1536])
def test_gram_triangle_equals_the_full_product(width):
    x = torch.randn(3, 64, width)
    gram = Gram(width)
    for part in x:
        gram.add(part)
    mean = gram.mean()
    flat = x.reshape(-1, width).double()
    assert gram.tokens == 3 * 64 and mean.dtype == torch.float32 and torch.equal(mean, mean.t())
    torch.testing.assert_close(mean.double(), flat.t() @ flat / (3 * 64), rtol=1e-5, atol=1e-5)


def test_gram_does_not_depend_on_the_order_or_split_of_samples():
    """What makes N processes give the one-process Hessian: float64 sums of the per-sample products."""
    x = torch.randn(8, 64, 200) * torch.logspace(-2, 2, 8).view(8, 1, 1)
    one, halves = Gram(200), [Gram(200), Gram(200)]
    for part in x:
        one.add(part)
    for i, part in enumerate(reversed(x)):
        halves[i % 2].add(part)
    halves[0].total += halves[1].total
    halves[0].tokens += halves[1].tokens
    assert torch.equal(one.mean(), halves[0].mean())
