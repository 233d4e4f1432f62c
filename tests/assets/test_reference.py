"""Paired differences: how the quality benches decide which condition wins."""

from __future__ import annotations

import pytest

from lens_serve.assets.reference import paired_difference


def test_a_constant_gain_is_exact_however_much_windows_differ() -> None:
    baseline = [2.0, 5.0, 3.5, 9.0]
    better = [x - 0.25 for x in baseline]
    d = paired_difference(better, baseline)
    assert d["mean"] == pytest.approx(-0.25)
    assert d["se"] == pytest.approx(0.0, abs=1e-12)
    assert d["worse"] == 0


def test_worse_windows_are_counted_and_the_error_is_of_the_mean() -> None:
    d = paired_difference([1.1, 0.9, 1.3, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert d["mean"] == pytest.approx(0.075)
    assert d["worse"] == 2  # equal is not worse
    diffs = [0.1, -0.1, 0.3, 0.0]
    var = sum((x - 0.075) ** 2 for x in diffs) / 3
    assert d["se"] == pytest.approx((var / 4) ** 0.5)


def test_unpaired_lists_are_refused() -> None:
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])
