"""The promotion gate (``cloudburst models promote``): a tiny trained VAE and a clearly worse
copy of it registered in a real SQLite MLflow store, compared by the evaluation engine on a
real synthetic store's test split."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cloudburst import cli, tracking, versions
from cloudburst.config import SyntheticConfig, VAEConfig, WindowConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import WindowDataset
from cloudburst.data.synthetic import write_synthetic
from cloudburst.data.transforms import for_data
from cloudburst.data.windows import build_index
from cloudburst.evaluation import gate, gate_rules
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
    # GEV fits of a few near-constant window maxima (return levels, not gated)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

WINDOW = (4, 8, 8)
NAME = "gate-vae"
# small but enough: the models were registered outside a training run, so the split is named
SMALL = ["--split", "test@seasons:2", "--samples", "24", "--limit", "16", "--members", "4"]
SETTINGS = {"split": "test@seasons:2", "samples": 24, "limit": 16, "members": 4}


def trained(store: str, steps: int = 200) -> PrecipitationModel:
    """A tiny VAE after ``steps`` Adam steps on the store's windows (sqrt transformation)."""
    torch.manual_seed(0)
    ds, stats = open_store(store)
    transform = for_data(stats, transform="sqrt")
    cfg = VAEConfig(widths=(4, 8), latent=4)
    net = registry.build("vae", cfg, WINDOW)
    index = build_index(ds, WindowConfig(length=4, size=8, stride=8))
    data = WindowDataset(store, index, transform=transform, seed=0, rank=0, world_size=1)
    batch = torch.stack([item["x"] for _, item in zip(range(64), data, strict=False)])
    mask = torch.ones_like(batch, dtype=torch.bool)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread is faster on a shared machine
    try:
        for _ in range(steps):
            loss, _ = net.loss({"x": batch, "mask": mask})
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return PrecipitationModel(net, "vae", cfg, WINDOW, transform, stats)


def spoiled(good: PrecipitationModel, store: str) -> PrecipitationModel:
    """The same network with its encoder cut from the input (mean 0, log-variance 0: every
    posterior is the prior) and its output twice as wet (the physical scale doubled)."""
    net = copy.deepcopy(good.model)
    with torch.no_grad():
        for layer in (net.to_mu, net.to_logvar):
            layer.weight.zero_()
            layer.bias.zero_()
    _, stats = open_store(store)
    transform = for_data(stats, transform="sqrt", upper=2 * stats.max)
    return PrecipitationModel(net, "vae", good.config, WINDOW, transform, good.stats)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gate-data") / "s.zarr")
    write_synthetic(SyntheticConfig(nt=160, ny=16, nx=16), path, progress=False)
    return path


@pytest.fixture(scope="module")
def registry_uri(store, tmp_path_factory, mlflow_module_state) -> str:
    """Version 1: the trained VAE, version 2: its spoiled copy, both tagged with the store."""
    root = tmp_path_factory.mktemp("gate")
    uri = tracking.setup(f"sqlite:///{root}/mlflow/mlflow.db", experiment="gate-test")
    good = trained(store)
    for model in (good, spoiled(good, store)):
        tracking.log_and_register(model, name=NAME, tags={"dataset": store}, tracking_uri=uri)
    return uri


@pytest.fixture(autouse=True)
def _outputs_in_tmp(tmp_path, monkeypatch):
    """Default output folders (outputs/promotion-gate/...) land in tmp_path, not the checkout."""
    monkeypatch.chdir(tmp_path)


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def holder_of(uri: str, name: str, alias: str) -> str | None:
    found = client(uri).get_registered_model(name).aliases.get(alias)
    return None if found is None else str(found)


def holder(uri: str, alias: str) -> str | None:
    return holder_of(uri, NAME, alias)


def version_tags(uri: str, version: str) -> dict[str, str]:
    return dict(client(uri).get_model_version(NAME, version).tags)


def promote(uri: str, version: str, alias: str, *extra: str) -> int:
    argv = ["models", "promote", NAME, version, "--alias", alias, "--tracking-uri", uri]
    return cli.main([*argv, *SMALL, *extra])


