"""Extreme scenarios of the diffusion model: the sampler's initial noise drawn from a proposal,
every member with its exact importance weight p(z) / q(z), unconditional and conditioned on
observed frames, with both samplers.

The model is the tiny diffusion model of the conditional-ensemble tests, trained briefly on
the synthetic store (a few hundred CPU steps) so that its window maxima spread out instead of
saturating; the weighted estimator is unbiased whatever the model, so these checks do not
depend on how well it is trained.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from pydantic import ValidationError
from scipy import stats as sps
from test_conditional_ensembles import START, WINDOW, diffusion, store  # noqa: F401

from cloudburst.ensembles.extremes import ensemble_exceedance, exceedance_probability
from cloudburst.ensembles.generate import (
    EnsembleError,
    Generator,
    ResolvedModel,
    generate,
    regenerate,
)
from cloudburst.ensembles.proposals import GaussianProposal, ProposalError, noise_seed
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.union import RADIUS, UNIFORM_SHARE, UnionFit, fit_union
from cloudburst.markers import read_marker
from cloudburst.models.samplers import sample

SIZE = int(np.prod(WINDOW))  # numbers of one window's initial noise
PATTERN = tuple(2 * r + 1 for r in RADIUS)  # shape of a union's noise pattern
TRAIN_STEPS = 300


@pytest.fixture(scope="module")
def model(store) -> ResolvedModel:  # noqa: F811
    return trained(store)


def trained(store: str) -> ResolvedModel:  # noqa: F811
    """The tiny diffusion model (sqrt transformation), trained TRAIN_STEPS Adam steps on
    random windows of the synthetic store."""
    resolved = diffusion(store, transform="sqrt")
    packaged = resolved.packaged
    net = packaged.model
    values = np.nan_to_num(zarr.open_array(store, path="precip", mode="r")[:])
    data = torch.from_numpy(packaged.to_model_space(values).astype(np.float32))
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    t, y, x = WINDOW
    for _ in range(TRAIN_STEPS):
        starts = zip(
            rng.integers(0, data.shape[0] - t, 16),
            rng.integers(0, data.shape[1] - y + 1, 16),
            rng.integers(0, data.shape[2] - x + 1, 16),
            strict=True,
        )
        batch = torch.stack([data[a : a + t, b : b + y, c : c + x] for a, b, c in starts])
        batch = batch[:, None]
        loss, _ = net.loss({"x": batch, "mask": torch.ones_like(batch, dtype=torch.bool)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return resolved


def ask(output, members: int = 8, **fields) -> EnsembleRequest:
    scenario = fields.pop("scenario", {"kind": "extreme"})
    body = {
        "model": "models:/d/1",
        "members": members,
        "seed": 11,
        "output": str(output),
        "batch_size": 64,
        "chunk_members": 256,
        "steps": 6,
        "sampler": "ddim",
        "scenario": scenario,
        **fields,
    }
    return EnsembleRequest.model_validate(body)


def forecast(store: str, **steer) -> dict:  # noqa: F811
    condition = {"data": store, "time": START, "y": 2, "x": 3}
    return {"kind": "forecast", "context": 2, "condition": condition, "guidance": 1.0, **steer}


def window_max(x: np.ndarray, frames: slice = slice(None)) -> np.ndarray:
    return x[:, frames].reshape(len(x), -1).max(axis=1)


# ------------------------------------------------------------------------ the weights


def test_weights_are_p_over_q_of_the_noise_each_member_is_sampled_from(model, tmp_path):
    """A direct density computation (scipy, independent of the proposal's closed form) gives
    the same weights; and the member is the sampler's output for exactly that initial noise,
    the rest of its noise from its own stream."""
    request = ask(tmp_path / "w.zarr", batch_size=1, scenario={"kind": "extreme", "shift": 2.5})
    gen = Generator(request, model)
    assert gen.direction is not None and gen.direction.shape == (SIZE,)
    z, w = gen.proposal.draw(request.seed, np.arange(60))
    a, shift = request.scenario.defensive, 2.5 * gen.direction
    log_p = sps.norm.logpdf(z).sum(axis=1)
    log_shifted = sps.norm.logpdf(z - shift).sum(axis=1)
    log_q = np.logaddexp(np.log(a) + log_p, np.log1p(-a) + log_shifted)
    np.testing.assert_allclose(w, np.exp(log_p - log_q), rtol=1e-9)
    assert (w < 1).any() and (w > 1).any()  # both components were drawn

    tail = ask(tmp_path / "t.zarr", scenario={"kind": "extreme", "proposal": "tail"})
    zt, wt = Generator(tail, model).proposal.draw(tail.seed, np.arange(60))
    radius = sps.chi.ppf(0.99, SIZE)
    beyond = np.linalg.norm(zt, axis=1) > radius
    expected = 1.0 / (a + (1 - a) * beyond / sps.chi.sf(radius, SIZE))
    np.testing.assert_allclose(wt, expected, rtol=1e-6)
    assert beyond.any() and not beyond.all()

    net = model.packaged.model
    for k in (0, 7):
        x, wk = gen.draws(np.array([k]))
        noise = torch.from_numpy(z[k].astype(np.float32)).reshape(1, 1, *WINDOW)
        streams = [torch.Generator().manual_seed(noise_seed(request.seed, k))]
        with torch.no_grad():
            direct = net.sample(1, generators=streams, initial=noise, steps=6, sampler="ddim")
        assert x.tobytes() == model.packaged.to_physical(direct).tobytes()
        assert wk[0] == w[k]


# ------------------------------------------------------------------- unbiased estimates


MILD = {"shift": 1.5, "defensive": 0.5}  # weights at most 2: standard errors that hold


@pytest.mark.parametrize("case", ["ddim", "ancestral", "forecast", "fitted"])
def test_importance_estimates_agree_with_plain_monte_carlo(model, store, tmp_path, case):  # noqa: F811
    """P(window max > L) at two moderate levels (the plain run's 0.8 and 0.95 quantiles)
    from steered draws and their weights agrees with plain draws within their standard
    errors, for both samplers and for a steered forecast (maxima over the generated steps:
    the known ones are the same in every member); the weights average 1 (E_q[p/q] = 1).
    A mild proposal keeps the weights bounded, so that the standard errors themselves are
    reliable at these sample sizes."""
    sampler = "ddim" if case in ("forecast", "fitted") else case
    if case == "forecast":
        plain_scenario = forecast(store, guidance=0.0)
        steered_scenario = forecast(store, guidance=0.0, proposal="shift", **MILD)
    elif case == "fitted":
        plain_scenario = {"kind": "unconditional"}
        steered_scenario = {"kind": "extreme", "proposal": "fitted", "pilot_draws": 300}
        steered_scenario["defensive"] = MILD["defensive"]
    else:
        plain_scenario, steered_scenario = {"kind": "unconditional"}, {"kind": "extreme", **MILD}
    frames = slice(2, None) if case == "forecast" else slice(None)
    plain = Generator(ask(tmp_path / "p.zarr", sampler=sampler, scenario=plain_scenario), model)
    steered = Generator(ask(tmp_path / "s.zarr", sampler=sampler, scenario=steered_scenario), model)
    x_plain, w_plain = plain.draws(np.arange(1000))
    x_steered, w_steered = steered.draws(np.arange(1000))
    assert (w_plain == 1).all() and np.ptp(w_steered) > 0
    assert abs(w_steered.mean() - 1) < 4 * w_steered.std() / np.sqrt(w_steered.size)
    m_plain, m_steered = window_max(x_plain, frames), window_max(x_steered, frames)
    levels = np.quantile(m_plain, [0.8, 0.95])
    by_plain = exceedance_probability(m_plain, levels)
    by_weights = exceedance_probability(m_steered, levels, w_steered)
    gap = np.abs(by_weights.probability - by_plain.probability)
    assert (gap < 4 * np.hypot(by_weights.stderr, by_plain.stderr)).all(), (by_plain, by_weights)
    assert (by_weights.probability > 0).all()


def test_the_shift_raises_the_share_of_extreme_members(model, tmp_path):
    """Steering does something: with the deterministic sampler, the shifted noise makes
    windows above the plain run's 0.97 quantile several times as common."""
    plain = Generator(ask(tmp_path / "p.zarr", scenario={"kind": "unconditional"}), model)
    steered = Generator(ask(tmp_path / "s.zarr"), model)
    m_plain = window_max(plain.draws(np.arange(800))[0])
    m_steered = window_max(steered.draws(np.arange(400))[0])
    level = np.quantile(m_plain, 0.97)
    assert np.mean(m_steered > level) > 3 * np.mean(m_plain > level)


def test_a_rejected_draw_count_enters_the_estimate(model, tmp_path):
    """A steered ensemble that keeps only members reaching a threshold stores fewer members
    than it drew; its exceedance estimate above the threshold divides by every draw, and so
    equals the estimate from all the same draws kept (same seed: the same draws)."""
    probe = Generator(ask(tmp_path / "probe.zarr"), model)
    cut = float(np.quantile(window_max(probe.draws(np.arange(200))[0]), 0.6))
    kept = ask(tmp_path / "kept.zarr", members=30, scenario={"kind": "extreme", "threshold": cut})
    generate(kept, model=model)
    draws = int(read_marker(kept.output)["draws"])
    assert draws > 30
    every = ask(tmp_path / "every.zarr", members=draws)
    generate(every, model=model)
    levels = [cut, cut * 1.2]
    from_kept = ensemble_exceedance(kept.output, levels)
    from_every = ensemble_exceedance(every.output, levels)
    assert from_kept.draws == draws
    np.testing.assert_allclose(from_kept.probability, from_every.probability, rtol=1e-12)
    ens = xr.open_zarr(kept.output, consolidated=False)
    over = window_max(ens.precip.values)[:, None] > np.asarray(levels)[None]
    by_hand = (ens.weight.values[:, None] * over).sum(axis=0) / draws
    np.testing.assert_allclose(from_kept.probability, by_hand, rtol=1e-12)
    assert (by_hand * draws / 30 > by_hand * 1.5).all()  # members alone would overstate it


def test_union_weights_are_p_over_q_of_the_mixture_of_placed_patterns(model, tmp_path):
    """The fitted proposal of a diffusion model: a mixture over places of Gaussians centred
    on its noise pattern there, with their own variances along the pattern, around it in its
    box and beyond. Its weights against a direct density computation (scipy, each component's
    mean built by padding the pattern and its covariance matrix written out, independently of
    the proposal's own placement)."""
    request = ask(tmp_path / "u.zarr", scenario={"kind": "extreme", "proposal": "fitted"})
    gen = Generator(request, model)
    union = gen.fitted
    assert isinstance(union, UnionFit) and union.pilot_draws > 0
    assert union.probabilities.shape == WINDOW and union.pattern.shape == PATTERN
    assert not np.allclose(union.spreads, 1.0)  # the variances were fitted, not left at 1
    z, w = gen.proposal.draw(request.seed, np.arange(12))
    r = np.array(RADIUS)
    padded = np.zeros(tuple(np.array(WINDOW) + 2 * r))
    inner = tuple(slice(h, h + n) for h, n in zip(r, WINDOW, strict=True))
    along, around, beyond = union.spreads
    log_each = []
    for j, place in enumerate(np.ndindex(*WINDOW)):
        big, box = padded.copy(), padded.copy()
        where = tuple(slice(c, c + 2 * h + 1) for c, h in zip(place, r, strict=True))
        big[where] = union.patterns[union.classes[j]]  # its edge class's
        box[where] = 1.0
        centre, inside = big[inner].ravel(), box[inner].ravel() > 0
        unit = centre / np.linalg.norm(centre)
        cov = beyond * np.eye(SIZE)
        cov[np.ix_(inside, inside)] = around * np.eye(int(inside.sum()))
        cov += (along - around) * np.outer(unit, unit)
        log_each.append(sps.multivariate_normal(centre, cov).logpdf(z))
    a = request.scenario.defensive
    log_p = sps.norm.logpdf(z).sum(axis=1)
    log_mix = np.log(
        np.exp(np.stack(log_each, axis=1) - log_p[:, None]) @ union.probabilities.ravel()
    )
    np.testing.assert_allclose(w, 1.0 / (a + (1 - a) * np.exp(log_mix)), rtol=1e-8)


def test_a_union_component_draws_its_centre_and_its_three_variances():
    """Elites whose noise is wider around their maximum's place (variance 1.6 in the
    pattern's box) and a little wider beyond it (1.2) than the prior's, with a blob of 3 at
    the place: the fit learns those variances, and the component then draws noise centred on
    the pattern with the variances it was given (numbers checked part by part on 20,000
    draws)."""
    rng = np.random.default_rng(2)
    window = (3, 7, 7)
    centre = (1, 3, 3)
    place = np.ravel_multi_index(centre, window)
    box = np.zeros(window, dtype=bool)
    box[tuple(slice(max(0, c - h), c + h + 1) for c, h in zip(centre, RADIUS, strict=True))] = True
    scale = np.where(box.ravel(), np.sqrt(1.6), np.sqrt(1.2))
    z = rng.normal(size=(400, box.size)) * scale
    z[:, place] += 3.0
    fit = fit_union(z, np.ones(400), np.full(400, place), window)
    assert fit.spreads[1] == pytest.approx(1.6, abs=0.1)
    assert fit.spreads[2] == pytest.approx(1.2, abs=0.05)
    drawn = np.stack([fit.draw(place, row) for row in rng.normal(size=(20_000, box.size))])
    c = fit.component(place)
    np.testing.assert_allclose(drawn.mean(axis=0), c, atol=0.05)
    unit = c / np.linalg.norm(c)
    s = (drawn - c) @ unit
    rest = (drawn - c) - s[:, None] * unit
    assert s.var() == pytest.approx(fit.spreads[0], rel=0.05)
    assert (rest[:, box.ravel()] ** 2).sum(axis=1).mean() / (box.sum() - 1) == pytest.approx(
        fit.spreads[1], rel=0.03
    )
    assert (rest[:, ~box.ravel()] ** 2).mean() == pytest.approx(fit.spreads[2], rel=0.03)
    with pytest.raises(ValueError, match="variances"):
        UnionFit(fit.pattern, fit.probabilities, fit.patterns, np.array([1.0, np.nan, 1.0]))


def test_a_union_is_fitted_to_the_noise_around_the_maxima():
    """Elite draws with a blob of noise at known places: the fitted pattern is the blob
    (their weighted mean, aligned on the places, with the numbers that are noise alone shrunk
    to 0), so is the pattern of each place's edge class (a class without elites keeps the
    pooled one), and the places of an edge class share its elites' weight; the fit survives
    being pinned as a vector."""
    rng = np.random.default_rng(0)
    window = (2, 6, 6)
    z = rng.normal(size=(40, 72)) * 0.01
    places = np.where(np.arange(40) < 30, np.ravel_multi_index((1, 2, 3), window), 0)
    for row, place in zip(z, places, strict=True):
        t, y, x = np.unravel_index(place, window)
        row.reshape(window)[t, y, x] += 3.0
    weights = np.where(np.arange(40) < 30, 1.0, 3.0)  # the 10 at place 0 weigh as much
    fit = fit_union(z, weights, places, window)
    centre = tuple(RADIUS)
    assert fit.pattern[centre] == pytest.approx(3.0, abs=0.05)
    assert (
        np.abs(
            np.delete(fit.pattern.ravel(), np.ravel_multi_index(centre, fit.pattern.shape))
        ).max()
        < 0.05
    )
    # the elites' weight per edge class, shared by the class's places: (1, 2, 3)'s class is
    # t = 1 with y and x in {2, 3} (4 places); place 0's is the corner (0, 0, 0) alone
    expected = (1 - UNIFORM_SHARE) * 0.5 / 4 + UNIFORM_SHARE / 72
    corner = (1 - UNIFORM_SHARE) * 0.5 + UNIFORM_SHARE / 72
    # the edge class of the 30 elites' place: their blob, the pooled pattern's pull aside
    mine = fit.patterns[fit.classes[places[0]]]
    assert mine[centre] == pytest.approx(3.0, abs=0.05)
    # a class without elites keeps the pooled blob (denoised as a mean of a few elites)
    others = sorted(set(range(len(fit.patterns))) - {fit.classes[places[0]], fit.classes[0]})
    assert len(others) > 0
    blob = np.zeros(PATTERN)
    blob[centre] = 3.0
    np.testing.assert_allclose(
        fit.patterns[others], np.broadcast_to(blob, (len(others), *PATTERN)), atol=0.1
    )
    np.testing.assert_allclose(fit.component(places[0]).reshape(window)[1, 2, 3], mine[centre])
    assert fit.probabilities.ravel()[places[0]] == pytest.approx(expected)
    assert fit.probabilities.ravel()[0] == pytest.approx(corner)
    for twin in [(1, 2, 2), (1, 3, 2), (1, 3, 3)]:
        assert fit.probabilities[twin] == pytest.approx(expected)
    assert fit.probabilities.sum() == pytest.approx(1.0)
    again = UnionFit.from_vector(fit.vector(), window)
    assert again.vector().tobytes() == fit.vector().tobytes()
    with pytest.raises(ValueError, match="numbers for a window"):
        UnionFit.from_vector(fit.vector()[:-1], window)


def test_a_union_fit_drops_the_numbers_that_are_noise_alone():
    """200 elites whose noise is N(0, 1) but for a blob of 3 at their maximum's place: the
    fitted pattern keeps the blob and sets most of the other numbers to exactly 0 (a plain
    mean would leave each at about N(0, 1/200)), so the shift adds no noise of its own."""
    rng = np.random.default_rng(1)
    window = (5, 9, 9)
    place = np.ravel_multi_index((2, 4, 4), window)
    z = rng.normal(size=(200, int(np.prod(window))))
    z[:, place] += 3.0
    fit = fit_union(z, np.ones(200), np.full(200, place), window)
    centre = tuple(RADIUS)
    assert fit.pattern[centre] == pytest.approx(3.0, abs=0.25)
    rest = np.delete(fit.pattern.ravel(), np.ravel_multi_index(centre, PATTERN))
    assert np.mean(rest == 0.0) > 0.7
    assert np.abs(rest).max() < 0.35
    mine = fit.patterns[fit.classes[place]]
    assert mine[centre] == pytest.approx(3.0, abs=0.25)
    assert np.mean(np.delete(mine.ravel(), np.ravel_multi_index(centre, PATTERN)) == 0.0) > 0.7


# --------------------------------------------------------------- stores and regeneration


@pytest.mark.parametrize("kind", ["extreme", "forecast", "extension", "fitted"])
def test_a_steered_store_records_its_proposal_and_any_member_regenerates_alone(
    model,
    store,  # noqa: F811
    tmp_path,
    kind,
):
    if kind == "extreme":
        scenario = {"kind": "extreme", "shift": 2.0}
    elif kind == "fitted":
        scenario = {"kind": "extreme", "proposal": "fitted", "pilot_draws": 200}
    elif kind == "forecast":
        scenario = forecast(store, proposal="shift", shift=2.0)
    else:
        scenario = {**forecast(store, proposal="tail"), "kind": "extension", "length": 7}
    request = ask(tmp_path / "e.zarr", members=10, batch_size=4, chunk_members=4, scenario=scenario)
    generate(request, model=model)
    ens = xr.open_zarr(request.output, consolidated=False)
    assert ens.attrs["proposal"] == scenario.get("proposal", "shift")
    weights = ens.weight.values
    assert np.isfinite(weights).all() and (weights > 0).all() and np.ptp(weights) > 0
    for k in (0, 9):
        x, w = regenerate(request, [k], model=model)
        assert x[0].tobytes() == ens.precip.values[k].tobytes() and w[0] == weights[k]
    if scenario.get("proposal", "shift") == "shift":
        d = ens.direction.values
        assert d.shape == (SIZE,) and np.linalg.norm(d) == pytest.approx(1.0)
        assert "soft maximum" in ens.attrs["direction_source"]
        # a worker given the driver's direction (the fan-out, the endpoint) writes the same
        pinned = Generator(request, model, steering=d)
        x, _ = pinned.draws(np.array([3]))
        assert x[0].tobytes() == ens.precip.values[3].tobytes()
    elif kind == "fitted":
        assert ens.union_pattern.shape == PATTERN and ens.union_place_probability.shape == WINDOW
        # every edge class's pattern and each place's class are recorded too
        fit = Generator(request, model).fitted
        assert isinstance(fit, UnionFit)
        np.testing.assert_array_equal(ens.union_edge_patterns.values, fit.patterns)
        np.testing.assert_array_equal(ens.union_place_class.values.ravel(), fit.classes)
        np.testing.assert_array_equal(ens.union_spread.values, fit.spreads)
        pinned = Generator(request, model, steering=Generator(request, model).steering)
        x, _ = pinned.draws(np.array([4]))
        assert x[0].tobytes() == ens.precip.values[4].tobytes()
        assert ens.attrs["fit_pilot_draws"] == 200 * len(ens.attrs["fit_levels"])
    else:
        assert "direction" not in ens.variables and ens.attrs["tail_quantile"] == 0.99


def test_a_forecast_direction_grows_the_generated_steps_only(model, store):  # noqa: F811
    """The direction of a steered forecast is the gradient over the steps it generates: the
    known steps' noise is replaced by the condition at every step, so it has no component
    there."""
    gen = Generator(ask("unused.zarr", scenario=forecast(store, proposal="shift")), model)
    d = gen.direction.reshape(WINDOW)
    assert np.abs(d[:2]).max() == 0.0 and np.abs(d[2:]).max() > 0


# ------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("scenario", "words"),
    [
        ({"kind": "extreme", "proposal": "prior"}, "an extreme scenario steers its draws"),
        ({"kind": "unconditional", "proposal": "shift"}, "use kind extreme"),
        ({"kind": "extreme", "proposal": "tail", "direction": [1.0]}, "shift proposal"),
        ({"kind": "extreme", "direction": [float("nan")] * 4}, "finite number"),
        ({"kind": "extreme", "shift": float("inf")}, "finite number"),
        ({"kind": "extreme", "direction": [1.0] * 262_145}, "at most 262144"),
    ],
)
def test_bad_proposals_are_refused_by_the_request(scenario, words):
    with pytest.raises(ValidationError, match=words):
        ask("x.zarr", scenario=scenario)


def test_bad_directions_and_noise_are_refused_before_anything_is_written(model, tmp_path):
    out = tmp_path / "bad.zarr"
    short = ask(out, scenario={"kind": "extreme", "direction": [1.0] * 10})
    with pytest.raises(EnsembleError, match=f"must be {SIZE} numbers"):
        generate(short, model=model)
    fitted = ask(out, scenario={**forecast(str(out)), "proposal": "fitted"})
    with pytest.raises(EnsembleError, match="serves unconditional extremes"):
        generate(fitted, model=model)
    with pytest.raises(EnsembleError, match="pinned direction has 3 numbers"):
        Generator(ask(out), model, steering=np.ones(3))
    with pytest.raises(EnsembleError, match="pinned direction"):
        Generator(ask(out), model, steering=np.full(SIZE, np.nan))
    assert not out.exists()
    with pytest.raises(ProposalError, match="NaN or infinite"):
        GaussianProposal(ask(out).scenario, 3, np.array([1.0, np.inf, 0.0]))
    with pytest.raises(ProposalError, match="direction of 3 numbers"):
        GaussianProposal(ask(out).scenario, 3, np.ones(4))
    net = model.packaged.model
    shape = (2, 1, *WINDOW)
    schedule = net.schedule
    with pytest.raises(ValueError, match="initial noise is"):
        sample(net.net, shape, schedule, 2, initial=torch.zeros(1, 1, *WINDOW))
    with pytest.raises(ValueError, match="NaN or infinite"):
        sample(net.net, shape, schedule, 2, initial=torch.full(shape, float("nan")))
