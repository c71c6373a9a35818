"""Verification of steered conditional ensembles (a forecast whose sampler noise comes from a
defensive shift proposal, members carrying importance weights p/q): every score with the
store's weights, and the conditional exceedance of the generated part, P(max over the
generated steps and pixels > t | the condition), checked against hand computations from the
members read with zarr.

The model is the tiny untrained diffusion model of the conditional-ensemble tests with its
output layer's bias at 1: a constant v-prediction pulls the denoised estimate below 0, so the
members' maxima over the generated steps spread out below the data's maximum instead of all
reaching it (where the sampler's clip puts them otherwise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from test_conditional_ensembles import ask, diffusion, store  # noqa: F401

from cloudburst.ensembles.generate import ResolvedModel, generate
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.store import read_marker
from cloudburst.evaluation.conditional import verify_conditional

MEMBERS = 12
CONTEXT = 2  # a forecast: steps 0-1 given, 2-3 generated (and observed by the store: verified)
# the condition holds the synthetic store's largest value (day 27, the data's maximum) in its
# second given frame: every member's maximum over the whole window is that value, so only the
# generated steps tell the members apart
LATE = "2001-01-26T00:00"  # the store's day 26 (index 25)
LATE_INDEX = 25
Y, X = 2, 3


@pytest.fixture(scope="module")
def dry(store) -> ResolvedModel:  # noqa: F811
    resolved = diffusion(store, transform="none")
    with torch.no_grad():
        resolved.packaged.model.net.out[-1].bias.fill_(1.0)
    return resolved


def forecast(store: str, model: ResolvedModel, url: str, time: str, **scenario) -> dict:  # noqa: F811
    request = ask(
        store,
        url,
        kind="forecast",
        context=CONTEXT,
        condition={"data": store, "time": time, "y": Y, "x": X},
        **scenario,
    )
    request = EnsembleRequest.model_validate(
        {**request.model_dump(), "members": MEMBERS, "batch_size": 6, "chunk_members": 5}
    )
    generate(request, model=model)
    group = zarr.open_group(url, mode="r")
    return {
        "url": url,
        "x": np.asarray(group["precip"][:], dtype=np.float64),
        "w": np.asarray(group["weight"][:], dtype=np.float64),
        "attrs": dict(group.attrs),
        "marker": read_marker(url, None),
    }


@pytest.fixture(scope="module")
def steered(store, dry, tmp_path_factory) -> dict:  # noqa: F811
    url = str(tmp_path_factory.mktemp("steered") / "f.zarr")
    return forecast(store, dry, url, LATE, proposal="shift", shift=3.0)


@pytest.fixture(scope="module")
def plain(store, dry, tmp_path_factory) -> dict:  # noqa: F811
    url = str(tmp_path_factory.mktemp("plain") / "f.zarr")
    return forecast(store, dry, url, LATE)


@pytest.fixture(scope="module")
def truth(store) -> np.ndarray:  # noqa: F811
    """The condition window's four observed frames, read with zarr itself."""
    values = zarr.open_array(store, path="precip", mode="r")
    return np.asarray(values[LATE_INDEX : LATE_INDEX + 4, Y : Y + 8, X : X + 8], np.float64)


def generated_max(members: np.ndarray) -> np.ndarray:
    return members[:, CONTEXT:].reshape(len(members), -1).max(axis=1)


def splitting(maxima: np.ndarray) -> dict[str, float]:
    """Two thresholds between the members' distinct generated maxima (a third and two thirds
    of the way up), so that some members exceed each and some do not."""
    u = np.unique(maxima)
    assert u.size >= 3
    i, j = u.size // 3, 2 * u.size // 3
    return {"q0.95": float(u[i - 1] + u[i]) / 2, "q0.99": float(u[j - 1] + u[j]) / 2}


