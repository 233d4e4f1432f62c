"""GistNet distillation through a frozen base model (the tiny test model, CPU, a few steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lens_serve.gistnet import GistNetConfig, TokenGistNet, TransformerGistNet, build_gistnet
from lens_serve.scoring import load_causal_lm
from trainer.distill import (
    DistillConfig,
    distill,
    distill_loss,
    freeze,
    gist_rows,
    new_gistnet,
    sample_batch,
)

CONFIG = DistillConfig(
    rows=2, block_size=8, prefix=8, horizon=8, lod1_steps=6, batch_size=2, lr=3e-3,
    checkpoint_every=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    lm = load_causal_lm(tiny_model_dir)
    freeze(lm)
    return lm


@pytest.fixture(scope="module")
def tokens(model: Any) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (4000,), generator=torch.Generator().manual_seed(1))


def test_untrained_transformer_gist_equals_the_tokens_gist(model: Any) -> None:
    hidden = model.get_input_embeddings().weight.shape[1]
    net = new_gistnet(CONFIG, hidden)
    tokens_net = build_gistnet(GistNetConfig("tokens", block_size=8, rows=2, hidden_size=hidden))
    assert isinstance(tokens_net, TokenGistNet)
    ids = torch.randint(0, 100, (3, 8))
    embeds = torch.randn(3, 8, hidden)
    assert torch.equal(net(ids, embeds).embeds, tokens_net(ids, embeds).embeds)


def test_gradient_reaches_only_the_gistnet(model: Any, tokens: torch.Tensor) -> None:
    hidden = model.get_input_embeddings().weight.shape[1]
    net = new_gistnet(CONFIG, hidden)
    loss, _ = distill_loss(model, net, sample_batch(tokens, CONFIG, 1, 0), CONFIG, 1)
    loss.backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(net, TransformerGistNet)
    assert net.out.weight.grad is not None and net.out.weight.grad.abs().sum() > 0


def test_loss_decreases_in_a_few_steps(model: Any, tokens: torch.Tensor, tmp_path: Path) -> None:
    # One fixed batch: the loss must fall when the same samples are revisited.
    config = DistillConfig(**{**CONFIG.__dict__, "lod1_steps": 12, "seed": 3})
    batch = sample_batch(tokens, config, 1, 0)
    hidden = model.get_input_embeddings().weight.shape[1]
    net = new_gistnet(config, hidden)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss, _ = distill_loss(model, net, batch, config, 1)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_resume_continues_the_step_count_deterministically(
    model: Any, tokens: torch.Tensor, tmp_path: Path
) -> None:
    straight = distill(model, tokens, CONFIG, tmp_path / "a")
    first = DistillConfig(**{**CONFIG.__dict__, "lod1_steps": 3})
    distill(model, tokens, first, tmp_path / "b")
    resumed = distill(model, tokens, CONFIG, tmp_path / "b", resume=True)
    assert straight.steps == resumed.steps == 6
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert resumed.history == straight.history[3:]
    assert resumed.net.version == straight.net.version


def test_lod2_stage_runs_through_two_levels(
    model: Any, tokens: torch.Tensor, tmp_path: Path
) -> None:
    config = DistillConfig(**{**CONFIG.__dict__, "lod1_steps": 1, "lod2_steps": 1})
    result = distill(model, tokens, config, tmp_path)
    assert [h["lod"] for h in result.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["kl"])) for h in result.history)


def test_a_lod1_sample_gists_several_blocks_in_a_row(model: Any, tokens: torch.Tensor) -> None:
    config = DistillConfig(**{**CONFIG.__dict__, "blocks": 3})
    batch = sample_batch(tokens, config, 1, 0)
    assert batch.shape == (2, 8 + 3 * 8 + 8)
    hidden = model.get_input_embeddings().weight.shape[1]
    net = new_gistnet(config, hidden)
    rows = gist_rows(net, batch[:, 8:32], model.get_input_embeddings(), 1)
    per_block = gist_rows(net, batch[:, 16:24], model.get_input_embeddings(), 1)
    assert rows.shape == (2, 3 * 2, hidden)  # 3 blocks x 2 rows, in text order
    assert torch.equal(rows[:, 2:4], per_block)
    loss, _ = distill_loss(model, net, batch, config, 1)
    assert torch.isfinite(loss)
