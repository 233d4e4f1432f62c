"""GistNet distillation through a frozen base model (the tiny test model, CPU, a few steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lens_serve.assets.reference import load_causal_lm
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import (
    GistNetConfig,
    TokenGistNet,
    TransformerGistNet,
    build_gistnet,
    load_gistnet,
)
from trainer.distill import (
    DistillConfig,
    distill,
    distill_loss,
    freeze,
    gist_rows,
    new_gistnet,
    sample_batch,
    validate,
    validation_windows,
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
def table(tiny_model_dir: Path) -> EmbeddingTable:
    return EmbeddingTable.from_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def tokens(model: Any) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (4000,), generator=torch.Generator().manual_seed(1))


def test_untrained_transformer_gist_equals_the_tokens_gist(table: EmbeddingTable) -> None:
    net = new_gistnet(CONFIG, table)
    assert table.list_tokens is not None
    separator = table.list_tokens.separator
    assert net.config.separator_id == separator
    unframed = GistNetConfig(
        block_size=8, rows=2, hidden_size=table.hidden_size, separator_id=separator
    )  # the `tokens` gist a transformer starts from: unframed, every word piece shown
    tokens_net = build_gistnet(unframed, table)
    assert isinstance(tokens_net, TokenGistNet)
    ids = torch.randint(0, 100, (3, 8))
    embeds = table(ids)
    assert torch.equal(net(ids, embeds).embeds, tokens_net(ids, embeds).embeds)


def test_gradient_reaches_only_the_gistnet(
    model: Any, table: EmbeddingTable, tokens: torch.Tensor
) -> None:
    net = new_gistnet(CONFIG, table)
    loss, _ = distill_loss(model, net, sample_batch(tokens, CONFIG, 1, 0), CONFIG, 1)
    loss.backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(net, TransformerGistNet)
    assert net.out.weight.grad is not None and net.out.weight.grad.abs().sum() > 0


def test_loss_decreases_in_a_few_steps(
    model: Any, table: EmbeddingTable, tokens: torch.Tensor
) -> None:
    # One fixed batch: the loss must fall when the same samples are revisited.
    config = DistillConfig(**{**CONFIG.__dict__, "lod1_steps": 12, "seed": 3})
    batch = sample_batch(tokens, config, 1, 0)
    net = new_gistnet(config, table)
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
    model: Any, table: EmbeddingTable, tokens: torch.Tensor, tmp_path: Path
) -> None:
    straight = distill(model, table, tokens, CONFIG, tmp_path / "a")
    first = DistillConfig(**{**CONFIG.__dict__, "lod1_steps": 3})
    distill(model, table, tokens, first, tmp_path / "b")
    resumed = distill(model, table, tokens, CONFIG, tmp_path / "b", resume=True)
    assert straight.steps == resumed.steps == 6
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert resumed.history == straight.history[3:]
    assert resumed.net.version == straight.net.version


def test_lod2_stage_runs_through_two_levels(
    model: Any, table: EmbeddingTable, tokens: torch.Tensor, tmp_path: Path
) -> None:
    config = DistillConfig(**{**CONFIG.__dict__, "lod1_steps": 1, "lod2_steps": 1})
    result = distill(model, table, tokens, config, tmp_path)
    assert [h["lod"] for h in result.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["kl"])) for h in result.history)


def test_a_lod1_sample_gists_several_blocks_in_a_row(
    model: Any, table: EmbeddingTable, tokens: torch.Tensor
) -> None:
    config = DistillConfig(**{**CONFIG.__dict__, "blocks": 3})
    batch = sample_batch(tokens, config, 1, 0)
    assert batch.shape == (2, 8 + 3 * 8 + 8)
    hidden = table.hidden_size
    net = new_gistnet(config, table)
    rows = gist_rows(net, batch[:, 8:32], model.get_input_embeddings(), 1)
    per_block = gist_rows(net, batch[:, 16:24], model.get_input_embeddings(), 1)
    assert rows.shape == (2, 3 * 2, hidden)  # 3 blocks x 2 rows, in text order
    assert torch.equal(rows[:, 2:4], per_block)
    loss, _ = distill_loss(model, net, batch, config, 1)
    assert torch.isfinite(loss)


def test_validation_keeps_the_best_net_on_text_it_never_trains_on(
    model: Any, table: EmbeddingTable, tokens: torch.Tensor, tmp_path: Path
) -> None:
    config = DistillConfig(**{**CONFIG.__dict__, "lod1_steps": 6, "validation_tokens": 500})
    windows = validation_windows(tokens, config, 1)
    assert windows.shape == (500 // 24, 24)  # prefix 8 + 1 block of 8 + horizon 8
    assert torch.equal(windows.flatten(), tokens[-500:][: windows.numel()])
    result = distill(model, table, tokens, config, tmp_path)
    measured = [h["validation_nll_gain"] for h in result.history if "validation_nll_gain" in h]
    assert len(measured) == 2  # at the checkpoints, steps 3 and 6
    assert result.best_validation == max(measured)
    best = load_gistnet(tmp_path / "best")
    assert validate(model, best, tokens, config) == pytest.approx(result.best_validation)


def test_the_tail_is_read_by_both_models_and_scored_by_neither(
    model: Any, table: EmbeddingTable, tokens: torch.Tensor
) -> None:
    config = DistillConfig(**{**CONFIG.__dict__, "tail": 8})
    batch = sample_batch(tokens, config, 1, 0)
    assert batch.shape == (2, 8 + 8 + 8 + 8)  # prefix, span (1 block), tail, horizon
    net = new_gistnet(config, table)
    _, parts = distill_loss(model, net, batch, config, 1)

    # Reference, position by position: horizon token j sits at index 24 + j of the raw window,
    # at 8 + 2 + 8 + j behind the 2 gist rows, and at 16 + j with the span dropped.
    embed = model.get_input_embeddings()
    with torch.no_grad():
        rows = gist_rows(net, batch[:, 8:16], embed, 1)  # (2, 2, D)
        student_in = torch.cat([embed(batch[:, :8]), rows, embed(batch[:, 16:])], dim=1)
        teacher = model(input_ids=batch).logits[:, 23:31].log_softmax(-1)  # (2, 8, V)
        student = model(inputs_embeds=student_in).logits[:, 17:25].log_softmax(-1)
        dropped_ids = torch.cat([batch[:, :8], batch[:, 16:]], dim=1)
        dropped = model(input_ids=dropped_ids).logits[:, 15:23].log_softmax(-1)
    target = batch[:, 24:]  # (2, 8)
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    nll_student = -student.gather(-1, target[..., None]).mean()
    nll_dropped = -dropped.gather(-1, target[..., None]).mean()
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    assert parts["nll"] == pytest.approx(nll_student.item(), rel=1e-5)
    assert parts["nll_gain_over_dropped"] == pytest.approx(
        (nll_dropped - nll_student).item(), rel=1e-4, abs=1e-6
    )


def test_init_starts_a_run_from_a_trained_net(
    model: Any, table: EmbeddingTable, tokens: torch.Tensor, tmp_path: Path
) -> None:
    trained = distill(model, table, tokens, CONFIG, tmp_path / "first").net
    config = DistillConfig(**{**CONFIG.__dict__, "lod1_steps": 1, "tail": 8})
    tuned = distill(model, table, tokens, config, tmp_path / "tuned", init=trained)
    with torch.no_grad():
        _, parts = distill_loss(model, trained, sample_batch(tokens, config, 1, 0), config, 1)
    assert tuned.history[0]["kl"] == pytest.approx(parts["kl"], rel=1e-5)  # step 1 read `trained`
    assert tuned.net.version != trained.version  # and then took a step of its own

    other_layout = DistillConfig(**{**CONFIG.__dict__, "rows": 4})
    with pytest.raises(ValueError, match="not this run's layout"):
        distill(model, table, tokens, other_layout, tmp_path / "bad", init=trained)
