"""Evaluation figures and the post-training report against a local SQLite MLflow store."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from cloudburst import tracking  # noqa: E402
from cloudburst.config import SyntheticConfig, TrainJobConfig, VAEConfig  # noqa: E402
from cloudburst.data.ingest import open_store  # noqa: E402
from cloudburst.data.synthetic import write_synthetic  # noqa: E402
from cloudburst.data.transforms import for_data  # noqa: E402
from cloudburst.evaluation import comparisons, figures, report  # noqa: E402
from cloudburst.models import registry, scoring  # noqa: E402
from cloudburst.models.package import PrecipitationModel

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

RNG = np.random.default_rng(0)
WINDOWS = RNG.gamma(0.5, 4.0, size=(6, 3, 8, 8)).astype(np.float32)


def saved(fig: Figure, tmp_path, name: str) -> int:
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=50)
    return path.stat().st_size


def image_axes(fig: Figure) -> int:
    return sum(1 for ax in fig.axes if ax.images)


def test_inputs_and_reconstructions(tmp_path):
    fig = figures.inputs_and_reconstructions(
        WINDOWS, torch.from_numpy(WINDOWS[:, None]) * 0.5, "mm"
    )
    # 4 samples x (input, reconstruction) rows x 3 time steps, plus one colourbar per sample
    assert isinstance(fig, Figure)
    assert image_axes(fig) == 4 * 2 * 3
    assert len(fig.axes) == 4 * 2 * 3 + 4
    # input and reconstruction of a sample share the scale
    first = [ax.images[0] for ax in fig.axes[:6] if ax.images]
    assert len({im.get_clim() for im in first}) == 1
    assert first[0].get_clim() == (0.0, pytest.approx(float(WINDOWS[0].max())))
    assert saved(fig, tmp_path, "recon") > 1000


def test_samples_grid_and_latent_interpolation(tmp_path):
    fig = figures.samples_grid(WINDOWS[:5], "mm/day")
    assert image_axes(fig) == 5 * 3 and len(fig.axes) == 5 * 3 + 1
    assert saved(fig, tmp_path, "samples") > 1000
    frames = WINDOWS[:5]
    fig = figures.latent_interpolation(frames, "mm/day")
    assert image_axes(fig) == 5 * 3
    fig = figures.latent_interpolation(frames, "mm/day", time="middle")
    assert image_axes(fig) == 5 and len(fig.axes) == 6
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), frames[0, 1])
    assert saved(fig, tmp_path, "interp") > 1000


def test_latent_line_endpoints_and_spacing():
    z0, z1 = torch.randn(3), torch.randn(3)
    line = figures.latent_line(z0, z1)
    assert line.shape == (5, 3)
    torch.testing.assert_close(line[0], z0)
    torch.testing.assert_close(line[-1], z1)
    steps = line.diff(dim=0)
    torch.testing.assert_close(steps, ((z1 - z0) / 4).expand(4, 3))
    assert figures.latent_line(z0[None], z1[None], points=3).shape == (3, 3)
    with pytest.raises(ValueError):
        figures.latent_line(z0, z1, points=1)


def test_qq_levels_follow_the_spec_and_the_sample_size():
    levels = figures.qq_levels(1000)
    expected_tail = [0.9 + k / 100 for k in range(10)] + [0.99 + k / 1000 for k in range(10)]
    np.testing.assert_allclose(levels, np.unique(np.r_[np.arange(10) / 10, expected_tail]))
    assert levels.max() == pytest.approx(0.999)
    assert figures.qq_levels(10**6).max() == pytest.approx(0.999999)
    assert figures.qq_levels(5).max() == pytest.approx(0.8)


def test_qq_quantiles_match_numpy_and_plot(tmp_path):
    ref = RNG.gamma(0.3, 10.0, size=5000)
    other = ref * 0.8
    other[:10] = np.nan  # NaNs are dropped
    levels, qr, qo = figures.qq_quantiles(ref, other)
    np.testing.assert_allclose(qr, np.quantile(ref, levels))
    np.testing.assert_allclose(qo, np.quantile(other[10:], levels))
    assert levels.max() == pytest.approx(0.9997)  # 4,990 values: (1 - 0.9998) n < 1
    fig = figures.qq_plot(ref, other, "mm/day")
    (ax,) = fig.axes
    assert len(ax.lines) == 2  # quantiles and y = x
    assert ax.get_xscale() == "log"  # a heavy tail spanning decades
    x, y = ax.lines[0].get_data()
    # numpy's quantiles of the two samples, zero quantiles dropped on the log axes
    expected_ref, expected_other = np.quantile(ref, levels), np.quantile(other[10:], levels)
    positive = (expected_ref > 0) & (expected_other > 0)
    np.testing.assert_allclose(x, expected_ref[positive])
    np.testing.assert_allclose(y, expected_other[positive])
    assert saved(fig, tmp_path, "qq") > 1000
    # a narrow range stays linear and keeps zeros
    small = figures.qq_plot(np.linspace(0, 1, 100), np.linspace(0, 1, 100), "mm")
    assert small.axes[0].get_xscale() == "linear"
    assert small.axes[0].lines[0].get_data()[0][0] == 0.0


def test_quantized_mse_plot_skips_empty_bins(tmp_path):
    edges = np.linspace(0.0, 50.0, 6)
    mse = np.array([0.1, np.nan, 2.0, 5.0, np.nan])
    counts = np.array([100, 0, 5, 2, 0])
    fig = figures.quantized_mse_per_bin(edges, mse, counts, label="rec")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and len(ax.lines) == 1
    x, y = ax.lines[0].get_data()
    np.testing.assert_allclose(x, [5.0, 25.0, 35.0])
    np.testing.assert_allclose(y, [0.1, 2.0, 5.0])
    two = figures.quantized_mse_per_bin(
        edges, {"rec": mse, "rec+wqt": mse / 10}, {"rec": counts, "rec+wqt": counts}
    )
    assert [line.get_label() for line in two.axes[0].lines] == ["rec", "rec+wqt"]
    assert saved(two, tmp_path, "qmse") > 1000


def test_qmse_metrics_top_bins():
    mse = torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0, 5.0, 6.0, float("nan")])
    counts = torch.tensor([9, 0, 5, 4, 3, 2, 1, 0])
    out = scoring.qmse_metrics(mse, counts)
    assert sorted(k for k in out if "bin" in k) == [f"val_qmse_bin_{j}" for j in (0, 2, 3, 4, 5, 6)]
    assert out["val_qmse_top5"] == pytest.approx(4.0)
    assert out["val_qmse_top10"] == pytest.approx(3.5)


def test_log_evaluation_logs_figures_and_metrics(tmp_path, mlflow_state):
    store = str(tmp_path / "s.zarr")
    write_synthetic(SyntheticConfig(nt=60, ny=8, nx=8), store, progress=False)
    cfg = TrainJobConfig.model_validate(
        {
            "data": {"store": store, "windows": {"length": 4, "size": 8, "stride": 4}},
            "model": VAEConfig(widths=(4, 8), latent=3).model_dump(),
        }
    )
    _, stats = open_store(store)
    torch.manual_seed(0)
    model = registry.build("vae", cfg.model, (4, 8, 8))
    packaged = PrecipitationModel(
        model, "vae", cfg.model, (4, 8, 8), for_data(stats, "unit"), stats
    )
    tracking.setup(f"sqlite:///{tmp_path}/mlflow/mlflow.db", experiment="tests")
    with mlflow.start_run() as run:
        metrics = report.log_evaluation(cfg, packaged, run.info.run_id)

    client = MlflowClient()
    names = {f.path for f in client.list_artifacts(run.info.run_id, "figures")}
    assert names == {f"figures/{name}.png" for name in report.FIGURES}
    logged = client.get_run(run.info.run_id).data.metrics
    bins = [k for k in logged if k.startswith("eval_qmse_bin_")]
    assert bins and {"eval_qmse_top5", "eval_qmse_top10", "eval_active_units"} <= set(logged)
    assert all(np.isfinite(logged[k]) for k in bins)
    assert set(logged) == set(metrics)  # what it returns is what it logged
    # one entry per non-empty bin of the store's histogram; top k: the mean of the k highest
    indices = sorted(int(k.rsplit("_", 1)[1]) for k in bins)
    assert 0 <= indices[0] and indices[-1] < stats.bins == 100
    values = [logged[f"eval_qmse_bin_{j}"] for j in indices]
    assert logged["eval_qmse_top5"] == pytest.approx(np.mean(values[-5:]))
    assert logged["eval_qmse_top10"] == pytest.approx(np.mean(values[-10:]))
    assert logged["eval_active_units"] in {0.0, 1.0, 2.0, 3.0}  # of a latent of 3
    # the artifacts are real PNGs
    local = client.download_artifacts(run.info.run_id, "figures", str(tmp_path / "dl"))
    for name in report.FIGURES:
        with open(os.path.join(local, f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- model comparison figures


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_intensity_histograms_densities_integrate_to_one(tmp_path):
    edges = np.array([0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0])
    counts = {
        "observed": np.array([500, 200, 150, 100, 60, 30, 15, 0, 3, 1, 1]),
        "diffusion": torch.tensor([300, 250, 200, 120, 70, 40, 10, 5, 2, 0, 0]),
    }
    title = "observed vs diffusion, validation years"
    fig = comparisons.intensity_histograms(edges, counts, "mm/day", title)
    assert isinstance(fig, Figure)
    full, low = fig.axes
    assert " ".join(fig.get_suptitle().split()) == title
    assert legend_texts(full) == ["observed", "diffusion"]
    for ax in (full, low):
        assert len(ax.lines) == 2
        assert ax.get_yscale() == "log"
        assert "mm/day" in ax.get_xlabel() and "mm/day" in ax.get_ylabel()
    for line, c in zip(full.lines, counts.values(), strict=True):
        x, y = line.get_data()
        np.testing.assert_allclose(x, edges)
        density = np.asarray(y[:-1], dtype=float)
        assert np.isnan(density[np.asarray(c) == 0]).all()  # empty bins are not drawn
        assert np.nansum(density * np.diff(edges)) == pytest.approx(1.0)
    # densities: count / (total count x bin width), NaN for empty bins
    for line, c in zip(full.lines, counts.values(), strict=True):
        c = np.asarray(c, dtype=float)
        expected = np.where(c > 0, c / c.sum() / np.diff(edges), np.nan)
        np.testing.assert_allclose(np.asarray(line.get_data()[1][:-1], float), expected)
    # default low end: the first 10 bins, with the same densities
    x, y = low.lines[0].get_data()
    assert x[-1] == edges[10] and len(x) == 11
    observed = counts["observed"].astype(float)
    expected = np.where(observed > 0, observed / observed.sum() / np.diff(edges), np.nan)[:10]
    np.testing.assert_allclose(np.asarray(y[:-1], float), expected)
    fig = comparisons.intensity_histograms(edges, counts, "mm/day", title, low_threshold=1.5)
    assert fig.axes[1].lines[0].get_data()[0][-1] == 1.0  # bins up to an upper edge <= 1.5
    assert saved(fig, tmp_path, "hist") > 1000


def test_intensity_histograms_reject_bad_input():
    edges = np.linspace(0.0, 10.0, 6)
    good = np.ones(5)
    with pytest.raises(ValueError, match="4 counts for 5 bins"):
        comparisons.intensity_histograms(edges, {"a": good, "b": np.ones(4)}, "mm", "t")
    with pytest.raises(ValueError, match="empty"):
        comparisons.intensity_histograms(edges, {}, "mm", "t")
    with pytest.raises(ValueError, match="strictly increasing"):
        comparisons.intensity_histograms(edges[::-1], {"a": good}, "mm", "t")
    with pytest.raises(ValueError, match="low_threshold"):
        comparisons.intensity_histograms(edges, {"a": good}, "mm", "t", low_threshold=1.0)
    with pytest.raises(ValueError, match="total count is zero"):
        comparisons.intensity_histograms(edges, {"a": np.zeros(5)}, "mm", "t")


def test_qq_compare_log_and_linear(tmp_path):
    sample = RNG.gamma(0.3, 10.0, size=20000)
    levels = figures.qq_levels(sample.size)
    ref = np.quantile(sample, levels)
    others = {"vae": ref * 0.7, "diffusion": torch.from_numpy(ref * 1.1)}
    title = "QQ: vae and diffusion vs observed, 2019"
    fig = comparisons.qq_compare(levels, ref, others, "mm/day", title)
    (ax,) = fig.axes
    assert " ".join(fig.get_suptitle().split()) == title
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.lines) == 3  # two models and y = x
    assert ax.lines[-1].get_linestyle() == "--"
    assert legend_texts(ax) == ["vae", "diffusion", "y = x"]
    assert f"{levels[-1]:.10g}" in ax.get_legend().get_title().get_text()
    assert ax.get_xlabel() == "observed quantiles (mm/day)"
    assert ax.get_ylabel() == "model quantiles (mm/day)"
    x, y = ax.lines[0].get_data()
    positive = ref > 0
    np.testing.assert_allclose(x, ref[positive])  # zero quantiles dropped on log axes
    np.testing.assert_allclose(y, ref[positive] * 0.7)
    assert saved(fig, tmp_path, "qqc") > 1000
    # a narrow range stays linear and keeps zeros
    lv = np.linspace(0.0, 0.9, 10)
    q = np.linspace(0.0, 1.0, 10)
    lin = comparisons.qq_compare(lv, q, {"a": q, "b": q * 2}, "mm", "t", reference_label="radar")
    assert lin.axes[0].get_xscale() == "linear"
    assert lin.axes[0].lines[0].get_data()[0][0] == 0.0
    assert lin.axes[0].get_xlabel().startswith("radar quantiles")
    with pytest.raises(ValueError, match="b: 9 quantiles for 10 levels"):
        comparisons.qq_compare(lv, q, {"a": q, "b": q[:-1]}, "mm", "t")
    with pytest.raises(ValueError, match="reference"):
        comparisons.qq_compare(lv, q[:-1], {"a": q}, "mm", "t")
    with pytest.raises(ValueError, match="empty"):
        comparisons.qq_compare(lv, q, {}, "mm", "t")


def test_bias_maps_share_a_symmetric_scale(tmp_path):
    a = RNG.normal(0.0, 0.3, size=(6, 5))
    b = RNG.normal(0.1, 0.5, size=(6, 5))
    a[0, 0] = np.nan
    b[2, 3] = -2.5  # largest absolute value, negative
    title = "bias of vae and diffusion, DJF"
    fig = comparisons.bias_maps({"vae": a, "diffusion": torch.from_numpy(b)}, title)
    assert " ".join(fig.get_suptitle().split()) == title
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and len(fig.axes) == 3  # one shared colourbar
    assert [ax.get_title() for ax in panels] == ["vae", "diffusion"]
    for ax in panels:
        im = ax.images[0]
        assert im.get_clim() == (pytest.approx(-2.5), pytest.approx(2.5))
        assert im.cmap.name.startswith("RdBu_r")
        assert im.cmap.get_bad()[:3] == pytest.approx((0.6, 0.6, 0.6))
    assert fig.axes[-1].get_ylabel() == "mean-normalised bias"
    assert saved(fig, tmp_path, "bias") > 1000
    zero = comparisons.bias_maps({"a": np.zeros((3, 3)), "b": np.full((3, 3), np.nan)}, "t", "bias")
    assert zero.axes[0].images[0].get_clim() == (-1e-6, 1e-6)
    with pytest.raises(ValueError, match=r"b: expected a \(y, x\) map"):
        comparisons.bias_maps({"a": a, "b": np.zeros((2, 3, 4))}, "t")
    with pytest.raises(ValueError, match="empty"):
        comparisons.bias_maps({}, "t")


def test_spectra_log_log_skip_non_positive(tmp_path):
    f = np.linspace(0.0, 0.5, 11)
    p1 = np.r_[0.0, 1.0 / f[1:] ** 2]
    p2 = p1 * 0.5
    p2[5] = -1.0
    title = "radial spectra: vae, diffusion, observed"
    fig = comparisons.spectra({"vae": (f, p1), "diffusion": (f, p2)}, "wavenumber (1/km)", title)
    (ax,) = fig.axes
    assert " ".join(fig.get_suptitle().split()) == title
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.lines) == 2 and legend_texts(ax) == ["vae", "diffusion"]
    assert ax.get_xlabel() == "wavenumber (1/km)" and ax.get_ylabel() == "power"
    assert len(ax.lines[0].get_data()[0]) == 10  # zero frequency dropped
    assert len(ax.lines[1].get_data()[0]) == 9  # and the negative power
    assert saved(fig, tmp_path, "spectra") > 1000
    with pytest.raises(ValueError, match="b: 11 frequencies and 10 power"):
        comparisons.spectra({"a": (f, p1), "b": (f, p1[:-1])}, "k", "t")
    with pytest.raises(ValueError, match="pair"):
        comparisons.spectra({"a": (f, p1, p1)}, "k", "t")


def test_rank_histograms_calibration_lines(tmp_path):
    h1 = np.full(10, 0.1)
    h2 = np.r_[0.3, np.full(8, 0.05), 0.3]
    title = "rank histograms: ensemble of 9, vae and diffusion"
    fig = comparisons.rank_histograms({"vae": h1, "diffusion": h2}, title)
    (ax,) = fig.axes
    assert " ".join(fig.get_suptitle().split()) == title
    assert len(ax.lines) == 3
    assert legend_texts(ax) == ["vae", "diffusion", "calibrated"]
    calibrated = ax.lines[-1]
    assert calibrated.get_linestyle() == "--"
    np.testing.assert_allclose(calibrated.get_ydata(), 0.1)
    x, y = ax.lines[1].get_data()
    np.testing.assert_allclose(x, np.linspace(0.0, 1.0, 11))
    np.testing.assert_allclose(y[:-1], h2)
    assert ax.get_xlim() == (0.0, 1.0)
    assert ax.get_xlabel() == "rank of observation (normalised)"
    assert ax.get_ylabel() == "relative frequency"
    assert saved(fig, tmp_path, "rank") > 1000
    mixed = comparisons.rank_histograms({"a": h1, "b": np.full(5, 0.2)}, "t")
    assert len(mixed.axes[0].lines) == 4  # one calibrated line per ensemble size
    assert {line.get_ydata()[0] for line in mixed.axes[0].lines[2:]} == {0.1, 0.2}
    with pytest.raises(ValueError, match="b: empty"):
        comparisons.rank_histograms({"a": h1, "b": np.array([])}, "t")
    with pytest.raises(ValueError, match="non-negative"):
        comparisons.rank_histograms({"a": -h1}, "t")


def test_reliability_diagram_skips_nan(tmp_path):
    forecast = np.array([0.05, 0.15, np.nan, 0.55, 0.85])
    curves = {
        "vae": {
            "forecast": forecast,
            "observed": np.array([0.04, 0.2, np.nan, 0.5, 0.7]),
            "cases": np.array([5000, 800, 0, 40, 3]),
        },
        "diffusion": {
            "forecast": np.array([0.05, 0.2, 0.35, 0.5, np.nan]),
            "observed": np.array([0.05, np.nan, 0.3, 0.55, np.nan]),
            "cases": torch.tensor([4000, 900, 200, 30, 0]),
        },
    }
    title = "reliability, P(> 10 mm/day): vae and diffusion"
    fig = comparisons.reliability_diagram(curves, title)
    main, below = fig.axes
    assert " ".join(fig.get_suptitle().split()) == title
    assert len(main.lines) == 3  # diagonal and two models
    assert legend_texts(main) == ["perfect reliability", "vae", "diffusion"]
    assert main.get_xlim() == (0.0, 1.0) and main.get_ylim() == (0.0, 1.0)
    assert len(main.lines[1].get_data()[0]) == 4
    assert len(main.lines[2].get_data()[0]) == 3
    assert below.get_yscale() == "log" and len(below.lines) == 2
    np.testing.assert_allclose(below.lines[0].get_data()[1], [5000, 800, 40, 3])
    assert main.get_ylabel() == "observed frequency"
    assert below.get_xlabel() == "forecast probability" and below.get_ylabel() == "cases"
    assert saved(fig, tmp_path, "reliability") > 1000
    with pytest.raises(ValueError, match="missing key"):
        comparisons.reliability_diagram({"a": {"forecast": forecast, "observed": forecast}}, "t")
    bad = {"forecast": forecast, "observed": forecast[:3], "cases": forecast}
    with pytest.raises(ValueError, match="differ in length"):
        comparisons.reliability_diagram({"a": bad}, "t")


def test_return_levels_bands(tmp_path):
    periods = np.array([2.0, 5.0, 10.0, 20.0, 50.0, 100.0])
    levels = 20.0 + 8.0 * np.log(periods)
    curves = {
        "observed": {
            "periods": periods,
            "levels": levels,
            "lower": levels - 3.0,
            "upper": np.r_[levels[:-1] + 3.0, np.nan],
        },
        "diffusion": {
            "periods": periods,
            "levels": levels * 0.9,
            "lower": levels * 0.8,
            "upper": levels * 1.0,
        },
    }
    title = "GEV return levels of annual maxima: observed and diffusion"
    fig = comparisons.return_levels(curves, "mm/day", title)
    (ax,) = fig.axes
    assert " ".join(fig.get_suptitle().split()) == title
    assert ax.get_xscale() == "log"
    assert len(ax.lines) == 2 and legend_texts(ax) == ["observed", "diffusion"]
    assert len(ax.collections) == 2
    assert all(c.get_alpha() == pytest.approx(0.2) for c in ax.collections)
    assert ax.get_xlabel() == "return period (years)"
    assert "mm/day" in ax.get_ylabel()
    assert saved(fig, tmp_path, "return") > 1000
    bad = dict(curves["observed"], lower=levels[:-1])
    with pytest.raises(ValueError, match="differ in length"):
        comparisons.return_levels({"a": bad}, "mm/day", "t")
    with pytest.raises(ValueError, match="missing key"):
        comparisons.return_levels({"a": {"periods": periods}}, "mm/day", "t")
    with pytest.raises(ValueError, match="empty"):
        comparisons.return_levels({}, "mm/day", "t")
