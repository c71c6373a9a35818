"""The streaming ensemble verifier against the direct per-case scores and known answers."""

from __future__ import annotations

import numpy as np
import pytest

from cloudburst.evaluation.scores import (
    RankHistogram,
    Reliability,
    SpreadSkill,
    crps_cases,
    threshold_weighted_crps_cases,
)
from cloudburst.evaluation.verify import EnsembleVerifier, HistogramAccumulator, TailQuantiles


def rain(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Intermittent, heavy-tailed values with exact zeros (ties) like precipitation."""
    return np.where(rng.random(shape) < 0.4, 0.0, rng.gamma(0.7, 5.0, shape))


def test_paired_scores_equal_the_direct_per_case_scores():
    rng = np.random.default_rng(0)
    ens, obs = rain(rng, (9, 300)), rain(rng, (300,))
    v = EnsembleVerifier({"q90": 8.0}, max_elements=500)  # many sub-blocks
    v.update(ens[:, :170], obs[:170])
    v.update(ens[:, 170:], obs[170:])
    out = v.compute()
    assert out["cases"] == 300
    assert out["crps"] == pytest.approx(crps_cases(ens, obs).mean(), rel=1e-10)
    assert out["crps_fair"] == pytest.approx(crps_cases(ens, obs, fair=True).mean(), rel=1e-10)
    tw = threshold_weighted_crps_cases(ens, obs, 8.0).mean()
    assert out["twcrps_q90"] == pytest.approx(tw, rel=1e-10)
    ss = SpreadSkill()
    ss.update(ens, obs)
    assert out["spread_skill"] == pytest.approx(ss.compute(), rel=1e-10)
    rel = Reliability(8.0)
    rel.update(ens, obs)
    ref = rel.compute()
    np.testing.assert_array_equal(out["reliability_q90"]["cases"], ref["cases"])
    np.testing.assert_allclose(out["reliability_q90"]["observed"], ref["observed"])
    p = (ens > 8.0).mean(axis=0)
    assert out["brier_q90"] == pytest.approx(np.mean((p - (obs > 8.0)) ** 2))


def test_weighted_crps_equals_the_direct_weighted_score():
    rng = np.random.default_rng(1)
    ens, obs = rain(rng, (12, 200)), rain(rng, (200,))
    w = rng.random(12) + 0.1
    v = EnsembleVerifier({"t": 5.0})
    v.update(ens, obs, weights=w)
    out = v.compute()
    assert out["crps"] == pytest.approx(crps_cases(ens, obs, weights=w).mean(), rel=1e-10)
    assert "crps_fair" not in out  # defined for equal weights only
    tw = threshold_weighted_crps_cases(ens, obs, 5.0, weights=w).mean()
    assert out["twcrps_t"] == pytest.approx(tw, rel=1e-10)


def test_one_member_pair_crps_is_the_absolute_error():
    # two identical members: the ensemble is a point forecast, CRPS = |x - y|
    x = np.array([[1.0, 4.0, 0.0], [1.0, 4.0, 0.0]])
    y = np.array([3.0, 1.5, 0.0])
    v = EnsembleVerifier()
    v.update(x, y)
    assert v.compute()["crps"] == pytest.approx(np.mean([2.0, 2.5, 0.0]))


def test_shared_ensemble_equals_repeating_it_per_observation():
    rng = np.random.default_rng(2)
    ens, obs = rain(rng, (40, 30)), rain(rng, (25, 30))
    shared = EnsembleVerifier({"t": 6.0})
    shared.update(ens, obs)
    got = shared.compute()
    rep = np.repeat(ens[:, None, :], 25, axis=1)  # (members, observations, cells)
    assert got["cases"] == 25 * 30
    assert got["crps"] == pytest.approx(crps_cases(rep, obs).mean(), rel=1e-10)
    assert got["crps_fair"] == pytest.approx(crps_cases(rep, obs, fair=True).mean(), rel=1e-10)
    tw = threshold_weighted_crps_cases(rep, obs, 6.0).mean()
    assert got["twcrps_t"] == pytest.approx(tw, rel=1e-10)


def test_nan_observations_are_skipped():
    rng = np.random.default_rng(3)
    ens, obs = rain(rng, (8, 50)), rain(rng, (50,))
    holed = obs.copy()
    holed[::5] = np.nan
    a, b = EnsembleVerifier(), EnsembleVerifier()
    a.update(ens, holed)
    keep = np.isfinite(holed)
    b.update(ens[:, keep], obs[keep])
    assert a.compute()["cases"] == 40
    assert a.compute()["crps"] == pytest.approx(b.compute()["crps"])


@pytest.mark.parametrize("members", [7, 50])
def test_rank_histogram_is_flat_for_exchangeable_members(members):
    # members and observation from one distribution, with ties at zero: flat histogram
    rng = np.random.default_rng(4)
    n = 40_000
    draws = rain(rng, (members + 1, n))
    v = EnsembleVerifier(rank_bins=10)
    v.update(draws[1:], draws[0])
    hist = np.asarray(v.compute()["rank_histogram"])
    k = min(10, members + 1)
    assert hist.size == k
    assert np.abs(hist - 1 / k).max() < 5 * np.sqrt((1 / k) / n)
    # the equal-weight rank histogram agrees with the classical per-case one when K = M + 1
    if members + 1 <= 10:
        classic = RankHistogram(members)
        classic.update(draws[1:], draws[0])
        np.testing.assert_allclose(hist, classic.compute(), atol=0.01)


def test_rank_histogram_shows_an_underdispersed_ensemble():
    rng = np.random.default_rng(5)
    obs = rng.normal(0, 2.0, 20_000)
    ens = rng.normal(0, 1.0, (19, 20_000))
    v = EnsembleVerifier(rank_bins=20)
    v.update(ens, obs)
    out = v.compute()
    hist = np.asarray(out["rank_histogram"])
    assert hist[0] > 2 / 20 and hist[-1] > 2 / 20  # U shape: observation outside too often
    assert out["spread_skill"] < 0.7


def test_weighted_pit_is_flat_when_weights_correct_a_shifted_proposal():
    # members drawn from N(1, 1) with weights p/q for p = N(0, 1): the weighted ensemble is
    # calibrated for observations from N(0, 1)
    rng = np.random.default_rng(6)
    z = rng.normal(1.0, 1.0, 4000)
    w = np.exp(-0.5 * z**2) / np.exp(-0.5 * (z - 1.0) ** 2)
    obs = rng.normal(0.0, 1.0, (5000, 1))
    ens = z[:, None]
    weighted, plain = EnsembleVerifier(rank_bins=10), EnsembleVerifier(rank_bins=10)
    weighted.update(ens, obs, weights=w)
    plain.update(ens, obs)
    flat = np.asarray(weighted.compute()["rank_histogram"])
    skew = np.asarray(plain.compute()["rank_histogram"])
    assert np.abs(flat - 0.1).max() < 0.025
    assert skew[0] > 0.2  # unweighted, the shifted members sit above the observations


def test_bad_input_is_refused():
    v = EnsembleVerifier()
    with pytest.raises(ValueError, match="same cells"):
        v.update(np.zeros((3, 4)), np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 members"):
        v.update(np.zeros((1, 4)), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        v.update(np.full((3, 4), np.nan), np.zeros(4))
    with pytest.raises(ValueError, match="weights"):
        v.update(np.zeros((3, 4)), np.zeros(4), weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="no valid case"):
        EnsembleVerifier().compute()


def test_histogram_accumulator_streams_with_weights():
    rng = np.random.default_rng(7)
    vals = rain(rng, (20, 10))
    w = rng.random(20)
    edges = np.array([0.0, 0.5, 2.0, 10.0, 1e9])
    h = HistogramAccumulator(edges)
    h.update(vals[:7], w[:7])
    h.update(vals[7:], w[7:])
    ref, _ = np.histogram(vals, bins=edges, weights=np.repeat(w, 10).reshape(20, 10))
    np.testing.assert_allclose(h.counts, ref)


def test_tail_quantiles_are_exact_at_high_levels_and_close_below():
    rng = np.random.default_rng(8)
    vals = rain(rng, (50, 4000))
    tq = TailQuantiles(np.linspace(0, 200, 4001), keep=20_001)  # top 10 % of 200k, and one
    for a in range(0, 50, 10):
        tq.update(vals[a : a + 10])
    flat = np.sort(vals.ravel())
    n = flat.size
    for level in (0.9, 0.99, 0.999, 0.99999):
        expected = flat[int(np.ceil(level * n)) - 1]  # at most (1 - q) n values above it
        assert tq.quantiles([level])[0] == pytest.approx(expected)
    bulk = tq.quantiles([0.5, 0.8])
    np.testing.assert_allclose(bulk, np.quantile(flat, [0.5, 0.8]), atol=0.06)
