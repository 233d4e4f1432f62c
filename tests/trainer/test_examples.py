"""Record -> training example: per-unit values, their sign, validation, and bounded records."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lens_serve.core.lensnet import N_FEATURES
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.core_helpers import random_table
from tests.trainer_synthetic import CHOICE, ROWS, needle_record, old_format_record
from trainer.examples import Example, RecordError, TargetConfig, example_from_record


def _example(record: pb.PreferenceRecord, config: TargetConfig | None = None) -> Example:
    return example_from_record(record, "1-0", random_table(), config or TargetConfig())


def _with_gains(record: pb.PreferenceRecord, *gains: tuple[int, str, float]) -> None:
    """Replace the record's measurements by (unit, edit, mean_nll) ones."""
    del record.unit_gains[:]
    for unit, edit, nll in gains:
        record.unit_gains.append(pb.UnitGain(unit=unit, edit=edit, source="prior", mean_nll=nll))


def _raw_and_gist(record: pb.PreferenceRecord) -> tuple[int, int]:
    """Positions of a raw block and of a gist among the record's units."""
    lods = [u.lod for u in record.units if u.index >= 0]
    return lods.index(0), next(k for k, lod in enumerate(lods) if lod >= 1)


def test_value_is_the_gain_for_an_expand_and_minus_the_gain_for_a_collapse() -> None:
    record = needle_record(0)
    served = record.variants[0].mean_nll
    raw, gist = _raw_and_gist(record)
    # Expanding the gist helped by 0.4 nats; collapsing the raw block hurt by 0.3.
    _with_gains(record, (gist, "expand", served - 0.4), (raw, "collapse", served + 0.3))
    ex = _example(record)
    assert sorted(ex.measured.tolist()) == sorted([gist, raw])
    value = dict(zip(ex.measured.tolist(), ex.value.tolist(), strict=True))
    # Both say "show it finer": the expand that helped and the raw block that must stay raw.
    assert value[gist] == pytest.approx(0.4, abs=1e-5)
    assert value[raw] == pytest.approx(0.3, abs=1e-5)
    # A collapse that helped says the opposite.
    _with_gains(record, (gist, "expand", served - 0.4), (raw, "collapse", served - 0.3))
    assert sorted(_example(record).value.tolist()) == pytest.approx([-0.3, 0.4], abs=1e-5)


def test_example_holds_the_records_inputs_prior_and_baselines() -> None:
    record = needle_record(3)
    ex = _example(record)
    u = len(record.units)
    assert ex.content.shape == (u, random_table().hidden_size)
    assert ex.content.dtype == torch.float16
    assert ex.features.shape == (u, N_FEATURES)
    assert ex.lods.tolist() == [max(unit.lod, 0) for unit in record.units]
    assert ex.prior.tolist() == pytest.approx([unit.prior for unit in record.units])
    assert 2 <= len(ex.measured) <= CHOICE.total and ex.labelled
    assert ex.served_nll == pytest.approx(record.variants[0].mean_nll)
    assert set(ex.baselines) == {"retrieval", "uniform", "recency"}
    assert ex.scale == pytest.approx(max(float(ex.value.std()), TargetConfig().min_std))


def test_repeated_measurements_of_a_unit_are_averaged() -> None:
    record = needle_record(1)
    served = record.variants[0].mean_nll
    _, gist = _raw_and_gist(record)
    _with_gains(record, (gist, "expand", served - 0.2), (gist, "expand", served - 0.4))
    ex = _example(record)
    assert ex.measured.tolist() == [gist]
    assert ex.value.tolist() == pytest.approx([0.3], abs=1e-5)
    assert not ex.labelled  # one unit: nothing to rank


def test_records_whose_values_do_not_spread_carry_no_label() -> None:
    record = needle_record(2)
    served = record.variants[0].mean_nll
    raw, gist = _raw_and_gist(record)
    _with_gains(record, (gist, "expand", served), (raw, "collapse", served))
    ex = _example(record)
    assert ex.spread == 0 and not ex.labelled
    assert ex.scale == TargetConfig().min_std  # the floor: no division by a zero spread


def test_old_format_and_unit_less_records_are_rejected_with_the_reason() -> None:
    with pytest.raises(RecordError, match=r"old format: .* per-unit gains only"):
        _example(old_format_record(0))
    record = needle_record(0)
    record.ClearField("units")
    record.ClearField("unit_gains")
    with pytest.raises(RecordError, match="no units"):
        _example(record)


def _broken(kind: str) -> pb.PreferenceRecord:
    record = needle_record(4, lifetime=277)  # ends in a partial block of 1 token
    if kind == "served_not_first":
        record.variants[0].kind = "random"
    elif kind == "nan_variant":
        record.variants[1].mean_nll = math.nan
    elif kind == "nan_gain":
        record.unit_gains[0].mean_nll = math.inf
    elif kind == "unit_out_of_range":
        record.unit_gains[0].unit = len(record.units)
    elif kind == "partial_block_measured":
        assert record.units[-1].index == -1
        record.unit_gains[0].unit = len(record.units) - 1
    elif kind == "unknown_edit":
        record.unit_gains[0].edit = "swap"
    elif kind == "features":
        del record.units[0].features[-1]
    elif kind == "content":
        record.units[0].content_token_ids[0] = 10**6  # outside the vocabulary
    return record


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("served_not_first", "not the served"),
        ("nan_variant", "not finite"),
        ("nan_gain", "not finite"),
        ("unit_out_of_range", "not a unit of the served tiling"),
        ("partial_block_measured", "not a unit of the served tiling"),
        ("unknown_edit", "not one of"),
        ("features", "features"),
        ("content", "vocabulary"),
    ],
)
def test_malformed_records_are_rejected_with_the_reason(kind: str, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        _example(_broken(kind))


def test_records_of_another_model_are_rejected() -> None:
    record = needle_record(0, model="/models/other-model")
    table = random_table()
    with pytest.raises(RecordError, match="other-model"):
        example_from_record(record, "1-0", table, TargetConfig(), model="smollm2-135m")
    # The same model under another directory is fine.
    example_from_record(record, "1-0", table, TargetConfig(), model="/elsewhere/other-model")


@pytest.mark.parametrize("lifetime", [10_000, 1_000_000])
def test_a_record_is_bounded_by_the_budget_not_by_the_lifetime(lifetime: int) -> None:
    block = 32
    record = needle_record(0, lifetime=lifetime, block=block, slack=256)
    # Every unit takes at least a gist's rows: at most budget / rows units, plus the partial block.
    max_units = record.budget // ROWS + 1
    assert len(record.units) <= max_units
    # A unit is its LOD, index, prior and features (< 64 bytes) and at most a block of token ids
    # (< 5 bytes each); the measurements, variant specs and headers add a few KB.
    bound = max_units * (64 + 5 * block) + 8 * 1024
    assert record.ByteSize() <= bound <= 256 * 1024
    assert record.ByteSize() < lifetime  # far below the lifetime's token ids alone
    ex = _example(record)  # and the trainer learns from it like any other
    assert ex.labelled and len(ex.lods) == len(record.units)
    assert np.isfinite(ex.value).all()
