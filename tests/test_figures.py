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
from cloudburst.evaluation import figures, report  # noqa: E402
from cloudburst.models import registry  # noqa: E402

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
    np.testing.assert_allclose(x, qr[(qr > 0) & (qo > 0)])
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
    out = report.qmse_metrics(mse, counts)
    assert sorted(k for k in out if "bin" in k) == [f"val_qmse_bin_{j}" for j in (0, 2, 3, 4, 5, 6)]
    assert out["val_qmse_top5"] == pytest.approx(4.0)
    assert out["val_qmse_top10"] == pytest.approx(3.5)


def test_log_evaluation_logs_figures_and_metrics(tmp_path, mlflow_state):
    store = str(tmp_path / "s.zarr")
    write_synthetic(SyntheticConfig(nt=60, ny=8, nx=8), store, progress=False)
    cfg = TrainJobConfig.model_validate(
        {
            "data": {"store": store, "windows": {"length": 4, "size": 8, "stride": 4}},
            "vae": VAEConfig(widths=(4, 8), latent=3).model_dump(),
        }
    )
    _, stats = open_store(store)
    torch.manual_seed(0)
    model = registry.build("vae", cfg.vae, (4, 8, 8))
    packaged = tracking.PrecipitationModel(
        model, "vae", cfg.vae, (4, 8, 8), for_data(stats, "unit"), stats
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
    assert logged == pytest.approx(metrics)
    assert len(bins) < stats.bins or all(c > 0 for c in stats.histogram_counts)
    # the artifacts are real PNGs
    local = client.download_artifacts(run.info.run_id, "figures", str(tmp_path / "dl"))
    for name in report.FIGURES:
        with open(os.path.join(local, f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
