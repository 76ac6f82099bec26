"""Tests for prunegym.compression.statistics: paired differences with their interval, Spearman."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunegym.compression.statistics import paired_difference, spearman


def test_a_known_difference_gives_a_known_interval():
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2) = 4.302653
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert d.mean == pytest.approx(2.0)
    assert d.low == pytest.approx(2.0 - half) and d.high == pytest.approx(2.0 + half)
    assert (d.n, d.won, d.lost) == (3, 3, 0)


def test_constant_difference_has_a_zero_width_interval_and_ties_are_neither_won_nor_lost():
    d = paired_difference([1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 4.0])
    assert (d.won, d.lost) == (3, 0)
    same = paired_difference([1.0, 2.0], [0.0, 1.0])
    assert same.low == same.high == same.mean == 1.0


def test_the_interval_narrows_with_more_pairs_and_widens_with_confidence():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, 50)
    b = np.zeros(50)
    few, many = paired_difference(a[:5], b[:5]), paired_difference(a, b)
    assert many.high - many.low < few.high - few.low
    wide = paired_difference(a, b, confidence=0.99)
    assert wide.low < many.low < many.mean < many.high < wide.high


def test_one_pair_has_no_interval():
    d = paired_difference([2.0], [1.0])
    assert d.mean == 1.0 and d.low is None and d.high is None and d.as_dict()["n"] == 1


@pytest.mark.parametrize(("a", "b", "match"), [
    ([1.0, 2.0], [1.0], "pair up"),
    ([], [], "pair up"),
    ([1.0, float("nan")], [1.0, 2.0], "finite"),
    ([[1.0, 2.0]], [[1.0, 2.0]], "flat"),
])
def test_bad_pairs_are_refused_by_name(a, b, match):
    with pytest.raises(ValueError, match=match):
        paired_difference(a, b)


def test_bad_confidence_is_refused():
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0, 2.0], [0.0, 0.0], confidence=1.5)


def test_spearman_is_one_for_any_monotone_map_and_minus_one_reversed():
    x = np.array([0.3, 1.0, -2.0, 5.0, 4.0])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x ** 3) == pytest.approx(-1.0)


def test_spearman_handles_ties_with_mean_ranks():
    # ranks of x: 0, 1.5, 1.5, 3; of y: 0, 1, 2, 3 -> Pearson of those
    r = spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    rx, ry = np.array([0, 1.5, 1.5, 3]), np.arange(4.0)
    assert r == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_spearman_refuses_mismatched_input():
    with pytest.raises(ValueError, match="same length"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])
