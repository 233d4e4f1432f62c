"""The pairwise preference loss and the optimizer step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lens_serve.core.lensnet import LensNet, LensNetConfig
from tests.core_helpers import HIDDEN, random_table
from tests.trainer_synthetic import needle_record
from trainer.examples import Example, TargetConfig, example_from_record
from trainer.train import PreferenceTrainer, collate, preference_loss, scores


def _examples(n: int, first: int = 0) -> list[Example]:
    table = random_table()
    return [
        example_from_record(needle_record(s), f"1-{s}", table, TargetConfig())
        for s in range(first, first + n)
    ]


def _net(seed: int = 0) -> LensNet:
    return LensNet(LensNetConfig(hidden_size=HIDDEN, seed=seed))


def test_loss_is_log2_times_mean_strength_when_scores_are_zero() -> None:
    batch = collate(_examples(3))
    loss, agreement = preference_loss(torch.zeros(batch.valid.shape), batch, 1.0)
    per_pair = batch.targets.abs().sum(1)  # strength per side of the pair
    assert float(loss) == pytest.approx(math.log(2) * float(per_pair.mean()), rel=1e-5)
    assert float(agreement) == 0.0  # ties never agree


def test_a_constant_score_agrees_with_no_two_sided_pair() -> None:
    batch = collate(_examples(3))
    two_sided = ((batch.targets > 0).any(1) & (batch.targets < 0).any(1)).float()
    assert two_sided.sum() > 0
    for constant in (-2.0, 2.0):  # "collapse everything" / "expand everything"
        s = torch.full(batch.valid.shape, constant)
        margin = (s[batch.pair_variant] * batch.targets).sum(1)
        assert float((margin[two_sided > 0]).abs().max()) < 1e-5
        _, agreement = preference_loss(s, batch, 1.0)
        assert float(agreement) <= 1 - float(two_sided.mean()) + 1e-6


def test_loss_falls_and_agreement_is_one_when_scores_follow_the_targets() -> None:
    batch = collate(_examples(3))
    s = torch.zeros(batch.valid.shape)  # (V, U)
    for p, row in enumerate(batch.pair_variant.tolist()):
        s[row] += 3 * batch.targets[p].sign()  # pairs sharing a variant rarely conflict
    right, agree = preference_loss(s, batch, 1.0)
    wrong, disagree = preference_loss(-s, batch, 1.0)
    assert float(right) < math.log(2) * 0.5 < float(wrong)
    assert float(agree) > 0.9 and float(disagree) < 0.1
    # A higher temperature softens the loss towards log 2 * strength.
    soft, _ = preference_loss(s, batch, 10.0)
    assert float(right) < float(soft)


def test_padded_batch_scores_equal_each_variant_scored_alone() -> None:
    examples = _examples(2)
    batch = collate(examples, all_variants=True)
    net = _net()
    torch.nn.init.normal_(net.head.weight, std=0.5)
    with torch.inference_mode():
        together = scores(net, batch)  # (V, U)
        for row, (e, v) in enumerate(batch.variant_index):
            alone = collate([examples[e]], all_variants=True)
            own = alone.variant_index.index((0, v))
            u = int(alone.valid[own].sum())
            torch.testing.assert_close(
                together[row, :u], scores(net, alone)[own, :u], rtol=1e-4, atol=1e-5
            )


def test_training_steps_are_deterministic_when_the_seed_is_fixed() -> None:
    batches = [collate(_examples(4, first)) for first in (0, 4, 8)]
    states = []
    for _ in range(2):
        net = _net(seed=7)
        trainer = PreferenceTrainer(net, lr=1e-3, temperature=1.0, seed=7)
        for batch in batches:
            trainer.step(batch)
        states.append(net.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


def test_training_lowers_the_loss_on_the_batches_it_sees() -> None:
    batch = collate(_examples(8))
    trainer = PreferenceTrainer(_net(), lr=3e-3, temperature=1.0)
    first = trainer.step(batch)
    for _ in range(30):
        last = trainer.step(batch)
    assert last.loss < first.loss * 0.5
    assert last.agreement > 0.9
    assert np.isfinite(last.grad_norm)


def test_step_refuses_a_batch_without_pairs() -> None:
    trainer = PreferenceTrainer(_net(), lr=1e-3, temperature=1.0)
    with pytest.raises(ValueError, match="pair"):
        trainer.step(collate([]))
