"""utils.models: deterministic models and data made in code."""

import pytest
import torch

from utils.models import (
    GPT,
    MLP,
    GPTConfig,
    count_params,
    gpt_batch,
    mlp_batch,
    shard_batch,
)


def test_same_seed_same_weights_other_seed_other_weights():
    for build in (MLP, GPT):
        a, b, c = build(seed=1), build(seed=1), build(seed=2)
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
        assert any(
            not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters())
        )


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    GPT(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_gpt_ties_embedding_and_head_and_counts_it_once():
    cfg = GPTConfig(vocab_size=10, seq_len=4, d_model=8, n_layers=1, n_heads=2)
    model = GPT(cfg)
    assert model.head.weight is model.tok.weight
    h, v, s = cfg.d_model, cfg.vocab_size, cfg.seq_len
    block = (
        2 * 2 * h
        + (3 * h * h + 3 * h)
        + (h * h + h)
        + (4 * h * h + 4 * h)
        + (4 * h * h + h)
    )
    assert count_params(model) == v * h + s * h + block + 2 * h
    untied = GPT(
        GPTConfig(
            vocab_size=10,
            seq_len=4,
            d_model=8,
            n_layers=1,
            n_heads=2,
            tie_weights=False,
        )
    )
    assert count_params(untied) == count_params(model) + v * h


def test_batches_are_deterministic_and_learnable_shapes():
    cfg = GPTConfig()
    idx, tgt = gpt_batch(cfg, 8, seed=0, step=3)
    idx2, _ = gpt_batch(cfg, 8, seed=0, step=3)
    assert torch.equal(idx, idx2) and idx.shape == (8, cfg.seq_len)
    assert torch.equal(idx[:, 1:], tgt[:, :-1])  # targets are the next tokens
    assert GPT(cfg)(idx).shape == (8, cfg.seq_len, cfg.vocab_size)
    x, y = mlp_batch((32, 64, 8), 16, seed=0)
    assert x.shape == (16, 32) and y.shape == (16, 8)


def test_shard_batch_splits_evenly_and_refuses_remainders():
    x, y = mlp_batch((4, 2), 8)
    parts = [shard_batch((x, y), r, 4) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    with pytest.raises(ValueError, match="batch of 8 does not divide across 3 ranks"):
        shard_batch((x, y), 0, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": 2.5}, "vocab_size"),
    ],
)
def test_bad_gpt_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)
    with pytest.raises(ValueError, match="sizes"):
        MLP((8,))