def crps_by_hand(members: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """sum_i w_i |x_i - y| - 1/2 sum_ij w_i w_j |x_i - x_j| per cell (w normalised), averaged."""
    w = w / w.sum()
    skill = np.einsum("i,i...->...", w, np.abs(members - y[None]))
    spread = np.einsum("i,j,ij...->...", w, w, np.abs(members[:, None] - members[None, :]))
    return float((skill - 0.5 * spread).mean())


def brier_by_hand(members: np.ndarray, y: np.ndarray, w: np.ndarray, t: float) -> float:
    p = np.einsum("i,i...->...", w / w.sum(), (members > t).astype(np.float64))
    return float(((p - (y > t)) ** 2).mean())


def exceedance_by_hand(maxima: np.ndarray, w: np.ndarray, t: float, draws: int) -> tuple:
    """(sum of the weights of members whose maximum exceeds t / draws, its standard error)."""
    hit = w[maxima > t]
    p = hit.sum() / draws
    return p, np.sqrt(max((hit**2).sum() / draws - p**2, 0.0) / (draws - 1))


def test_a_steered_forecast_is_verified_with_its_importance_weights(steered, truth):
    x, w = steered["x"], steered["w"]
    # the store is steered: weights far from equal, every draw stored
    assert steered["attrs"]["proposal"] == "shift" and steered["attrs"]["scenario"] == "forecast"
    assert np.ptp(w) > 0.5 * w.mean() and steered["marker"]["draws"] == MEMBERS
    assert np.isfinite(truth).all()
    thresholds = splitting(generated_max(x))
    source, metrics, curves = verify_conditional(steered["url"], None, thresholds)
    assert source["weighted"] is True
    assert source["effective_members"] == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-12)
    assert source["effective_members"] < MEMBERS / 2
    gen, obs = x[:, CONTEXT:], truth[CONTEXT:]
    weighted = crps_by_hand(gen, obs, w)
    equal = crps_by_hand(gen, obs, np.ones(MEMBERS))
    assert abs(weighted - equal) > 0.05 * equal  # the weights matter on this store
    assert metrics["cond_crps"] == pytest.approx(weighted, rel=1e-9)
    by_step = curves["cond_by_step"]
    for k, t in enumerate(range(CONTEXT, 4)):
        assert by_step["crps"][k] == pytest.approx(crps_by_hand(x[:, t], truth[t], w), rel=1e-9)
    t95 = thresholds["q0.95"]
    assert metrics["cond_brier_q0.95"] == pytest.approx(brier_by_hand(gen, obs, w, t95), abs=1e-12)
    assert "cond_crps_fair" not in metrics  # the fair CRPS is for equal weights only


def test_the_conditional_exceedance_is_the_weighted_share_of_draws(steered, truth):
    x, w = steered["x"], steered["w"]
    draws = int(steered["marker"]["draws"])
    maxima = generated_max(x)
    # the given frames hold the data's maximum: over the whole window every member has the
    # same maximum (an estimate from it would be 0 or the share of every draw), the generated
    # steps alone tell the members apart
    assert np.ptp(x.reshape(MEMBERS, -1).max(axis=1)) == 0 and np.ptp(maxima) > 0
    thresholds = splitting(maxima)
    source, metrics, _ = verify_conditional(steered["url"], None, thresholds)
    for name, t in thresholds.items():
        p, se = exceedance_by_hand(maxima, w, t, draws)
        assert 0 < p < w.sum() / draws  # some members exceed t and some do not
        assert abs(p - (maxima > t).mean()) > 0.01  # and the weights change the estimate
        assert abs(metrics[f"cond_exceedance_{name}"] - p) <= 1e-12
        assert abs(metrics[f"cond_exceedance_{name}_stderr"] - se) <= 1e-12
    assert source["observed_generated_max"] == truth[CONTEXT:].max()
    assert source["draws"] == draws and "exceedance_skipped" not in source


def test_a_plain_forecast_is_verified_with_equal_weights(plain, truth):
    x, w = plain["x"], plain["w"]
    assert (w == 1.0).all() and plain["marker"]["draws"] == MEMBERS
    maxima = generated_max(x)
    thresholds = splitting(maxima)
    source, metrics, _ = verify_conditional(plain["url"], None, thresholds)
    assert source["weighted"] is False and source["effective_members"] == MEMBERS
    gen, obs = x[:, CONTEXT:], truth[CONTEXT:]
    assert metrics["cond_crps"] == pytest.approx(crps_by_hand(gen, obs, w), rel=1e-9)
    assert "cond_crps_fair" in metrics
    for name, t in thresholds.items():
        count = int((maxima > t).sum())
        assert 0 < count < MEMBERS
        assert abs(metrics[f"cond_exceedance_{name}"] - count / MEMBERS) <= 1e-12
    assert source["observed_generated_max"] == truth[CONTEXT:].max()


def test_a_rejecting_threshold_counts_every_draw_and_skips_what_it_hides(
    store,  # noqa: F811
    dry,
    tmp_path,
):
    # at the default condition time the given frames are small: a threshold on the window's
    # maximum is a threshold on the generated part, and rejects draws
    cut = 55.0
    url = str(tmp_path / "t.zarr")
    made = forecast(store, dry, url, "2001-01-03T00:00", proposal="shift", threshold=cut)
    x, w, draws = made["x"], made["w"], int(made["marker"]["draws"])
    assert made["attrs"]["threshold"] == cut and draws > MEMBERS
    maxima = generated_max(x)
    assert (maxima >= cut).all()
    above = splitting(maxima)["q0.95"]  # above the cut: every member reaches the cut
    source, metrics, _ = verify_conditional(url, None, {"low": cut - 5.0, "high": above})
    p, se = exceedance_by_hand(maxima, w, above, draws)
    assert 0 < p < w.sum() / draws
    assert abs(metrics["cond_exceedance_high"] - p) <= 1e-12
    assert abs(metrics["cond_exceedance_high_stderr"] - se) <= 1e-12
    # below the cut the rejected draws' values are unknown: not estimated, and said so
    assert "cond_exceedance_low" not in metrics and "cond_exceedance_low_stderr" not in metrics
    assert "below the store's threshold 55" in source["exceedance_skipped"]["low"]
    assert source["draws"] == draws and source["weighted"] is True
