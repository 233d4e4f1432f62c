"""Record -> training example: rebuilding, per-unit targets and their sign."""

from __future__ import annotations

import numpy as np
import pytest

from lens_serve.core.context import Tiling, coarsest_tiling, levels_for
from lens_serve.core.lensnet import LensNet, LensNetConfig, score_units, unit_inputs
from lens_serve.core.tree import LifetimeTree
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.core_helpers import HIDDEN, VOCAB, random_table
from tests.trainer_synthetic import BLOCK, ROWS, TAIL, needle_record, record_of, variant
from trainer.examples import (
    Example,
    RecordError,
    TargetConfig,
    build_pairs,
    example_from_record,
    gistnet_for,
    unit_targets,
)
from trainer.gate import evaluate
from trainer.train import PreferenceTrainer, collate

LIFETIME = 70  # B = 4, tail 16: gists (2,0) (2,1) (2,2) (1,12), raw blocks 13-16, 2 loose tokens


def _tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, LIFETIME)


def _served() -> Tiling:
    tiling = coarsest_tiling(LIFETIME, TAIL, levels_for(LIFETIME, BLOCK), BLOCK, ROWS)
    assert tiling.units[:4] == [(2, 0), (2, 1), (2, 2), (1, 12)]
    return tiling


def _expand(tiling: Tiling, position: int) -> Tiling:
    """`tiling` with unit number `position` (an LOD2 gist) replaced by its four LOD1 children."""
    lod, index = tiling.units[position]
    kids = [(lod - 1, index * BLOCK + j) for j in range(BLOCK)]
    units = tiling.units[:position] + kids + tiling.units[position + 1 :]
    return Tiling(units, tiling.lifetime, tiling.block_size, tiling.gist_rows)


def _record(*variants: tuple[Tiling, str, float]) -> pb.PreferenceRecord:
    shadow = [variant(t, kind, nll) for t, kind, nll in variants]
    return record_of(_tokens(), shadow, budget=64)


def _example(record: pb.PreferenceRecord, config: TargetConfig | None = None) -> Example:
    return example_from_record(record, "1-0", random_table(), config or TargetConfig())


def test_expanding_a_gist_that_lowers_nll_gives_a_positive_target_on_that_gist() -> None:
    served = _served()
    expanded = _expand(served, 1)  # (2,1) -> (1,4..7)
    record = _record((served, "served", 2.0), (expanded, "random", 1.6))
    ex = example_from_record(record, "1-0", random_table(), TargetConfig())
    pair, mirror = ex.pairs
    assert (pair.better, pair.worse, pair.scored) == (1, 0, 0)
    assert pair.gap == pytest.approx(0.4)
    # One target per unit of the worse (served) variant plus its loose tokens, which get none.
    assert len(pair.targets) == len(served.units) + 1
    assert pair.targets[1] > 0
    assert np.count_nonzero(pair.targets) == 1
    # The mirror, on the better variant: its four children (1,4..7) must not collapse back.
    assert (mirror.better, mirror.worse, mirror.scored) == (1, 0, 1)
    assert np.all(mirror.targets[1:5] > 0) and np.count_nonzero(mirror.targets) == 4
    assert mirror.targets[1:5].sum() == pytest.approx(pair.targets[1])  # a side weighs s in all


def test_expanding_a_gist_that_raises_nll_gives_collapse_targets_on_its_children() -> None:
    served = _served()
    expanded = _expand(served, 1)
    record = _record((served, "served", 2.0), (expanded, "random", 2.4))
    ex = example_from_record(record, "1-0", random_table(), TargetConfig())
    pair, mirror = ex.pairs
    assert (pair.better, pair.worse, pair.scored) == (0, 1, 1)
    assert np.all(pair.targets[1:5] < 0)  # the four children (1,4..7) should collapse back
    assert np.count_nonzero(pair.targets) == 4
    assert mirror.scored == 0 and mirror.targets[1] < 0  # and the served gist stays a gist
    assert np.count_nonzero(mirror.targets) == 1


