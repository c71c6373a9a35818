"""Quantized reconstruction losses, regularisers and metrics (cloudburst.models.losses).

The vectorised objectives are checked against slow, literal implementations written with Python
loops over samples, pixels and bins, plus the defining properties of each objective.
"""

from __future__ import annotations

import math

import pytest
import torch

from cloudburst.models import losses as L

TOL = 1e-6


# ------------------------------------------------------------------------------------------------
# Literal references (Python loops over samples, pixels and bins)
# ------------------------------------------------------------------------------------------------


def ref_bin(v: float, edges: list[float]) -> int:
    """Bin j with edges[j] <= v < edges[j + 1]; last bin closed; outside values clamped."""
    nb = len(edges) - 1
    if v < edges[0]:
        return 0
    if v >= edges[nb]:
        return nb - 1
    for j in range(nb):
        if edges[j] <= v < edges[j + 1]:
            return j
    raise AssertionError("unreachable")


def ref_losses(x, x_hat, mask, bins, lam=100.0, beta=0.2, gamma=1.0):
    """dict name -> list of per-sample values, straight from the formulas of the quantized-loss
    study (Szwarcman et al., Quantizing reconstruction losses for improving weather data
    synthesis)."""
    edges = L.histogram_edges(bins, dtype=torch.float64).tolist()
    n = x.shape[0]
    xs = x.reshape(n, -1).tolist()
    hs = x_hat.reshape(n, -1).tolist()
    ms = mask.reshape(n, -1).tolist() if mask is not None else [[True] * len(r) for r in xs]
    out = {k: [] for k in L.RECONSTRUCTION_LOSSES}
    for s in range(n):
        pix = [(xs[s][i], hs[s][i]) for i in range(len(xs[s])) if ms[s][i]]
        if not pix:
            for k in out:
                out[k].append(0.0)
            continue
        members = [[] for _ in range(bins)]  # Omega_j: squared errors of pixels in bin j
        for xv, hv in pix:
            members[ref_bin(xv, edges)].append((xv - hv) ** 2)
        peak = max(len(m) for m in members)
        w = [1.0 - len(m) / peak for m in members]
        rec = sum((xv - hv) ** 2 for xv, hv in pix) / len(pix)
        qt = 0.0
        wqt = 0.0
        for j in range(bins):
            if members[j]:
                mse_j = sum(members[j]) / len(members[j])
                qt += mse_j
                wqt += w[j] * mse_j
        fmse = 0.0
        fhist = 0.0
        for xv, hv in pix:
            e = abs(xv - hv)
            sig = 1.0 / (1.0 + math.exp(-beta * e))
            fmse += sig**gamma * e * e
            fhist += w[ref_bin(xv, edges)] ** gamma * e * e
        out["rec"].append(rec)
        out["qt"].append(qt)
        out["wqt"].append(wqt)
        out["rec+qt"].append(rec + qt)
        out["rec+wqt"].append(rec + wqt)
        out["focal_mse"].append(lam * fmse / len(pix))
        out["focal_hist"].append(lam * fhist / len(pix))
    return out


