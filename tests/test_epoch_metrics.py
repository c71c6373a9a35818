"""Per-epoch metrics in physical units (``val_``): the VAE's reconstruction scores and the
diffusion model's probe samples, on tiny real networks, against values computed here with
numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cloudburst.data.transforms import Scale
from cloudburst.models import registry
from cloudburst.models.registry import EpochProbe
from cloudburst.models.scoring import psd_error, reconstruction_scores, relative_error

WINDOW = (4, 8, 8)
HIGH = 40.0  # physical value of model-space 1 (mm/day)
EDGES = np.linspace(0.0, HIGH, 11)
SAMPLE_KEYS = {
    "val_q0.99_error",
    "val_q0.999_error",
    "val_mean_bias",
    "val_wet_fraction",
    "val_psd_spatial_error",
}


def tiny(name: str, **overrides: object) -> torch.nn.Module:
    entry = registry.family(name)
    cfg = entry.config.model_validate({"kind": name, **entry.small, **overrides})
    torch.manual_seed(0)
    return registry.build(name, cfg, WINDOW)


def windows(n: int, seed: int, high: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-space windows uniform in [0, high] (n, 1, *WINDOW), and a mask with holes."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(0.0, high, (n, 1, *WINDOW)).astype(np.float32))
    mask = torch.from_numpy(rng.uniform(size=x.shape) > 0.2)
    return x, mask


def constant_vae(u: float) -> torch.nn.Module:
    """A tiny VAE whose decoder gives ``u`` (model space) everywhere: its head's weights are
    0 and its bias is logit(u)."""
    net = tiny("vae")
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(math.log(u / (1.0 - u)))
    return net


def vae_metrics(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, transform) -> dict:
    fn = registry.family("vae").epoch_metrics
    assert fn is not None
    return fn(net, EpochProbe(x, mask, transform, EDGES))


# ------------------------------------------------------------------------------- VAE


def test_vae_scores_match_numpy_for_a_known_reconstruction():
    x, mask = windows(6, seed=1)
    u = 0.8  # far above every input (inputs <= 0.5): an upward-shifted reconstruction
    out = vae_metrics(constant_vae(u), x, mask, Scale(0.0, HIGH))

    phys = x.numpy().astype(np.float64)[mask.numpy()] * HIGH
    recon = float(torch.sigmoid(torch.tensor(math.log(u / (1 - u))))) * HIGH
    for q in (0.99, 0.999):
        q_in = np.quantile(phys, q)
        assert out[f"val_q{q}_input"] == pytest.approx(q_in, rel=1e-5)
        assert out[f"val_q{q}_recon"] == pytest.approx(recon, rel=1e-5)
        assert out[f"val_q{q}_error"] == pytest.approx(abs(recon - q_in) / q_in, rel=1e-5)
    assert out["val_mean_bias"] == pytest.approx((recon - phys.mean()) / phys.mean(), rel=1e-6)
    assert out["val_mean_bias"] > 0
    assert out["val_wet_fraction"] == 1.0
    assert out["val_observed_wet_fraction"] == pytest.approx(np.mean(phys > 0))
    # the scores of before are still there
    assert {"val_qmse_top5", "val_qmse_top10", "val_active_units"} <= set(out)


def test_vae_upward_shift_raises_bias_and_quantile_error():
    x, mask = windows(6, seed=2)
    transform = Scale(0.0, HIGH)
    near = vae_metrics(constant_vae(0.495), x, mask, transform)  # ~ the inputs' q0.99
    high = vae_metrics(constant_vae(0.9), x, mask, transform)
    low = vae_metrics(constant_vae(0.05), x, mask, transform)
    assert low["val_mean_bias"] < 0 < high["val_mean_bias"]
    assert high["val_q0.99_error"] > 10 * near["val_q0.99_error"]
    assert near["val_q0.99_error"] < 0.05


def test_vae_wet_fraction_counts_valid_pixels_above_zero_after_the_inverse():
    net = tiny("vae")
    x, mask = windows(5, seed=3, high=1.0)
    with torch.no_grad():
        recon = net.reconstruct(x).double().numpy()
    valid = mask.numpy()
    # a transformation whose inverse is <= 0 below the median reconstruction: about half dry
    cut = float(np.median(recon[valid]))
    span = 10.0
    transform = Scale(-cut * span, (1.0 - cut) * span)
    out = vae_metrics(net, x, mask, transform)

    phys_hat = np.maximum(recon * span - cut * span, 0.0)[valid]
    phys = np.maximum(x.double().numpy() * span - cut * span, 0.0)[valid]
    expected = np.mean(phys_hat > 0)
    assert 0.2 < expected < 0.8
    assert out["val_wet_fraction"] == pytest.approx(expected, abs=1e-12)
    assert out["val_observed_wet_fraction"] == pytest.approx(np.mean(phys > 0), abs=1e-12)


def test_zero_reference_gives_absolute_errors_and_empty_masks_give_nan():
    x = torch.zeros(3, 1, *WINDOW)
    mask = torch.ones_like(x, dtype=torch.bool)
    u = 0.25
    net = constant_vae(u)
    out = vae_metrics(net, x, mask, Scale(0.0, HIGH))
    recon = float(torch.sigmoid(torch.tensor(math.log(u / (1 - u))))) * HIGH
    assert out["val_q0.99_error"] == pytest.approx(recon, rel=1e-5)
    assert out["val_mean_bias"] == pytest.approx(recon, rel=1e-5)
    assert out["val_observed_wet_fraction"] == 0.0

    rec = reconstruction_scores(net, x, torch.zeros_like(mask), Scale(0.0, HIGH), EDGES)
    for key in ("val_q0.99_error", "val_q0.999_input", "val_mean_bias", "val_wet_fraction"):
        assert math.isnan(rec.metrics[key])


def test_relative_error():
    assert relative_error(3.0, 2.0) == pytest.approx(0.5)
    assert relative_error(1.0, 2.0) == pytest.approx(0.5)
    assert relative_error(1.5, 0.0) == pytest.approx(1.5)
    assert math.isnan(relative_error(math.nan, 1.0))


# ------------------------------------------------------------------------- power spectra


def fields(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).gamma(0.5, 2.0, (6, 4, 16, 16))


def test_psd_error_is_zero_for_the_same_fields_and_the_log_ratio_for_scaled_ones():
    ref = fields(0)
    assert psd_error(ref, ref) == pytest.approx(0.0, abs=1e-12)
    # 10x the amplitude is 100x the power at every wavenumber: |log10 100| = 2
    assert psd_error(ref, 10.0 * ref) == pytest.approx(2.0)
    assert psd_error(ref, 0.1 * ref + 3.0) == pytest.approx(2.0)  # the mean is removed
    # a constant field has no power: the floor bounds the error
    flat = psd_error(ref, np.full_like(ref, 2.0))
    assert 9.0 < flat <= 10.0 + 1e-9
    assert math.isnan(psd_error(np.full_like(ref, np.nan), ref))


# -------------------------------------------------------------------------- diffusion


def diffusion_probe(epoch: int = 0) -> EpochProbe:
    g = torch.Generator().manual_seed(4)
    u = torch.rand(12, 1, *WINDOW, generator=g)
    x = torch.where(u < 0.5, torch.zeros_like(u), u**3)
    mask = torch.rand(x.shape, generator=g) > 0.1
    return EpochProbe(x, mask, Scale(0.0, HIGH), EDGES, epoch=epoch)


def diffusion_metrics(net: torch.nn.Module, probe: EpochProbe) -> dict[str, float]:
    fn = registry.family("diffusion").epoch_metrics
    assert fn is not None
    return fn(net, probe)


def test_diffusion_epoch_metrics_score_fixed_samples_in_physical_units():
    net = tiny("diffusion", transform="sqrt", probe_samples=3, probe_steps=3)
    probe = diffusion_probe()
    rng_before = torch.get_rng_state()
    out = diffusion_metrics(net, probe)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training's random stream untouched
    assert SAMPLE_KEYS <= set(out)
    assert all(math.isfinite(out[k]) for k in SAMPLE_KEYS)
    assert net.training  # back in training mode

    again = diffusion_metrics(net, probe)
    assert again == out  # the same noise every time

    # the same draws, made here, scored with numpy
    samples = net.sample(3, generator=torch.Generator().manual_seed(0), steps=3)
    gen = np.maximum(samples.double().numpy() * HIGH, 0.0).ravel()
    ref = (probe.x.double().numpy() * HIGH)[probe.mask.numpy()]
    assert out["val_wet_fraction"] == pytest.approx(np.mean(gen > 0), abs=1e-12)
    assert out["val_observed_wet_fraction"] == pytest.approx(np.mean(ref > 0), abs=1e-12)
    assert out["val_mean_bias"] == pytest.approx((gen.mean() - ref.mean()) / ref.mean(), rel=1e-6)
    for q in (0.99, 0.999):
        q_ref, q_gen = np.quantile(ref, q), np.quantile(gen, q)
        assert out[f"val_q{q}_error"] == pytest.approx(abs(q_gen - q_ref) / q_ref, rel=1e-4)


def test_diffusion_epoch_metrics_only_every_probe_every_epochs():
    net = tiny("diffusion", probe_samples=2, probe_steps=2, probe_every=2)
    assert diffusion_metrics(net, diffusion_probe(epoch=1)) == {}
    assert diffusion_metrics(net, diffusion_probe(epoch=3)) == {}
    assert SAMPLE_KEYS <= set(diffusion_metrics(net, diffusion_probe(epoch=2)))
    assert SAMPLE_KEYS <= set(diffusion_metrics(net, diffusion_probe(epoch=0)))


def test_diffusion_probe_samples_zero_turns_the_sample_metrics_off():
    net = tiny("diffusion", probe_samples=0)
    assert diffusion_metrics(net, diffusion_probe()) == {}


def test_diffusion_config_probe_fields_validate():
    entry = registry.family("diffusion")
    cfg = entry.config.model_validate({"kind": "diffusion"})
    assert (cfg.probe_samples, cfg.probe_steps, cfg.probe_every) == (4, 10, 1)
    for bad in ({"probe_samples": -1}, {"probe_steps": 0}, {"probe_every": 0}):
        with pytest.raises(ValueError):
            entry.config.model_validate({"kind": "diffusion", **bad})


# ---------------------------------------------------------------- what each family declares


@pytest.mark.parametrize("name", ["vae", "diffusion"])
def test_declared_metrics_are_reported_every_epoch(name):
    """A sweep ranks trials on a family's declared metrics: each is in every epoch's report
    (here, the family's epoch metrics on probe windows), finite."""
    entry = registry.family(name)
    assert entry.metrics and entry.epoch_metrics is not None
    net = tiny(name, **({"probe_samples": 2, "probe_steps": 2} if name == "diffusion" else {}))
    probe = diffusion_probe()
    for epoch in (0, 1):
        report = entry.epoch_metrics(
            net, EpochProbe(probe.x, probe.mask, probe.transform, EDGES, epoch)
        )
        missing = set(entry.metrics) - set(report)
        assert not missing, f"{name} declares but does not report {sorted(missing)}"
        assert all(math.isfinite(report[k]) for k in entry.metrics), report


def test_distribution_scores_take_more_values_than_torch_quantile_allows():
    """A diffusion probe of 512 windows of 10 x 64 x 64 holds 21 million values;
    torch.quantile refuses more than 2**24."""
    from cloudburst.models.scoring import distribution_scores

    n = 2**24 + 1000
    ref = torch.arange(n, dtype=torch.float32) / n  # uniform on [0, 1)
    scores = distribution_scores(ref, 2.0 * ref, prefix="val_")
    assert scores["val_q0.99_input"] == pytest.approx(0.99, abs=1e-4)
    assert scores["val_q0.99_recon"] == pytest.approx(1.98, abs=2e-4)
    assert scores["val_q0.99_error"] == pytest.approx(1.0, abs=1e-3)