def test_a_prior_for_gists_over_finer_units_agrees_with_only_half_the_pairs() -> None:
    served = _served()
    tilings = [served, _expand(served, 0), _expand(served, 1), _expand(served, 2)]
    for nlls in ([2.0, 1.0, 1.5, 3.0], [1.0, 2.0, 1.5, 3.0]):
        pairs = build_pairs(tilings, nlls, TargetConfig())
        # Two variants that each expanded another gist: a swap, two-sided in both halves.
        swaps = [p for p in pairs if p.worse != 0 and p.better != 0]
        assert len(swaps) >= 2
        margins = []
        for p in swaps:  # LOD prior: score = the unit's level, whatever its content
            lods = np.array([lod for lod, _ in tilings[p.scored].units], dtype=np.float32)
            margins.append(float(lods @ p.targets[: len(lods)]))
        assert [m > 1e-6 for m in margins] == [True, False] * (len(swaps) // 2)


def test_training_on_an_expansion_that_helped_scores_that_gist_positive() -> None:
    served = _served()
    helped, hurt = _expand(served, 1), _expand(served, 2)
    record = _record((served, "served", 2.0), (helped, "random", 1.6), (hurt, "random", 2.1))
    table = random_table()
    ex = example_from_record(record, "1-0", table, TargetConfig())
    net = LensNet(LensNetConfig(hidden_size=HIDDEN, seed=0))
    before = evaluate(net, [ex], 1.0)
    assert before.agreement == 0.0  # the initial zero head scores everything 0
    trainer = PreferenceTrainer(net, lr=3e-3, temperature=1.0, seed=0)
    for _ in range(40):
        trainer.step(collate([ex]))
    tree = LifetimeTree(gistnet_for(record, table), table)
    tree.append(_tokens())
    scores = score_units(net, unit_inputs(tree, served, TAIL))
    assert scores[1] > 0  # expand (2,1): expanding it lowered the NLL
    assert scores[1] > scores[2]  # and prefer it to (2,2), whose expansion hurt
    after = evaluate(net, [ex], 1.0)
    assert after.agreement == 1.0
    assert after.correlation > 0


def test_unit_targets_mark_finer_plus_coarser_minus_and_same_zero() -> None:
    served = _served()
    finer = _expand(served, 1)
    assert unit_targets(served, finer).tolist() == [0, 1] + [0] * (len(served.units) - 2)
    assert unit_targets(finer, served).tolist() == [0, -1, -1, -1, -1] + [0] * (
        len(finer.units) - 5
    )
    assert not unit_targets(served, served).any()


def test_raw_block_gets_a_collapse_target_when_the_better_variant_gists_it() -> None:
    served = _served()
    units = list(served.units)
    raw = units.index((0, 13))
    units[raw] = (1, 13)
    gisted = Tiling(units, LIFETIME, BLOCK, ROWS)
    assert unit_targets(served, gisted)[raw] == -1
    assert unit_targets(gisted, served)[raw] == 1


def test_pair_strength_grows_with_the_gap_and_is_normalised_per_record() -> None:
    served = _served()
    tilings = [served, _expand(served, 0), _expand(served, 1)]
    pairs = build_pairs(tilings, [1.0, 1.1, 2.0], TargetConfig())
    strength = {(p.better, p.worse): float(np.abs(p.targets).max()) for p in pairs[::2]}
    assert set(strength) == {(0, 1), (0, 2), (1, 2)}
    assert strength[(0, 2)] > strength[(0, 1)]
    assert all(0 < s < 1 for s in strength.values())
    # The same ranking on a 10x larger NLL scale teaches the same strengths.
    scaled = build_pairs(tilings, [10.0, 11.0, 20.0], TargetConfig())
    assert [float(np.abs(p.targets).max()) for p in scaled] == pytest.approx(
        [float(np.abs(p.targets).max()) for p in pairs]
    )


def test_pairs_put_the_best_variant_first_and_respect_max_pairs() -> None:
    served = _served()
    tilings = [served, _expand(served, 0), _expand(served, 1), _expand(served, 2)]
    pairs = build_pairs(tilings, [2.0, 1.0, 1.5, 3.0], TargetConfig(max_pairs=3))
    assert len(pairs) == 6  # each with its mirror
    assert all(p.better == 1 for p in pairs)  # best-vs-rest come first
    assert [p.worse for p in pairs[::2]] == [3, 0, 2]  # largest gap first
    assert [p.scored for p in pairs] == [3, 1, 0, 1, 2, 1]


def test_baseline_that_drops_old_text_is_kept_for_evaluation_only() -> None:
    record = needle_record(3)
    ex = example_from_record(record, "1-0", random_table(), TargetConfig())
    assert "recency" in ex.baselines
    assert len(ex.variants) == len(record.variants) - 1
    assert ex.variants[ex.reference].kind == "served"


def test_record_is_refused_when_the_gistnet_version_does_not_match() -> None:
    record = needle_record(0)
    record.gistnet_version = "gist-tokens-000000000000"
    with pytest.raises(RecordError, match="gives"):
        _example(record)
    record.gistnet_version = "gist-transformer-000000000000"
    with pytest.raises(RecordError, match="not supported"):
        _example(record)
    record.gistnet_version = "tokens"
    with pytest.raises(RecordError, match="gistnet"):
        _example(record)


def test_record_is_refused_when_the_window_does_not_start_at_zero() -> None:
    record = needle_record(0)
    record.window_start = 64
    with pytest.raises(RecordError, match="window_start"):
        _example(record)


def test_record_is_refused_when_it_names_another_model_or_foreign_tokens() -> None:
    record = needle_record(0)
    record.model = "smollm2-135m"
    with pytest.raises(RecordError, match="model"):
        example_from_record(record, "1-0", random_table(), TargetConfig(), model="tiny")
    record = needle_record(0)
    record.lifetime_token_ids[0] = VOCAB + 5
    with pytest.raises(RecordError, match="lifetime_token_ids"):
        _example(record)


def test_record_is_refused_when_no_variant_covers_the_lifetime() -> None:
    record = needle_record(0)
    kept = [v for v in record.variants if v.kind == "recency"]
    del record.variants[:]
    record.variants.extend(kept)
    with pytest.raises(RecordError, match="covers the whole lifetime"):
        _example(record)


def test_same_units_share_one_row_of_the_example_table() -> None:
    ex = example_from_record(needle_record(5), "1-0", random_table(), TargetConfig())
    used = np.concatenate([v.rows for v in ex.variants])
    assert ex.content.shape[0] == len(np.unique(used)) < len(used)
