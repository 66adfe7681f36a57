"""hungarian_match with non-finite similarities: never stored as a score, never breaking the solver."""

from __future__ import annotations

import math

import numpy as np

from multicrafter.metrics.hungarian import hungarian_match


def test_plain_one_to_one_matching():
    res = hungarian_match(np.array([[0.9, 0.8], [0.85, 0.1]]))
    assert sorted((r, c) for r, c, _ in res.matches) == [(0, 1), (1, 0)]
    assert math.isclose(res.score, (0.8 + 0.85) / 2)


def test_nan_pair_is_not_a_match_and_scores_zero():
    res = hungarian_match(np.array([[np.nan], [0.4]]))
    assert res.matches == [(1, 0, 0.4)]
    assert res.per_reference == [0.0, 0.4]
    assert math.isclose(res.score, 0.2)


def test_only_nan_gives_no_matches_rather_than_minus_one():
    res = hungarian_match(np.array([[np.nan, np.nan]]))
    assert res.matches == [] and res.per_reference == [0.0] and res.score == 0.0


def test_inf_entries_neither_win_nor_overflow():
    sim = np.array([[np.inf, 0.3], [0.7, -np.inf]])
    res = hungarian_match(sim)
    assert all(math.isfinite(s) for _, _, s in res.matches)
    assert math.isfinite(res.score) and 0.0 <= res.score <= 1.0
    assert sorted((r, c) for r, c, _ in res.matches) == [(0, 1), (1, 0)]
    assert math.isclose(res.score, (0.3 + 0.7) / 2)


def test_all_inf_is_zero():
    res = hungarian_match(np.full((2, 2), np.inf))
    assert res.matches == [] and res.score == 0.0
