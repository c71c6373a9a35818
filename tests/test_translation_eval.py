"""Scores, baselines, table and figure of the near-infrared -> visible translation evaluation."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from cloudburst.evaluation import translation as tr
from cloudburst.evaluation.translation import (
    ConvRegression,
    LinearMapBaseline,
    image_scores,
    translation_figure,
    translation_table,
)


def frames(n=3, y=24, x=32, seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random((n, y, x)), sigma=(0, 1.5, 1.5))


# --------------------------------------------------------------------------------- scores


def test_identical_images_ssim_one_psnr_inf():
    a = frames()
    s = image_scores(a, a.copy(), data_range=1.0)
    assert s["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert s["psnr"] == math.inf
    assert s["mae"] == 0.0 and s["mse"] == 0.0
    assert s["pixels"] == a.size and s["frames"] == 3


def test_scores_match_hand_formulas():
    target = np.array([[[0.0, 0.5, 1.0, 0.25, 0.75, 0.5, 0.1, 0.9]] * 8], dtype=np.float64)
    pred = target + np.linspace(-0.2, 0.2, target.size).reshape(target.shape)
    s = image_scores(pred, target, data_range=2.0)
    diff = pred - target
    assert s["mae"] == pytest.approx(np.abs(diff).mean(), rel=1e-12)
    mse = (diff**2).mean()
    assert s["psnr"] == pytest.approx(10 * np.log10(2.0**2 / mse), rel=1e-12)
    # with no mask, SSIM is scikit-image's own mean over the frame
    ref = structural_similarity(target[0], pred[0], win_size=7, data_range=2.0)
    assert s["ssim"] == pytest.approx(ref, rel=1e-12)


def test_ssim_per_frame_then_averaged():
    t = frames(2)
    p = t + np.stack([0.01 * frames(1, seed=3)[0], 0.3 * frames(1, seed=4)[0]])
    s = image_scores(p, t, data_range=1.0)
    per = [structural_similarity(t[k], p[k], data_range=1.0) for k in range(2)]
    assert s["ssim"] == pytest.approx(np.mean(per), rel=1e-12)
    # leading axes are folded: the models' (batch, 1, time, y, x) layout scores the same
    s5 = image_scores(
        torch.as_tensor(p).reshape(1, 1, 2, 24, 32), t.reshape(1, 1, 2, 24, 32), data_range=1.0
    )
    assert s5 == pytest.approx(s)


def test_mask_excludes_pixels():
    t = frames()
    p = t + 0.05 * frames(seed=1)
    mask = np.ones(t.shape[-2:], dtype=bool)
    mask[5:12, 10:20] = False
    base = image_scores(p, t, data_range=1.0, mask=mask)
    corrupted = p.copy()
    corrupted[:, 5:12, 10:20] = 50.0
    corrupted[0, 6, 11] = np.nan
    t2 = t.copy()
    t2[:, 7:9, 12:14] = -3.0
    again = image_scores(corrupted, t2, data_range=1.0, mask=mask)
    assert again == base
    assert base["pixels"] == 3 * (mask.sum())
    # the unmasked corruption does change the scores
    assert image_scores(corrupted, t2, data_range=1.0)["mae"] > 10 * base["mae"]


def test_non_finite_pixels_are_invalid():
    t = frames()
    p = t + 0.05
    p_nan = p.copy()
    p_nan[1, 3, 4] = np.nan
    mask = np.ones(t.shape, dtype=bool)
    mask[1, 3, 4] = False
    assert image_scores(p_nan, t, data_range=1.0) == image_scores(p, t, data_range=1.0, mask=mask)


def test_bad_inputs_refused():
    a = frames()
    with pytest.raises(ValueError, match="differ in shape"):
        image_scores(a, a[:, :-1], data_range=1.0)
    for bad in (math.nan, math.inf, 0.0, -1.0, "x"):
        with pytest.raises(ValueError, match="data_range must be a finite number > 0"):
            image_scores(a, a, data_range=bad)
    with pytest.raises(ValueError, match="mask"):
        image_scores(a, a, data_range=1.0, mask=np.ones((5, 5), dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        image_scores(a, a, data_range=1.0, mask=np.ones(a.shape))
    with pytest.raises(ValueError, match="no valid pixel"):
        image_scores(a, a, data_range=1.0, mask=np.zeros(a.shape, dtype=bool))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        image_scores(a[:, :5, :5], a[:, :5, :5], data_range=1.0)


# ------------------------------------------------------------------------------ baselines


def test_linear_map_recovers_planted_gain_and_offset():
    x = frames(4)
    a, b = 1.7, -0.35
    base = LinearMapBaseline().fit(x, a * x + b)
    assert base.gain == pytest.approx(a, rel=1e-12)
    assert base.offset == pytest.approx(b, abs=1e-12)
    np.testing.assert_allclose(base.predict(x[:1]), a * x[:1] + b, atol=1e-12)
    # masked-out (and non-finite) pixels do not enter the fit
    y = a * x + b
    y[:, :4] = 100.0
    y[0, 10, 10] = np.nan
    mask = np.ones(x.shape[-2:], dtype=bool)
    mask[:4] = False
    masked = LinearMapBaseline().fit(x, y, mask=mask)
    assert masked.coef == pytest.approx((a, b), rel=1e-12, abs=1e-12)


def test_linear_map_sees_training_frames_only():
    x, rng = frames(6), np.random.default_rng(5)
    y = 2.0 * x + 0.1 + 0.05 * rng.standard_normal(x.shape)
    train = slice(0, 4)
    first = LinearMapBaseline().fit(x[train], y[train]).coef
    y2 = y.copy()
    y2[4:] = rng.random(y2[4:].shape) * 100  # changing the test frames changes nothing
    assert LinearMapBaseline().fit(x[train], y2[train]).coef == first
    assert LinearMapBaseline().fit(x, y2).coef != first
    with pytest.raises(RuntimeError, match="not fitted"):
        LinearMapBaseline().predict(x)
    with pytest.raises(ValueError, match="differ in shape"):
        LinearMapBaseline().fit(x, y[:, :-1])


def toy_mapping(n=64, size=16, seed=0):
    """A learnable non-linear map: the target is a blurred, gain-shifted, squared input."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size)).astype(np.float32)
    y = 0.8 * ndimage.uniform_filter(x, size=(1, 3, 3), mode="nearest") ** 2 + 0.1
    return x, y.astype(np.float32)


