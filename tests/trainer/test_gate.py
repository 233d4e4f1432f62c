"""The evaluation gate on held-out records: NDCG, agreement, baseline gaps and decisions."""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import pytest
import torch

from lens_serve.core.allocator import FocusConfig
from lens_serve.core.lensnet import LensNet, LensNetConfig
from tests.core_helpers import HIDDEN, random_lensnet, random_table
from tests.trainer_synthetic import needle_record
from trainer.examples import Example, TargetConfig, example_from_record
from trainer.gate import (
    DECISIVE_GAP,
    GateReport,
    decide,
    evaluate,
    is_held_out,
    ndcg,
    pair_agreement,
)
from trainer.train import PreferenceTrainer, collate, measured_scores, scores

TRAIN_RECORDS = 40


def report(ndcg: float, ranked: int = 10) -> GateReport:
    return GateReport(
        ndcg=ndcg,
        ranked_records=ranked,
        agreement=0.5,
        decisive_pairs=100,
        loss=1.0,
        records=ranked,
        units=8 * ranked,
        baseline_gaps={"recency": 0.5},
    )


def _net(seed: int = 0) -> LensNet:
    """The small LensNet these tests train (its head starts at zero, as every LensNet's)."""
    return LensNet(LensNetConfig(hidden_size=HIDDEN, width=16, heads=2, layers=1, seed=seed))


def _examples(seeds: range) -> list[Example]:
    table = random_table()
    return [example_from_record(needle_record(s), f"{s}-0", table, TargetConfig()) for s in seeds]


@pytest.fixture(scope="module")
def split() -> tuple[list[Example], list[Example]]:
    """40 training records and 40 held-out ones (other seeds: other lifetimes and needles)."""
    return _examples(range(TRAIN_RECORDS)), _examples(range(1000, 1040))


@pytest.fixture(scope="module")
def trained(split: tuple[list[Example], list[Example]]) -> LensNet:
    train, _ = split
    net = _net()
    trainer = PreferenceTrainer(net, lr=3e-3, seed=0)
    rng = np.random.default_rng(0)
    began = time.monotonic()
    for _ in range(100):
        picks = rng.choice(len(train), 8, replace=False)
        trainer.step(collate([train[int(i)] for i in sorted(picks)]))
    assert time.monotonic() - began < 20
    return net


def test_training_raises_held_out_ndcg_above_the_prior_and_an_untrained_lensnet(
    split: tuple[list[Example], list[Example]], trained: LensNet
) -> None:
    _, held = split
    prior = evaluate(None, held)
    untrained = evaluate(_net(), held)  # zero head: exactly the prior
    noisy = evaluate(random_lensnet(0), held)  # a random head: acts on noise
    new = evaluate(trained, held)
    assert untrained.ndcg == pytest.approx(prior.ndcg)
    assert new.ranked_records == prior.ranked_records >= 30
    # The prior is right where the query names the needle, wrong where it names the distractor.
    assert 0.7 < prior.ndcg < 0.9
    assert new.ndcg > prior.ndcg + 0.1
    assert new.ndcg > noisy.ndcg + 0.1
    assert new.agreement > 0.9 > max(prior.agreement, noisy.agreement)
    assert new.loss < prior.loss
    decision = decide(new, evaluate(_net(), held), prior, min_records=4)
    assert decision.passed, decision.reason


def test_trained_scores_clear_the_expand_threshold_where_a_unit_helped_and_zero_where_it_hurt(
    split: tuple[list[Example], list[Example]], trained: LensNet
) -> None:
    # The allocator acts on the scores' level, not only their order (the sign term's job).
    _, held = split
    batch = collate(held)
    with torch.no_grad():
        s = measured_scores(scores(trained, batch), batch)  # (B, M)
    helped = batch.measured_valid & (batch.value > 0.2)
    hurt = batch.measured_valid & (batch.value < -0.2)
    assert helped.sum() >= 20 and hurt.sum() >= 5
    assert (s[helped] > FocusConfig().expand_threshold).float().mean() > 0.9
    assert (s[hurt] < 0).float().mean() > 0.9


def test_gate_refuses_a_worse_model(
    split: tuple[list[Example], list[Example]], trained: LensNet
) -> None:
    _, held = split
    flipped = copy.deepcopy(trained)
    with torch.no_grad():  # the MegaContext polarity bug: every residual's sign inverted
        flipped.head.weight.neg_()
        flipped.head.bias.neg_()
    current, prior = evaluate(trained, held), evaluate(None, held)
    worse = evaluate(flipped, held)
    assert worse.ndcg < prior.ndcg < current.ndcg
    assert worse.agreement < current.agreement
    decision = decide(worse, current, prior)
    assert not decision.passed and decision.judged
    assert "the prior's" in decision.reason


