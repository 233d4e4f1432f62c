"""The listwise (+ pairwise) loss on per-unit values, batching, and the optimizer step."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from lens_serve.core.lensnet import LensNet, LensNetConfig
from tests.core_helpers import HIDDEN, random_table
from tests.trainer_synthetic import needle_record
from trainer.examples import Example, TargetConfig, example_from_record
from trainer.train import (
    Batch,
    LossConfig,
    PreferenceTrainer,
    collate,
    listwise_losses,
    loss,
    measured_scores,
    pairwise_losses,
    residual_losses,
    scores,
    sign_losses,
    unmeasured,
)

LISTWISE = LossConfig(pair_weight=0.0, sign_weight=0.0, residual_weight=0.0)


def _examples(n: int, first: int = 0) -> list[Example]:
    table = random_table()
    return [
        example_from_record(needle_record(s), f"1-{s}", table, TargetConfig())
        for s in range(first, first + n)
    ]


def _net(seed: int = 0) -> LensNet:
    return LensNet(LensNetConfig(hidden_size=HIDDEN, width=16, heads=2, layers=1, seed=seed))


def _scatter(batch: Batch, measured_values: torch.Tensor) -> torch.Tensor:
    """(B, U) scores: `measured_values` (B, M) at the measured units, 0 elsewhere."""
    padded = measured_values.masked_fill(~batch.measured_valid, 0.0)  # padding points at unit 0
    return torch.zeros(batch.valid.shape).scatter_add(1, batch.measured, padded)


def test_collate_pads_units_and_measured_units_and_masks_them() -> None:
    examples = _examples(3)
    batch = collate(examples)
    widths = [len(ex.lods) for ex in examples]
    assert batch.valid.sum(1).tolist() == widths
    assert batch.valid.shape[1] == max(widths)
    for row, ex in enumerate(examples):
        m = len(ex.measured)
        assert batch.measured[row, :m].tolist() == ex.measured.tolist()
        assert batch.measured_valid[row].sum() == m
        assert batch.value[row, :m].tolist() == pytest.approx(ex.value.tolist())
    assert batch.labelled.all() and batch.labelled_records == 3


def test_listwise_loss_of_equal_scores_is_log_of_the_measured_units() -> None:
    batch = collate(_examples(4))
    zero = torch.zeros(batch.valid.shape)
    per_record = listwise_losses(zero, batch, 1.0)  # uniform q: cross-entropy = log M
    m = batch.measured_valid.sum(1).double()
    assert per_record.tolist() == pytest.approx(torch.log(m).tolist(), rel=1e-5)
    # The pairwise term adds log 2 for every record with a decisive pair (softplus(0)).
    pairs = pairwise_losses(zero, batch, 1.0, 0.05)
    assert pairs.tolist() == pytest.approx([math.log(2)] * 4, rel=1e-5)


def test_scores_that_follow_the_values_have_the_lower_loss_in_both_terms() -> None:
    batch = collate(_examples(4))
    right = _scatter(batch, 50 * batch.value)  # the right order, by far
    config = LossConfig()
    assert float(loss(right, batch, config)) < float(loss(-right, batch, config))
    assert float(loss(right, batch, LISTWISE)) < float(loss(-right, batch, LISTWISE))
    assert float(pairwise_losses(right, batch, 1.0, 0.05).mean()) < 0.1 * math.log(2)
    # Scores equal to the target logits t / τ_t reach the listwise minimum (the targets' entropy);
    # a higher temperature flattens q towards uniform and the loss rises.
    exact = _scatter(batch, batch.value / batch.scale[:, None])
    target = torch.softmax(
        (batch.value / batch.scale[:, None]).masked_fill(~batch.measured_valid, -1e9), 1
    )
    entropy = -(target * target.clamp(min=1e-30).log()).sum(1).mean()
    assert float(loss(exact, batch, LISTWISE)) == pytest.approx(float(entropy), rel=1e-4)
    hotter = dataclasses.replace(LISTWISE, temperature=10.0)
    assert float(loss(exact, batch, LISTWISE)) < float(loss(exact, batch, hotter))


def test_sign_term_wants_scores_above_zero_where_the_value_is_positive_and_ignores_near_ties() -> (
    None
):
    batch = collate(_examples(4))
    right = _scatter(batch, 50 * batch.value.sign())
    assert float(sign_losses(right, batch, 1.0, 0.05).mean()) < 1e-6
    assert float(sign_losses(-right, batch, 1.0, 0.05).mean()) > 10
    shifted = _scatter(batch, batch.value + 100.0)  # the same order, every unit far above zero
    assert float(loss(shifted, batch, LISTWISE)) == pytest.approx(
        float(loss(_scatter(batch, batch.value), batch, LISTWISE)), rel=1e-4
    )  # order-only terms cannot see the level ...
    assert float(sign_losses(shifted, batch, 1.0, 0.05).mean()) > 1  # ... the sign term does
    ties = torch.zeros_like(batch.value)  # every value below the gap: nothing to sign
    tied = dataclasses.replace(batch, value=ties)
    assert float(sign_losses(_scatter(batch, -ties - 5), tied, 1.0, 0.05).sum()) == 0.0


def test_residual_term_is_the_mean_squared_residual_over_the_units_no_gain_was_measured_for() -> (
    None
):
    batch = collate(_examples(3))
    assert residual_losses(batch.prior, batch).tolist() == [0.0, 0.0, 0.0]
    # Neither the measured units (the ranking terms' business) nor padding count, however far.
    rows = torch.arange(batch.records)[:, None]
    shifted = (batch.prior + 2.0).masked_fill(~batch.valid, 1e3)
    shifted[rows, batch.measured] = -1e3
    assert residual_losses(shifted, batch).tolist() == pytest.approx([4.0] * 3)


def test_unmeasured_units_exclude_a_measured_unit_0_that_padding_also_points_at() -> None:
    batch = collate(_examples(2))
    batch = dataclasses.replace(
        batch,
        measured=torch.zeros_like(batch.measured),  # row 0: unit 0 measured; the rest padding
        measured_valid=torch.zeros_like(batch.measured_valid).index_fill(1, torch.tensor([0]), 1),
    )
    free = unmeasured(batch)
    assert not free[:, 0].any()
    assert free[:, 1:].tolist() == batch.valid[:, 1:].tolist()


def test_residual_term_keeps_the_units_no_record_measured_near_the_prior() -> None:
    batch = collate(_examples(8))
    unmeasured = batch.valid.clone()
    unmeasured[torch.arange(batch.records)[:, None], batch.measured] = False
    drift = []
    for weight in (0.0, 1.0):
        net = _net()
        trainer = PreferenceTrainer(net, lr=3e-3, loss=LossConfig(residual_weight=weight))
        for _ in range(40):
            trainer.step(batch)
        with torch.inference_mode():
            residual = scores(net, batch) - batch.prior  # (B, U)
        drift.append(float(residual[unmeasured].abs().mean()))
    assert drift[1] < 0.5 * drift[0], drift


def test_pairwise_term_counts_only_decisive_pairs() -> None:
    batch = collate(_examples(1))
    m = int(batch.measured_valid.sum())
    s = torch.zeros(batch.valid.shape)
    t = batch.value[0, :m].double()
    s = s.scatter(1, batch.measured, torch.randn(1, batch.measured.shape[1]))
    ms = measured_scores(s, batch)[0, :m].double()
    terms = [
        math.log1p(math.exp(-(ms[a] - ms[b])))
        for a in range(m)
        for b in range(m)
        if t[a] - t[b] >= 0.05
    ]
    got = float(pairwise_losses(s, batch, 1.0, 0.05)[0])
    assert got == pytest.approx(float(np.mean(terms)), rel=1e-5)
    # With a gap no pair reaches, the term is 0 (not NaN).
    assert float(pairwise_losses(s, batch, 1.0, 100.0)[0]) == 0.0


def test_padded_batch_scores_equal_each_record_scored_alone() -> None:
    examples = _examples(3)
    batch = collate(examples)
    net = _net()
    torch.nn.init.normal_(net.head.weight, std=0.5)
    with torch.inference_mode():
        together = scores(net, batch)  # (B, U)
        for row, ex in enumerate(examples):
            alone = scores(net, collate([ex]))[0]  # (U_ex,)
            u = len(ex.lods)
            torch.testing.assert_close(together[row, :u], alone, rtol=1e-4, atol=1e-5)


def test_the_prior_alone_scores_the_records_prior() -> None:
    examples = _examples(2)
    batch = collate(examples)
    for row, ex in enumerate(examples):
        assert scores(None, batch)[row, : len(ex.prior)].tolist() == ex.prior.tolist()


def test_training_steps_are_deterministic_when_the_seed_is_fixed() -> None:
    batches = [collate(_examples(4, first)) for first in (0, 4, 8)]
    states = []
    for _ in range(2):
        net = _net(seed=7)
        trainer = PreferenceTrainer(net, lr=1e-3, seed=7)
        for batch in batches:
            trainer.step(batch)
        states.append(net.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


def test_training_lowers_the_loss_on_the_batches_it_sees() -> None:
    batch = collate(_examples(8))
    trainer = PreferenceTrainer(_net(), lr=3e-3)
    first = trainer.step(batch)
    for _ in range(30):
        last = trainer.step(batch)
    assert last.loss < first.loss - 0.3
    assert last.records == 8
    assert np.isfinite(last.grad_norm)


def test_step_refuses_a_batch_without_labelled_records() -> None:
    trainer = PreferenceTrainer(_net(), lr=1e-3)
    with pytest.raises(ValueError, match="labelled"):
        trainer.step(collate([]))


def test_loss_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="temperature"):
        LossConfig(temperature=0.0)
    with pytest.raises(ValueError, match="pair_weight"):
        LossConfig(pair_weight=-1.0)
    with pytest.raises(ValueError, match="residual_weight"):
        LossConfig(residual_weight=-1.0)
