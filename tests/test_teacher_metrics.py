"""recdata.metrics: values checked by hand and against sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recdata import metrics as M


def test_auc_logloss_known_values():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert M.auc(y, s) == pytest.approx(0.75)
    expected = -np.mean([math.log(0.9), math.log(0.6), math.log(0.35), math.log(0.8)])
    assert M.logloss(y, s) == pytest.approx(expected)
    assert M.ctr_metrics(y, s)["auc"] == pytest.approx(0.75)


def test_auc_errors_are_clear():
    with pytest.raises(M.MetricError, match="both classes"):
        M.auc([1, 1, 1], [0.2, 0.3, 0.4])
    with pytest.raises(M.MetricError, match="NaN"):
        M.auc([0, 1], [0.2, float("nan")])
    with pytest.raises(M.MetricError, match=r"\[0, 1\]"):
        M.logloss([0, 1], [-3.0, 2.0])  # logits passed instead of probabilities


def test_logloss_clips_certain_mistakes():
    assert math.isfinite(M.logloss([1, 0], [0.0, 1.0]))


def test_hr_ndcg_by_hand():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.1, 0.2, 0.7]])
    target = np.array([0, 2, 1])  # ranks 0, 1, 1
    assert M.hit_rate_at_k(scores, target, 1) == pytest.approx(1 / 3)
    assert M.hit_rate_at_k(scores, target, 2) == pytest.approx(1.0)
    assert M.ndcg_at_k(scores, target, 2) == pytest.approx((1 + 2 / math.log2(3)) / 3)
    r = M.ranking_metrics(scores, target, ks=(1, 2))
    assert r["hr@1"] == pytest.approx(1 / 3) and r["mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_ties_count_against_the_target():
    scores = np.zeros((4, 20))
    assert M.hit_rate_at_k(scores, np.arange(4), 1) == 0.0
    assert M.hit_rate_at_k(scores, np.arange(4), 20) == 1.0


def test_ranking_input_errors():
    with pytest.raises(M.MetricError, match="target_index"):
        M.hit_rate_at_k(np.zeros((2, 3)), [0, 3], 1)
    with pytest.raises(M.MetricError, match="NaN in row 1"):
        M.hit_rate_at_k(np.array([[1.0, 0.0], [np.nan, 0.0]]), [0, 0], 1)


def test_bootstrap_ci_is_seeded_and_brackets_the_point():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = y * 0.5 + rng.random(300)
    a = M.bootstrap_ci(M.auc, y, s, n_boot=200, seed=3)
    b = M.bootstrap_ci(M.auc, y, s, n_boot=200, seed=3)
    assert a == b
    point, lo, hi = a
    assert lo <= point <= hi and hi - lo < 0.2


def test_generation_metrics_llara_rules():
    cands = [["Toy Story", "Heat", "Alien"]] * 4
    targets = ["Heat", "Heat", "Alien", "Toy Story"]
    outputs = [
        "heat\nsomething else",  # valid, correct (case-insensitive, first line only)
        "Alien",  # valid, wrong
        "Heat or Alien",  # two titles: invalid
        "no idea",  # invalid
    ]
    m = M.generation_metrics(outputs, cands, targets)
    assert m["valid_ratio"] == pytest.approx(0.5)
    assert m["hr1_valid"] == pytest.approx(0.5)
    assert m["hr1_all"] == pytest.approx(0.25)
    assert M.match_candidate("I pick Toy Story.", cands[0]) == 0


def test_rank_agreement_and_title_prior_tell_a_user_model_from_a_title_prior():
    # 200 rows of 10 distinct candidates from 60 items; a "user" signal per (row, item) and a fixed per-item prior
    rng = np.random.default_rng(0)
    cands = np.stack([rng.choice(60, 10, replace=False) for _ in range(200)])
    user = rng.normal(size=cands.shape)
    prior = rng.normal(size=60)[cands]
    assert M.rank_agreement(user, user) == pytest.approx(1.0)
    assert M.rank_agreement(user, -user) == pytest.approx(-1.0)
    assert abs(M.rank_agreement(prior, user)) < 0.1
    # the same score for a title in every row: near 1 (not exactly, the row-centring mixes in the row's other
    # candidates)
    pure = M.title_prior(prior, cands)
    assert pure > 0.9
    assert abs(M.title_prior(user, cands)) < 0.1
    assert 0.4 < M.title_prior(prior + user, cands) < 0.9
    # a row shifted as a whole does not change its ranking, nor the prior
    assert M.title_prior(prior + rng.normal(size=(200, 1)) * 5, cands) == pytest.approx(pure)
    with pytest.raises(M.MetricError, match="title_prior"):
        M.title_prior(prior[:, :5], cands)
    with pytest.raises(M.MetricError, match="rank_agreement"):
        M.rank_agreement(user, user[:, :3])
