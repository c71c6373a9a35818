"""Verification scores against hand-computed values and their defining properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cloudburst.evaluation import scores


def crps_brute(x: np.ndarray, y: float, w: np.ndarray | None = None, fair: bool = False) -> float:
    m = len(x)
    w = np.full(m, 1.0 / m) if w is None else w / w.sum()
    skill = sum(w[i] * abs(x[i] - y) for i in range(m))
    pairs = sum(w[i] * w[j] * abs(x[i] - x[j]) for i, j in itertools.product(range(m), repeat=2))
    if fair:
        pairs *= m / (m - 1)
    return skill - 0.5 * pairs


def test_one_member_crps_is_the_absolute_error():
    ens = np.array([[1.0, 5.0, -2.0]])
    obs = np.array([3.0, 5.0, 1.0])
    assert scores.crps_cases(ens, obs).tolist() == pytest.approx([2.0, 0.0, 3.0])


@pytest.mark.parametrize(("weighted", "fair"), [(False, False), (False, True), (True, False)])
def test_crps_matches_the_literal_double_sum(weighted, fair):
    rng = np.random.default_rng(0)
    ens = rng.gamma(0.7, 3.0, size=(7, 4, 3))
    ens[2, 0, 0] = ens[5, 0, 0]  # ties
    obs = rng.gamma(0.7, 3.0, size=(4, 3))
    w = rng.random(7) if weighted else None
    got = scores.crps_cases(ens, obs, weights=w, fair=fair)
    want = [
        crps_brute(ens[:, i, j], obs[i, j], w, fair)
        for i, j in itertools.product(range(4), range(3))
    ]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    if weighted:
        with pytest.raises(ValueError, match="equally weighted"):
            scores.crps_cases(ens, obs, weights=w, fair=True)


def test_fair_crps_is_unbiased_for_an_exchangeable_ensemble():
    # members and observation from N(0, 1): E[CRPS(N(0,1), y)] = 1 / sqrt(pi)
    rng = np.random.default_rng(1)
    m, n = 4, 200_000
    ens, obs = rng.standard_normal((m, n)), rng.standard_normal(n)
    fair = scores.crps_cases(ens, obs, fair=True).mean()
    plain = scores.crps_cases(ens, obs).mean()
    assert fair == pytest.approx(1 / np.sqrt(np.pi), abs=0.005)
    assert plain > 1 / np.sqrt(np.pi) + 0.05  # the plain estimate penalises small ensembles


def test_threshold_weighted_crps():
    rng = np.random.default_rng(2)
    ens, obs = rng.gamma(1.0, 2.0, (10, 50)), rng.gamma(1.0, 2.0, 50)
    below_all = scores.threshold_weighted_crps_cases(ens, obs, threshold=-1.0)
    assert below_all == pytest.approx(scores.crps_cases(ens, obs))
    assert (scores.threshold_weighted_crps_cases(ens, obs, threshold=1e6) == 0).all()
    tw = scores.threshold_weighted_crps_cases(ens, obs, threshold=3.0)
    assert (tw >= 0).all() and (tw <= scores.crps_cases(ens, obs) + 1e-12).all()


def test_mean_score_accumulates_over_chunks_as_one_pass():
    rng = np.random.default_rng(3)
    ens, obs = rng.random((5, 1000)), rng.random(1000)
    whole = scores.crps_cases(ens, obs).mean()
    acc = scores.MeanScore()
    for a in range(0, 1000, 300):
        acc.update(scores.crps_cases(ens[:, a : a + 300], obs[a : a + 300]))
    assert acc.compute() == pytest.approx(whole)


def test_rank_histogram_is_flat_for_an_exchangeable_ensemble_and_not_otherwise():
    rng = np.random.default_rng(4)
    m, n = 9, 50_000
    flat = scores.RankHistogram(m)
    flat.update(rng.standard_normal((m, n)), rng.standard_normal(n))
    freq = flat.compute()
    assert freq.sum() == pytest.approx(1.0)
    assert np.abs(freq - 1 / (m + 1)).max() < 0.01
    narrow = scores.RankHistogram(m)
    narrow.update(0.3 * rng.standard_normal((m, n)), rng.standard_normal(n))
    f = narrow.compute()
    assert f[0] > 2 / (m + 1) and f[-1] > 2 / (m + 1)  # under-dispersed: U shape
    # ties (dry pixels) are spread evenly, not stacked in one bin
    dry = scores.RankHistogram(4)
    dry.update(np.zeros((4, 10_000)), np.zeros(10_000))
    assert np.abs(dry.compute() - 0.2).max() < 0.02


def test_spread_skill_is_one_when_calibrated():
    rng = np.random.default_rng(5)
    m, n = 5, 100_000
    truth_mean = rng.standard_normal(n)
    ens = truth_mean + rng.standard_normal((m, n))
    obs = truth_mean + rng.standard_normal(n)
    acc = scores.SpreadSkill()
    acc.update(ens[:, : n // 2], obs[: n // 2])
    acc.update(ens[:, n // 2 :], obs[n // 2 :])
    assert acc.compute() == pytest.approx(1.0, abs=0.02)
    over = scores.SpreadSkill()
    over.update(truth_mean + 3 * rng.standard_normal((m, n)), obs)
    assert over.compute() > 1.5


def test_reliability_of_a_calibrated_probability_forecast():
    rng = np.random.default_rng(6)
    m, n = 20, 100_000
    k = rng.integers(0, m + 1, n)  # members above the threshold
    ens = np.where(np.arange(m)[:, None] < k[None, :], 2.0, 0.0)
    obs = np.where(rng.random(n) < k / m, 2.0, 0.0)
    rel = scores.Reliability(threshold=1.0, bins=5)
    rel.update(ens, obs)
    out = rel.compute()
    assert out["cases"].sum() == n
    assert np.abs(out["forecast"] - out["observed"]).max() < 0.02
    with pytest.raises(ValueError, match="members"):
        rel.update(ens[:, :10], obs)