def ref_quantized_mse(x, x_hat, edges, mask):
    e = edges.tolist()
    nb = len(e) - 1
    sums = [0.0] * nb
    counts = [0] * nb
    xs, hs = x.reshape(-1).tolist(), x_hat.reshape(-1).tolist()
    ms = mask.reshape(-1).tolist() if mask is not None else [True] * len(xs)
    for xv, hv, ok in zip(xs, hs, ms, strict=True):
        if ok:
            j = ref_bin(xv, e)
            sums[j] += (xv - hv) ** 2
            counts[j] += 1
    mse = [sums[j] / counts[j] if counts[j] else float("nan") for j in range(nb)]
    return mse, counts


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def rainy_batch(bins: int, seed: int = 0, shape=(5, 1, 3, 6, 7)):
    """Zero-inflated, heavy-tailed [0, 1] data with an all-dry sample, exact bin edges, 1.0, a
    mask with NaN-filled invalid pixels and one fully masked sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) ** 3
    x = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5, 0.0, x)
    edges = L.histogram_edges(bins, dtype=torch.float64)
    flat = x.view(shape[0], -1)
    flat[1, : bins + 1] = edges[: min(bins + 1, flat.shape[1])]  # every edge, incl. 0 and 1.0
    flat[2, :5] = 1.0
    flat[0] = 0.0  # all dry: a single non-empty bin
    x_hat = (x + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    mask = torch.rand(shape, generator=g) > 0.2
    mask[4] = False  # nothing valid in this sample
    mask[0] = True
    x = torch.where(mask, x, float("nan"))  # invalid pixels carry NaN, as the loader fills them
    return x, x_hat, mask


# ------------------------------------------------------------------------------------------------
# Binning and histograms
# ------------------------------------------------------------------------------------------------


def test_bin_index_edges_top_and_clamping():
    bins = 8  # dyadic edges: k/8 exactly representable
    k = torch.arange(bins + 1, dtype=torch.float32)
    idx = L.bin_index(k / bins, bins)
    assert idx.dtype == torch.int64
    assert idx.tolist() == list(range(bins)) + [bins - 1]  # value at edge opens bin; 1.0 -> last
    assert L.bin_index(torch.tensor([-0.3, 1.7]), bins).tolist() == [0, bins - 1]
    just_below = torch.nextafter(k[1:] / bins, torch.zeros(()))
    assert L.bin_index(just_below, bins).tolist() == list(range(bins))
    # other range, values at every edge of a non-dyadic histogram
    edges = L.histogram_edges(100, 2.0, 5.0, dtype=torch.float32)
    assert L.bin_index(edges, 100, 2.0, 5.0).tolist() == list(range(100)) + [99]


def test_bin_index_matches_reference_on_random_values():
    x = torch.rand(500, dtype=torch.float64) * 1.2 - 0.1
    edges = L.histogram_edges(37, dtype=torch.float64).tolist()
    assert L.bin_index(x, 37).tolist() == [ref_bin(v, edges) for v in x.tolist()]


def test_sample_histogram_counts_and_normalisation():
    x, _, mask = rainy_batch(10)
    counts, h = L.sample_histogram(x, 10, mask)
    assert counts.shape == h.shape == (5, 10)
    edges = L.histogram_edges(10, dtype=torch.float64).tolist()
    for s in range(5):
        vals = [
            v
            for v, ok in zip(x[s].flatten().tolist(), mask[s].flatten().tolist(), strict=True)
            if ok
        ]
        ref = [0] * 10
        for v in vals:
            ref[ref_bin(v, edges)] += 1
        assert counts[s].tolist() == ref
        if vals:
            assert h[s].max().item() == 1.0
            torch.testing.assert_close(h[s], counts[s].double() / max(ref))
        else:
            assert h[s].abs().sum().item() == 0.0
    assert counts[0].count_nonzero().item() == 1  # all-dry sample: one non-empty bin
    assert not torch.isnan(h).any()


def test_sample_histogram_without_mask_counts_every_pixel():
    x = torch.rand(3, 1, 2, 4, 4)
    counts, h = L.sample_histogram(x, 5)
    assert counts.sum(dim=1).tolist() == [32, 32, 32]
    assert ((h >= 0) & (h <= 1)).all()


# ------------------------------------------------------------------------------------------------
# The seven objectives against the literal reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [2, 8, 10, 100])
@pytest.mark.parametrize("use_mask", [True, False])
def test_objectives_match_literal_reference(bins, use_mask):
    x, x_hat, mask = rainy_batch(bins, seed=bins)
    if not use_mask:
        x = torch.nan_to_num(x, nan=0.3)
        mask = None
    ref = ref_losses(x, x_hat, mask, bins)
    for name in sorted(L.RECONSTRUCTION_LOSSES):
        got = L.reconstruction_loss(name, x, x_hat, bins=bins, mask=mask)
        assert got.shape == (x.shape[0],)
        torch.testing.assert_close(got, torch.tensor(ref[name], dtype=got.dtype), rtol=0, atol=TOL)
        mean = L.reconstruction_loss(name, x, x_hat, bins=bins, mask=mask, reduction="mean")
        assert mean.shape == ()
        assert abs(mean.item() - sum(ref[name]) / len(ref[name])) < TOL


def test_non_default_focal_parameters_match_reference():
    x, x_hat, mask = rainy_batch(20, seed=3)
    ref = ref_losses(x, x_hat, mask, 20, lam=3.0, beta=5.0, gamma=2.5)
    for name in ("focal_mse", "focal_hist"):
        got = L.reconstruction_loss(
            name, x, x_hat, bins=20, lam=3.0, beta=5.0, gamma=2.5, mask=mask
        )
        torch.testing.assert_close(got, torch.tensor(ref[name], dtype=got.dtype), rtol=0, atol=TOL)


def test_public_functions_agree_with_dispatch():
    x, x_hat, mask = rainy_batch(16, seed=7)
    direct = {
        "rec": L.l_rec(x, x_hat, mask),
        "qt": L.l_qt(x, x_hat, 16, mask),
        "wqt": L.l_wqt(x, x_hat, 16, mask),
        "rec+qt": L.l_rec_qt(x, x_hat, 16, mask),
        "rec+wqt": L.l_rec_wqt(x, x_hat, 16, mask),
        "focal_mse": L.focal_mse(x, x_hat, mask=mask),
        "focal_hist": L.focal_hist(x, x_hat, 16, mask=mask),
    }
    assert set(direct) == L.RECONSTRUCTION_LOSSES
    for name, value in direct.items():
        torch.testing.assert_close(value, L.reconstruction_loss(name, x, x_hat, bins=16, mask=mask))
    torch.testing.assert_close(direct["rec+qt"], direct["rec"] + direct["qt"])
    torch.testing.assert_close(direct["rec+wqt"], direct["rec"] + direct["wqt"])


def test_float32_agrees_with_float64():
    # (values exactly on an edge may change bin with the precision, so none here)
    g = torch.Generator().manual_seed(11)
    x = torch.rand(4, 1, 3, 8, 8, generator=g, dtype=torch.float64) ** 3
    x_hat = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    mask = torch.rand(x.shape, generator=g) > 0.1
    for name in sorted(L.RECONSTRUCTION_LOSSES):
        a = L.reconstruction_loss(name, x, x_hat, mask=mask)
        b = L.reconstruction_loss(name, x.float(), x_hat.float(), mask=mask)
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.double(), a, rtol=1e-5, atol=1e-5)


def test_bins_come_from_the_input_not_the_reconstruction():
    x, x_hat, _ = rainy_batch(10, seed=5)
    x = torch.nan_to_num(x, nan=0.0)
    forward = L.l_qt(x, x_hat, 10)
    swapped = L.l_qt(x_hat, x, 10)
    assert not torch.allclose(forward, swapped)
    torch.testing.assert_close(
        swapped, torch.tensor(ref_losses(x_hat, x, None, 10)["qt"], dtype=torch.float64)
    )


# ------------------------------------------------------------------------------------------------
# Defining properties
# ------------------------------------------------------------------------------------------------


def _two_bin_sample(n_big: int = 999, bins: int = 10):
    """One sample: n_big dry pixels (bin 0) and a single heavy pixel (top bin)."""
    x = torch.zeros(1, 1, 1, 1, n_big + 1, dtype=torch.float64)
    x[..., -1] = 0.95
    return x


def test_every_non_empty_bin_weighs_the_same_in_l_qt():
    x = _two_bin_sample()
    err = 0.01
    base = x + err
    base[..., -1] = x[..., -1] - err
    single = base.clone()
    single[..., -1] = x[..., -1] - 2 * err  # double the error of the lone heavy pixel
    everywhere_big = base.clone()
    everywhere_big[..., :-1] = x[..., :-1] + 2 * err  # double it on all 999 dry pixels
    d_single = L.l_qt(x, single, 10) - L.l_qt(x, base, 10)
    d_big = L.l_qt(x, everywhere_big, 10) - L.l_qt(x, base, 10)
    torch.testing.assert_close(d_single, d_big, rtol=1e-9, atol=0)
    assert d_single.item() > 0
    # the plain MSE sees the lone pixel 999 times less: what the quantization is for
    r_single = L.l_rec(x, single) - L.l_rec(x, base)
    r_big = L.l_rec(x, everywhere_big) - L.l_rec(x, base)
    torch.testing.assert_close(r_big / r_single, torch.tensor([999.0], dtype=torch.float64))


def test_wqt_weights_are_one_minus_h_and_dominant_bin_is_free():
    bins = 4
    # counts per bin: 6, 3, 0, 1 -> h = 1, 1/2, 0, 1/6 -> w = 0, 1/2, 1, 5/6
    vals = [0.1] * 6 + [0.3] * 3 + [0.9]
    x = torch.tensor(vals, dtype=torch.float64).view(1, 1, 1, 1, -1)
    counts, h = L.sample_histogram(x, bins)
    assert counts.tolist() == [[6, 3, 0, 1]]
    torch.testing.assert_close(1 - h, 1 - counts.double() / 6)
    for j, lo_hi in enumerate([(0, 6), (6, 9), None, (9, 10)]):
        if lo_hi is None:
            continue
        x_hat = x.clone()
        x_hat[..., lo_hi[0] : lo_hi[1]] += 0.05  # error only inside bin j
        mse_j = 0.05**2
        assert abs(L.l_qt(x, x_hat, bins).item() - mse_j) < 1e-12
        w_j = 1 - h[0, j].item()
        assert abs(L.l_wqt(x, x_hat, bins).item() - w_j * mse_j) < 1e-12
    # error confined to the most populated bin: zero weighted loss, zero gradient
    x_hat = x.clone()
    x_hat[..., :6] += 0.2
    x_hat.requires_grad_(True)
    loss = L.l_wqt(x, x_hat, bins).sum()
    assert loss.item() == 0.0
    assert L.l_qt(x, x_hat, bins).item() > 0
    loss.backward()
    assert x_hat.grad.abs().sum().item() == 0.0
    # focal_hist uses the same phi = w of the pixel's bin
    assert L.focal_hist(x, x_hat.detach(), bins).item() == 0.0


@pytest.mark.parametrize("name", sorted(L.RECONSTRUCTION_LOSSES))
def test_gradients_flow_and_are_finite(name):
    x, x_hat, mask = rainy_batch(100, seed=13)
    x_hat = torch.where(mask, x_hat, float("nan")).requires_grad_(True)  # NaN also in x_hat
    loss = L.reconstruction_loss(name, x, x_hat, mask=mask, reduction="mean")
    assert torch.isfinite(loss)
    loss.backward()
    g = x_hat.grad
    assert torch.isfinite(g).all()
    assert (g[~mask] == 0).all()  # invalid pixels never pull on the decoder
    assert g[mask].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(L.RECONSTRUCTION_LOSSES))
def test_all_zero_inputs_give_zero_loss_and_finite_gradients(name):
    x = torch.zeros(3, 1, 4, 8, 8)
    x_hat = torch.zeros_like(x, requires_grad=True)
    loss = L.reconstruction_loss(name, x, x_hat)
    assert torch.equal(loss, torch.zeros(3))
    loss.sum().backward()
    assert torch.isfinite(x_hat.grad).all()
    # and a wrong (rainy) reconstruction of a dry day is penalised except where w vanishes
    wet = L.reconstruction_loss(name, x, torch.full_like(x, 0.5))
    assert torch.isfinite(wet).all()
    if name in {"wqt", "focal_hist"}:
        assert (wet == 0).all()  # single bin => h = 1 => w = 0 (the study's definition)
    else:
        assert (wet > 0).all()


def test_fully_masked_sample_is_zero_not_nan():
    x = torch.rand(2, 1, 2, 3, 3)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1] = False
    for name in sorted(L.RECONSTRUCTION_LOSSES):
        out = L.reconstruction_loss(name, x, torch.rand_like(x), mask=mask, bins=5)
        assert out[1].item() == 0.0 and out[0].item() > 0


def test_broadcast_mask_equals_full_mask():
    x = torch.rand(3, 1, 2, 4, 5)
    x_hat = torch.rand_like(x)
    land = torch.rand(1, 1, 1, 4, 5) > 0.3
    for name in sorted(L.RECONSTRUCTION_LOSSES):
        a = L.reconstruction_loss(name, x, x_hat, mask=land, bins=7)
        b = L.reconstruction_loss(name, x, x_hat, mask=land.expand_as(x).clone(), bins=7)
        torch.testing.assert_close(a, b)


def test_errors_for_unknown_loss_bins_and_shapes():
    x = torch.rand(2, 1, 2, 3, 3)
    with pytest.raises(ValueError, match="allowed: .*focal_hist.*rec\\+wqt"):
        L.reconstruction_loss("l1", x, x)
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match="bins"):
            L.reconstruction_loss("qt", x, x, bins=bad)
        with pytest.raises(ValueError, match="bins"):
            L.reconstruction_loss("rec", x, x, bins=bad)
        with pytest.raises(ValueError, match="bins"):
            L.bin_index(x, bad)
        with pytest.raises(ValueError, match="bins"):
            L.sample_histogram(x, bad)
    with pytest.raises(ValueError, match="shape"):
        L.l_rec(x, x[:, :, :1])
    with pytest.raises(ValueError, match="reduction"):
        L.l_rec(x, x, reduction="avg")
    with pytest.raises(TypeError, match="bool"):
        L.l_qt(x, x, 4, mask=torch.ones_like(x))


# ------------------------------------------------------------------------------------------------
# Regularisers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_mmd_small_for_prior_samples_large_for_shifted(kernel):
    g = torch.Generator().manual_seed(0)
    d = 8
    prior = torch.randn(256, d, generator=g)
    same = torch.randn(256, d, generator=g)
    shifted = torch.randn(256, d, generator=g) + 1.5
    scaled = torch.randn(256, d, generator=g) * 3.0
    m_same = L.mmd(same, prior, kernel=kernel)
    assert m_same.shape == ()
    assert m_same.item() >= 0
    assert L.mmd(shifted, prior, kernel=kernel) > 20 * m_same
    assert L.mmd(scaled, prior, kernel=kernel) > 5 * m_same
    assert L.mmd(prior, prior, kernel=kernel).abs().item() < 1e-6  # biased V-statistic
    # unbiased: fluctuates around 0 for matching distributions, stays large for shifted
    u_same = L.mmd(same, prior, kernel=kernel, unbiased=True)
    u_shift = L.mmd(shifted, prior, kernel=kernel, unbiased=True)
    assert abs(u_same.item()) < u_shift.item() / 20
    assert u_same < m_same  # the diagonal terms are what bias the V-statistic upwards


def test_mmd_default_draws_prior_and_has_gradient():
    z = (torch.randn(64, 5) + 2.0).requires_grad_(True)
    loss = L.mmd(z)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kernel"):
        L.mmd(z, kernel="laplace")
    with pytest.raises(ValueError):
        L.mmd(z, torch.randn(64, 4))


def test_mmd_rbf_matches_literal_infovae_kernel():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def k(u, v):  # InfoVAE: exp(-mean_d (u - v)^2 / d)
        return math.exp(-sum((p - q) ** 2 for p, q in zip(u, v, strict=True)) / 3 / 3)

    au, bu = a.tolist(), b.tolist()
    kxx = sum(k(p, q) for p in au for q in au)
    kyy = sum(k(p, q) for p in bu for q in bu)
    kxy = sum(k(p, q) for p in au for q in bu)
    biased = kxx / 36 + kyy / 25 - 2 * kxy / 30
    unbiased = (kxx - 6) / 30 + (kyy - 5) / 20 - 2 * kxy / 30
    assert abs(L.mmd_rbf(a, b).item() - biased) < 1e-12
    assert abs(L.mmd_rbf(a, b, unbiased=True).item() - unbiased) < 1e-12


def test_kl_normal():
    mu = torch.zeros(4, 7)
    logvar = torch.zeros(4, 7)
    assert torch.equal(L.kl_normal(mu, logvar), torch.zeros(4))
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(4, 7, generator=g)
    logvar = torch.randn(4, 7, generator=g)
    kl = L.kl_normal(mu, logvar)
    assert kl.shape == (4,) and (kl > 0).all()
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()),
        torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu)),
    ).sum(dim=1)
    torch.testing.assert_close(kl, ref)
    # only the variance off: still positive
    assert (L.kl_normal(torch.zeros(2, 3), torch.full((2, 3), -1.0)) > 0).all()


def test_active_units_counts_the_informative_dims():
    g = torch.Generator().manual_seed(3)
    n = 400
    mu = torch.empty(n, 6)
    mu[:, 0] = torch.randn(n, generator=g)  # active
    mu[:, 1] = 0.3 + 0.01 * torch.randn(n, generator=g)  # collapsed (var 1e-4)
    mu[:, 2] = 0.5 * torch.randn(n, generator=g)  # active (var 0.25)
    mu[:, 3] = 0.0  # collapsed
    mu[:, 4] = 0.05 * torch.randn(n, generator=g)  # var 2.5e-3: below 0.01
    mu[:, 5] = 0.2 * torch.randn(n, generator=g)  # var 0.04: active
    assert L.active_units(mu) == 3
    assert L.active_units(mu, threshold=1e-3) == 4
    assert L.active_units(mu, threshold=0.1) == 2
    with pytest.raises(ValueError):
        L.active_units(mu[:1])


# ------------------------------------------------------------------------------------------------
# Quantized MSE metric
# ------------------------------------------------------------------------------------------------


def test_quantized_mse_matches_reference_with_nan_for_empty_bins():
    x, x_hat, mask = rainy_batch(10, seed=21)
    edges = L.histogram_edges(12, 0.0, 0.8)  # fixed "training" edges: 1.0 is outside, clamps
    mse, counts = L.quantized_mse(x, x_hat, edges, mask)
    ref_mse, ref_counts = ref_quantized_mse(x, x_hat, edges, mask)
    assert counts.tolist() == ref_counts
    assert counts.sum().item() == int(mask.sum())
    for got, want in zip(mse.tolist(), ref_mse, strict=True):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert abs(got - want) < TOL
    # a bin nobody falls into
    sparse = torch.tensor([[0.05, 0.05, 0.95]], dtype=torch.float64)
    m, c = L.quantized_mse(sparse, sparse + 0.1, L.histogram_edges(4))
    assert c.tolist() == [2, 0, 0, 1]
    assert math.isnan(m[1].item()) and math.isnan(m[2].item())
    assert abs(m[0].item() - 0.01) < 1e-12 and abs(m[3].item() - 0.01) < 1e-12


def test_quantized_mse_physical_nonuniform_edges():
    mm = torch.tensor([[0.0, 0.0, 0.5, 3.0, 12.0, 250.0]])
    edges = torch.tensor([0.0, 1.0, 10.0, 100.0])
    mse, counts = L.quantized_mse(mm, mm + 2.0, edges)
    assert counts.tolist() == [3, 1, 2]  # 250 mm/day above the last edge stays in the top bin
    torch.testing.assert_close(mse, torch.full((3,), 4.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="increasing"):
        L.quantized_mse(mm, mm, torch.tensor([0.0, 2.0, 1.0]))


def test_accumulator_over_batches_equals_one_shot():
    x, x_hat, mask = rainy_batch(10, seed=31, shape=(9, 1, 3, 5, 5))
    edges = L.histogram_edges(15)
    acc = L.QuantizedMSE(edges)
    for lo, hi in [(0, 2), (2, 3), (3, 7), (7, 9)]:
        acc.update(x[lo:hi], x_hat[lo:hi], mask[lo:hi])
    one_mse, one_counts = L.quantized_mse(x, x_hat, edges, mask)
    mse, counts = acc.compute()
    assert torch.equal(counts, one_counts)
    torch.testing.assert_close(mse, one_mse, equal_nan=True, rtol=0, atol=1e-12)
    # merging accumulators from two workers gives the same
    a, b = L.QuantizedMSE(edges), L.QuantizedMSE(edges)
    a.update(x[:4], x_hat[:4], mask[:4])
    b.update(x[4:], x_hat[4:], mask[4:])
    a.merge(b)
    torch.testing.assert_close(a.compute()[0], one_mse, equal_nan=True, rtol=0, atol=1e-12)
    acc.reset()
    assert acc.counts.sum().item() == 0 and torch.isnan(acc.compute()[0]).all()
    with pytest.raises(ValueError, match="edges"):
        a.merge(L.QuantizedMSE(L.histogram_edges(3)))
