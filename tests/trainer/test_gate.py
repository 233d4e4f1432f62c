"""The evaluation gate on held-out records."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from lens_serve.core.lensnet import LensNet, LensNetConfig
from tests.core_helpers import HIDDEN, random_table
from tests.trainer_synthetic import needle_record
from trainer.examples import Example, TargetConfig, example_from_record
from trainer.gate import (
    DECISIVE_GAP,
    GateReport,
    decide,
    evaluate,
    is_held_out,
    mean_within_record_correlation,
    pearson,
)
from trainer.train import PreferenceTrainer, agrees, collate, scores

HELD_OUT_EVERY = 4


def report(decisive: float, agreement: float, records: int = 10) -> GateReport:
    return GateReport(
        decisive_agreement=decisive,
        decisive_pairs=60,
        agreement=agreement,
        weighted_agreement=agreement,
        correlation=0.5,
        loss=0.1,
        pairs=100,
        edits=50,
        records=records,
        served_vs_recency=0.0,
    )


NO_PRIOR = report(decisive=0.0, agreement=0.0)
"""A prior that orders nothing: these gates are about the rest."""


@pytest.fixture(scope="module")
def split() -> tuple[list[Example], list[Example]]:
    table = random_table()
    examples = [
        example_from_record(needle_record(s), f"{1000 + s}-0", table, TargetConfig())
        for s in range(64)
    ]
    held = [e for e in examples if is_held_out(e.entry_id, HELD_OUT_EVERY)]
    train = [e for e in examples if not is_held_out(e.entry_id, HELD_OUT_EVERY)]
    return train, held


@pytest.fixture(scope="module")
def trained(split: tuple[list[Example], list[Example]]) -> LensNet:
    train, _ = split
    net = LensNet(LensNetConfig(hidden_size=HIDDEN, seed=0))
    trainer = PreferenceTrainer(net, lr=3e-3, temperature=1.0, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(80):
        picks = rng.choice(len(train), 8, replace=False)
        trainer.step(collate([train[int(i)] for i in picks]))
    return net


def test_trained_lensnet_passes_the_gate_against_the_initial_one(
    split: tuple[list[Example], list[Example]], trained: LensNet
) -> None:
    _, held = split
    initial = evaluate(LensNet(LensNetConfig(hidden_size=HIDDEN, seed=0)), held, 1.0)
    new = evaluate(trained, held, 1.0)
    assert new.decisive_agreement > 0.7 > initial.decisive_agreement
    assert new.agreement > 0.7 > initial.agreement
    assert new.weighted_agreement > 0.7 > initial.weighted_agreement
    assert new.correlation > 0
    prior = evaluate(None, held, 1.0)
    assert new.decisive_agreement >= prior.decisive_agreement
    decision = decide(new, initial, prior)
    assert decision.passed, decision.reason


def test_gate_refuses_a_worse_model(
    split: tuple[list[Example], list[Example]], trained: LensNet
) -> None:
    _, held = split
    flipped = copy.deepcopy(trained)
    with torch.no_grad():  # the MegaContext polarity bug: every score's sign inverted
        flipped.head.weight.neg_()
        flipped.head.bias.neg_()
    current = evaluate(trained, held, 1.0)
    worse = evaluate(flipped, held, 1.0)
    assert worse.correlation < 0
    assert worse.decisive_agreement < current.decisive_agreement
    assert worse.agreement < current.agreement
    assert worse.weighted_agreement < current.weighted_agreement
    decision = decide(worse, current, NO_PRIOR)
    assert not decision.passed
    assert "correlation" in decision.reason


def test_gate_refuses_lower_decisive_agreement_even_when_the_sign_is_right() -> None:
    current = report(decisive=0.9, agreement=0.6)
    new = report(decisive=0.8, agreement=0.9)  # better on near-ties does not count
    decision = decide(new, current, NO_PRIOR)
    assert not decision.passed
    assert "decisive agreement" in decision.reason
    assert decide(current, current, NO_PRIOR).passed  # equal agreement is not worse
    assert decide(current, new, NO_PRIOR).passed


def test_gate_refuses_a_residual_that_makes_the_prior_worse() -> None:
    current = report(decisive=0.6, agreement=0.6)
    prior = report(decisive=0.8, agreement=0.8)  # retrieval alone orders pairs better
    decision = decide(report(decisive=0.7, agreement=0.9), current, prior)
    assert not decision.passed
    assert "the prior's" in decision.reason
    assert decide(report(decisive=0.8, agreement=0.8), current, prior).passed


def test_gate_refuses_when_there_are_no_held_out_pairs() -> None:
    empty = evaluate(LensNet(LensNetConfig(hidden_size=HIDDEN)), [], 1.0)
    assert empty.pairs == empty.decisive_pairs == 0
    assert not decide(empty, empty, empty).passed


def test_gate_refuses_too_few_held_out_records() -> None:
    good = report(decisive=0.9, agreement=0.9, records=3)
    assert decide(good, good, NO_PRIOR).passed
    decision = decide(good, good, NO_PRIOR, min_records=4)
    assert not decision.passed
    assert "3 held-out records" in decision.reason


def test_held_out_split_is_deterministic_and_about_one_in_k() -> None:
    ids = [f"{1700000000000 + i}-{i % 3}" for i in range(4000)]
    first = [is_held_out(i, 10) for i in ids]
    assert first == [is_held_out(i, 10) for i in ids]
    assert 0.08 < sum(first) / len(ids) < 0.12


def test_pearson_is_zero_when_undefined() -> None:
    assert pearson([1.0], [2.0]) == 0.0
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [6.0, 4.0, 2.0]) == pytest.approx(-1.0)


def test_correlation_gives_each_record_one_vote() -> None:
    # Fifteen records whose small gains LensNet orders right, and one whose lucky variant gained
    # 2 nats (it uncovered the needle) while LensNet preferred another: the loop bench's case.
    rng = np.random.default_rng(0)
    records = []
    for _ in range(15):
        gain = rng.uniform(0.0, 0.05, size=5)  # (E,)
        records.append((gain * 40 + rng.normal(0, 0.3, size=5), gain))
    records.append((np.array([5.3, 3.9, 5.2]), np.array([0.07, 1.97, 0.23])))
    pooled = pearson(
        [x for v, _ in records for x in (v - v.mean())],
        [x for _, g in records for x in (g - g.mean())],
    )
    assert pooled < 0  # the one big record decides a pooled correlation
    assert mean_within_record_correlation(records) > 0.5
    assert mean_within_record_correlation([]) == 0.0


def test_agreements_count_pairs_by_strength_and_by_gap(
    split: tuple[list[Example], list[Example]], trained: LensNet
) -> None:
    _, held = split
    # Every other pair made a near-tie: the synthetic records' pairs are all decisive.
    held = [
        dataclasses.replace(ex, pairs=[
            dataclasses.replace(p, gap=p.gap if i % 2 else DECISIVE_GAP / 2)
            for i, p in enumerate(ex.pairs)
        ])
        for ex in held
    ]  # fmt: skip
    got = evaluate(trained, held, 1.0)
    batch = collate(held, all_variants=True)
    strength = batch.targets.abs().sum(dim=1).numpy()  # (P,)
    assert strength.min() < 0.5 * strength.max()  # pairs differ in strength: weighting matters
    with torch.no_grad():
        agreed = agrees(scores(trained, batch), batch).numpy()  # (P,)
    expected = float((agreed * strength).sum() / strength.sum())
    assert got.weighted_agreement == pytest.approx(expected, rel=1e-5)
    assert got.agreement == pytest.approx(float(agreed.mean()), rel=1e-5)
    decisive = batch.gaps.numpy() >= DECISIVE_GAP  # (P,)
    assert 0 < decisive.sum() < len(decisive)  # near-ties and decisive pairs: the filter matters
    assert got.decisive_pairs == int(decisive.sum())
    assert got.decisive_agreement == pytest.approx(float(agreed[decisive].mean()), rel=1e-5)


NO_PRIOR = report(
    decisive=0.0, agreement=0.0
)  # a prior that orders nothing: the gate is about the rest