def test_gate_refuses_weights_that_move_the_units_no_gain_was_measured_for(
    split: tuple[list[Example], list[Example]], trained: LensNet
) -> None:
    _, held = split
    current, prior = evaluate(trained, held), evaluate(None, held)
    assert prior.drift == 0.0 and 0 < current.drift < 1.0
    assert decide(current, current, prior, max_drift=1.0).passed
    lifted = copy.deepcopy(trained)
    with torch.no_grad():  # every unit 3 higher: the measured units' order is unchanged
        lifted.head.bias.add_(3.0)
    drifted = evaluate(lifted, held)
    assert drifted.ndcg == pytest.approx(current.ndcg) and drifted.drift > 2.0
    decision = decide(drifted, current, prior, max_drift=1.0)
    assert not decision.passed and decision.judged
    assert "residual drift" in decision.reason


def test_gate_passes_only_at_least_as_good_as_the_prior_and_the_current_version() -> None:
    prior, current = report(0.80), report(0.85)
    assert decide(report(0.86), current, prior).passed
    assert decide(report(0.85), current, prior).passed  # equal is not worse
    below_current = decide(report(0.83), current, prior)
    assert not below_current.passed and below_current.judged
    assert "< current 0.850" in below_current.reason
    below_prior = decide(report(0.79), report(0.7), prior)
    assert not below_prior.passed and below_prior.judged
    assert "the prior's 0.800" in below_prior.reason
    assert below_prior.prior == prior


def test_gate_does_not_judge_too_few_ranked_held_out_records() -> None:
    good = report(0.95, ranked=3)
    assert decide(good, report(0.5), report(0.5)).passed
    decision = decide(good, report(0.5), report(0.5), min_records=4)
    assert not decision.passed and not decision.judged
    assert "3 held-out records" in decision.reason
    empty = evaluate(_net(), [])
    assert (empty.records, empty.ranked_records, empty.decisive_pairs) == (0, 0, 0)
    assert math.isnan(empty.loss)
    assert not decide(empty, empty, empty).judged


def test_records_without_a_decisive_spread_are_not_ranked(
    split: tuple[list[Example], list[Example]],
) -> None:
    _, held = split
    flat = [dataclasses.replace(ex, value=ex.value * 0 + 0.01 * k) for k, ex in enumerate(held)]
    got = evaluate(None, flat)
    assert got.records == len(held) and got.ranked_records == 0 and got.decisive_pairs == 0
    assert got.units == sum(len(ex.measured) for ex in held)


def test_ndcg_ranks_by_score_and_shares_ties() -> None:
    t = np.array([0.5, 0.0, -0.06])
    assert ndcg(np.array([3.0, 2.0, 1.0]), t) == pytest.approx(1.0)
    worst = ndcg(np.array([1.0, 2.0, 3.0]), t)
    assert 0 < worst < ndcg(np.array([2.0, 3.0, 1.0]), t) < 1
    # A constant score earns the mean over orders, not whatever order a sort leaves.
    tied = ndcg(np.zeros(3), t)
    assert tied == pytest.approx(ndcg(np.zeros(3), t[::-1].copy()))
    assert worst < tied < 1
    # Scale and shift of the values do not matter (linear gains over t - min t).
    assert ndcg(np.array([1.0, 3.0, 2.0]), 10 * t + 4) == pytest.approx(
        ndcg(np.array([1.0, 3.0, 2.0]), t)
    )
    assert ndcg(np.array([1.0, 2.0]), np.array([0.3, 0.3])) == 0.0  # nothing to rank


def test_agreement_counts_decisive_pairs_and_ties_disagree() -> None:
    t = np.array([0.5, 0.0, 0.0 + DECISIVE_GAP / 2])
    # Decisive: (0,1) and (0,2); (2,1) is a near-tie.
    assert pair_agreement(np.array([1.0, 0.0, 0.0]), t) == (2, 2)
    assert pair_agreement(np.array([0.0, 0.0, 1.0]), t) == (0, 2)  # a tie and a wrong order
    assert pair_agreement(np.zeros(3), t) == (0, 2)


def test_report_carries_baseline_gaps_as_flat_served_vs_keys(
    split: tuple[list[Example], list[Example]],
) -> None:
    _, held = split
    got = evaluate(None, held).as_dict()
    expected = np.mean([ex.baselines["recency"] - ex.served_nll for ex in held])
    assert got["served_vs_recency"] == pytest.approx(expected)
    assert {"served_vs_retrieval", "served_vs_uniform", "ndcg", "agreement"} <= set(got)
    assert all(isinstance(v, int | float) for v in got.values())


def test_held_out_split_is_deterministic_and_about_one_in_k() -> None:
    ids = [f"{1700000000000 + i}-{i % 3}" for i in range(4000)]
    first = [is_held_out(i, 10) for i in ids]
    assert first == [is_held_out(i, 10) for i in ids]
    assert 0.08 < sum(first) / len(ids) < 0.12