def test_no_champion_promotes_without_a_comparison_and_again_is_a_no_op(
    registry_uri, mlflow_state, capsys, tmp_path
):
    assert promote(registry_uri, "2", "first", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "pointed at no version: promoted without a comparison" in out
    assert f"{NAME}@first -> version 2" in out
    assert holder(registry_uri, "first") == "2"
    assert not (tmp_path / "metrics.json").exists()  # nothing was evaluated
    assert version_tags(registry_uri, "2")["gate.verdict"] == "no-champion"

    assert promote(registry_uri, "2", "first") == 0
    assert "already points at version 2; nothing to do" in capsys.readouterr().out


def test_a_worse_candidate_is_refused_naming_the_metric_and_the_figures(
    registry_uri, mlflow_state, capsys, tmp_path
):
    versions.promote(NAME, "1", "refuse", tracking_uri=registry_uri)
    out_dir = tmp_path / "eval"
    assert promote(registry_uri, "2", "refuse", "--out", str(out_dir)) == 2
    captured = capsys.readouterr()
    assert holder(registry_uri, "refuse") == "1"  # the alias did not move
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("cloudburst models promote: error: version 2 of gate-vae refused")
    assert "cond_crps" in last and "mean_abs_bias" in last  # the metrics it is worse on
    assert "candidate v2" in last and "champion v1" in last and "tolerance 5%" in last
    assert "--force --reason" in last
    assert str(out_dir / "figures") in last
    assert "WORSE" in captured.out  # the comparison table
    assert (out_dir / "figures" / "quantized_mse.png").exists()

    tags = version_tags(registry_uri, "2")
    assert tags["gate.verdict"] == "refused" and tags["gate.champion_version"] == "1"
    run_id = tags["gate.evaluation_run_id"]
    assert run_id in last
    run = client(registry_uri).get_run(run_id)
    assert run.info.run_name.startswith("promotion gate gate-vae v2 vs refuse v1")
    evaluated = json.loads(run.data.tags["evaluated"])
    assert evaluated == ["models:/gate-vae/2", "models:/gate-vae/1"]  # one evaluation, both
    rows = {r["metric"]: r for r in json.loads(tags["gate.comparison"])["rows"]}
    assert set(rows) == {"qmse_top5", "cond_crps", "mean_abs_bias"}
    assert rows["cond_crps"]["passed"] is False
    assert rows["cond_crps"]["candidate"] > rows["cond_crps"]["champion"]


def test_a_better_candidate_passes_and_takes_the_alias(registry_uri, mlflow_state, tmp_path):
    versions.promote(NAME, "2", "accept", tracking_uri=registry_uri)
    verdict = gate.promote_gated(
        NAME, "1", "accept", tracking_uri=registry_uri, out=tmp_path, **SETTINGS
    )
    assert verdict.passed and verdict.promoted and verdict.status == "passed"
    assert verdict.family == "vae" and verdict.champion == "2"
    assert all(r.passed for r in verdict.rows)
    assert verdict.out == tmp_path and verdict.run_id
    assert holder(registry_uri, "accept") == "1"
    tags = version_tags(registry_uri, "1")
    assert tags["gate.verdict"] == "passed"
    assert tags["gate.evaluation_run_id"] == verdict.run_id
    assert "gate.forced" not in tags


def test_force_needs_a_reason_and_then_promotes_and_records_it(
    registry_uri, mlflow_state, capsys, tmp_path
):
    versions.promote(NAME, "1", "forced", tracking_uri=registry_uri)
    assert promote(registry_uri, "2", "forced", "--force") == 2
    err = capsys.readouterr().err
    assert "--force needs --reason" in err and "Traceback" not in err
    assert holder(registry_uri, "forced") == "1"
    with pytest.raises(gate.GateError, match="needs --reason"):
        gate.promote_gated(NAME, "2", "forced", force=True, reason="  ")

    reason = "hotfix for the storm season"
    forced = ["--force", "--reason", reason, "--out", str(tmp_path)]
    assert promote(registry_uri, "2", "forced", *forced) == 0
    out = capsys.readouterr().out
    assert f"promoted anyway (--force): {reason}" in out
    assert f"{NAME}@forced -> version 2 (was version 1)" in out
    assert holder(registry_uri, "forced") == "2"
    tags = version_tags(registry_uri, "2")
    assert tags["gate.verdict"] == "forced" and tags["gate.forced"] == "true"
    assert tags["gate.reason"] == reason
    assert "cond_crps" in tags["gate.refusal"]
    rows = json.loads(tags["gate.comparison"])["rows"]
    assert any(r["passed"] is False for r in rows)


def test_a_diffusion_model_is_gated_on_generation_metrics(
    store, registry_uri, mlflow_state, tmp_path
):
    from cloudburst.config import DiffusionConfig

    _, stats = open_store(store)
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = DiffusionConfig(widths=(4, 8), embedding=8, transform="sqrt", steps=2)
        net = registry.build("diffusion", cfg, WINDOW)
        packaged = PrecipitationModel(net, "diffusion", cfg, WINDOW, for_data(stats), stats)
        tracking.log_and_register(
            packaged, name="gate-diffusion", tags={"dataset": store}, tracking_uri=registry_uri
        )
    versions.promote("gate-diffusion", "1", tracking_uri=registry_uri)
    verdict = gate.gate("gate-diffusion", "2", tracking_uri=registry_uri, out=tmp_path, **SETTINGS)
    assert verdict.family == "diffusion" and verdict.status in ("passed", "refused")
    assert [r.metric for r in verdict.rows] == [m.name for m in gate_rules.GENERATION_GATE]
    assert all(r.passed is not None for r in verdict.rows)  # every one produced, both sides
    assert verdict.passed == all(r.passed for r in verdict.rows)
    assert holder_of(registry_uri, "gate-diffusion", "champion") == "1"  # gate() moves nothing


def test_a_version_without_its_data_cannot_be_compared_unless_forced(
    store, registry_uri, mlflow_state, capsys
):
    _, stats = open_store(store)
    cfg = VAEConfig(widths=(4, 8), latent=4)
    for tags in ({"dataset": store}, {}):  # version 2 does not say what it was trained on
        packaged = PrecipitationModel(
            registry.build("vae", cfg, WINDOW), "vae", cfg, WINDOW, for_data(stats), stats
        )
        tracking.log_and_register(
            packaged, name="gate-untagged", tags=tags, tracking_uri=registry_uri
        )
    versions.promote("gate-untagged", "1", tracking_uri=registry_uri)
    argv = ["models", "promote", "gate-untagged", "2", "--tracking-uri", registry_uri]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no `dataset` tag" in err and "--data" in err and "--force --reason" in err
    assert holder_of(registry_uri, "gate-untagged", "champion") == "1"

    assert cli.main([*argv, "--force", "--reason", "retrained on the new archive"]) == 0
    assert "gate could not compare, promoted anyway" in capsys.readouterr().out
    assert holder_of(registry_uri, "gate-untagged", "champion") == "2"
    tags = dict(client(registry_uri).get_model_version("gate-untagged", "2").tags)
    assert tags["gate.verdict"] == "forced" and tags["gate.reason"].startswith("retrained")
    assert "no `dataset` tag" in json.loads(tags["gate.comparison"])["error"]


def test_unknown_model_or_version_names_what_exists(registry_uri, mlflow_state, capsys):
    assert promote(registry_uri, "9", "champion") == 2
    assert "has no version 9; versions: 1, 2" in capsys.readouterr().err
    with pytest.raises(tracking.TrackingError, match=r"no registered model 'nope'.*gate-vae"):
        gate.gate("nope", "1", tracking_uri=registry_uri)


def test_the_gate_compares_on_its_table_and_derived_metrics():
    metric = gate_rules.GateMetric("x", "min", 0.1, atol=0.5)
    assert metric.allowed(10.0) == pytest.approx(11.5)
    assert gate_rules.GateMetric("y", "max", 0.1).allowed(10.0) == pytest.approx(9.0)
    rows = gate_rules.compare(
        {"x": 11.0, "y": 8.0},
        {"x": 10.0, "y": 10.0},
        [metric, gate_rules.GateMetric("y", "max", 0.1)],
    )
    assert [r.passed for r in rows] == [True, False]
    missing = gate_rules.compare({"x": None}, {"x": 1.0}, [metric])[0]
    assert missing.passed is False  # the candidate has no value where the champion has one
    assert gate_rules.compare({"x": 1.0}, {}, [metric])[0].passed is None  # not compared
    entry = {"extreme_window_fraction": 0.5, "observed_extreme_window_fraction": 0.3}
    assert gate_rules.metric_value(entry, "extreme_window_fraction_error") == pytest.approx(0.2)
    assert gate_rules.gate_metrics("vae") == gate_rules.VAE_GATE
    assert gate_rules.gate_metrics("diffusion") == gate_rules.GENERATION_GATE
    assert gate_rules.gate_metrics("some-new-family") == gate_rules.GENERATION_GATE


def test_settings_are_checked_before_anything_runs(tmp_path: Path):
    with pytest.raises(gate.GateError, match="--samples must be at least 10"):
        gate.gate("m", "1", tracking_uri=f"sqlite:///{tmp_path}/m.db", samples=2)