@pytest.fixture(autouse=False)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_conv_regression_beats_linear_map_and_is_deterministic(one_thread):
    x, y = toy_mapping()
    xt, yt = toy_mapping(n=4, size=24, seed=1)
    linear = LinearMapBaseline().fit(x, y)
    lin_mse = image_scores(linear.predict(xt), yt, data_range=1.0)["mse"]
    fit = dict(steps=150, lr=3e-3, seed=7, batch_size=8, device="cpu")
    net = ConvRegression(width=8).fit(x, y, **fit)
    pred = net.predict(xt)
    assert pred.shape == xt.shape and pred.dtype == np.float32  # whole frames, any size
    net_mse = image_scores(pred, yt, data_range=1.0)["mse"]
    assert net_mse < 0.25 * lin_mse
    assert net.losses[-1] < net.losses[0]
    twin = ConvRegression(width=8).fit(x, y, **fit)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    other = ConvRegression(width=8).fit(x, y, **{**fit, "seed": 8})
    assert not torch.equal(next(net.parameters()), next(other.parameters()))
    # (batch, 1, time, y, x) keeps its layout
    five = net.predict(torch.as_tensor(xt).reshape(2, 1, 2, 24, 24))
    np.testing.assert_allclose(five.reshape(xt.shape), pred, atol=1e-6)


@pytest.mark.parametrize("budget", [500, 5000, 20000])
def test_conv_regression_parameter_budget(budget):
    net = ConvRegression.for_parameter_count(budget)
    assert net.parameter_count == ConvRegression.count(net.width, net.depth, net.kernel)
    assert abs(net.parameter_count - budget) <= 0.2 * budget
    with pytest.raises(ValueError, match="below the smallest network"):
        ConvRegression.for_parameter_count(10)


def test_conv_regression_refuses_bad_patches():
    x, y = toy_mapping(n=4)
    with pytest.raises(ValueError, match="differ in shape"):
        ConvRegression(width=2).fit(x, y[:, :-1], steps=1)
    x[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="must be finite"):
        ConvRegression(width=2).fit(x, y, steps=1)


# ------------------------------------------------------------------------ table and figure


def test_translation_table():
    rows = {
        "linear map": {"ssim": 0.5, "psnr": 20.123, "mae": 0.0812, "parameters": 2},
        "VQ-VAE": {"ssim": 0.71234, "psnr": math.inf, "mae": 0.01, "codebook_usage": 0.42},
    }
    text = translation_table(rows)
    lines = text.strip().splitlines()
    assert lines[0] == "| method | SSIM | PSNR (dB) | MAE | parameters | codebook usage |"
    assert lines[2] == "| linear map | 0.5000 | 20.12 | 0.0812 | 2 | - |"
    assert lines[3] == "| VQ-VAE | 0.7123 | inf | 0.0100 | - | 42.0 % |"
    plain = translation_table([{"method": "a", "ssim": 1, "psnr": 2, "mae": 3}])
    assert plain.splitlines()[0] == "| method | SSIM | PSNR (dB) | MAE |"
    with pytest.raises(ValueError, match="missing scores"):
        translation_table({"a": {"ssim": 1.0}})


def test_translation_figure_png_size(tmp_path):
    t = frames(5, y=20, x=30)
    outputs = {"linear map": t + 0.1, "conv": t - 0.1}
    path = translation_figure(t * 0.5, t, outputs, tmp_path / "fig" / "t.png", frames=2, dpi=50)
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    w_in = tr.PANEL * 30 / 20 * 4 + tr.COLORBAR
    h_in = tr.PANEL * 2 + tr.TITLE
    assert (width, height) == (round(w_in * 50), round(h_in * 50))
    with pytest.raises(ValueError, match="differ in shape"):
        translation_figure(t, t, {"bad": t[:, :-1]}, tmp_path / "bad.png")
