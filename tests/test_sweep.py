"""Sweeps: the config and its checks before any trial, the selection on the tail under a
bias bound, and a real ASHA sweep on Ray Tune with a real ``mlflow server`` (trials stopped
early, parent and child runs, the best registered as candidate), killed and resumed."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import servers
import yaml
from mlflow.tracking import MlflowClient

from cloudburst.config import SyntheticConfig, TrainJobConfig, load_config
from cloudburst.data.ingest import open_store
from cloudburst.data.samples import split_windows
from cloudburst.data.synthetic import write_synthetic
from cloudburst.data.transforms import for_data
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.registry import EpochProbe
from cloudburst.schema import ConfigError
from cloudburst.tuning import space as space_mod
from cloudburst.tuning.config import Objective, SweepConfig
from cloudburst.tuning.holdout import holdout_metrics
from cloudburst.tuning.selection import pareto_front, select
from cloudburst.tuning.sweep import SweepError, prepare, table_csv
from cloudburst.tuning.trial import MODEL_TAG, SWEEP_TAG, TRIAL_TAG

ROOT = Path(__file__).resolve().parents[1]
ENV = servers.JOB_ENV


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sweep") / "s.zarr")
    # 480 days: every split (train, val, and the test seasons the front is scored on) has windows
    write_synthetic(SyntheticConfig(nt=480, ny=16, nx=16), path, progress=False)
    return path


def tiny_base(tmp: Path, store: str) -> list[str]:
    """Overrides that make the demo VAE tiny and keep its runs under ``tmp``."""
    return [
        f"data.store={store}",
        "data.windows.size=8",
        "data.windows.length=4",
        "data.windows.stride=4",
        "model.widths=[4, 8]",
        "model.latent=4",
        "train.max_steps_per_epoch=3",
        "train.max_val_batches=2",
        "train.dry_threshold_samples=2",
        "run.system_metrics_interval=null",
        f"run.storage_path={tmp / 'ray'}",
    ]


def sweep_of(tmp: Path, store: str, **fields) -> SweepConfig:
    tree = {
        "name": "tiny",
        "base": str(ROOT / "jobs/configs/vae-demo.yaml"),
        "overrides": [*tiny_base(tmp, store), f"run.tracking_uri=sqlite:///{tmp / 'm.db'}"],
        "space": {"model.bins": {"type": "grid", "values": [25, 50]}},
        "search": {"algorithm": "random"},
    } | fields
    return SweepConfig.model_validate(tree)


# ------------------------------------------------------------------------ config and checks


def tiny_package(cfg: TrainJobConfig) -> PrecipitationModel:
    """An untrained VAE of ``cfg`` packaged with its store's statistics."""
    _, stats = open_store(cfg.data.store)
    window = (cfg.data.windows.length, cfg.data.windows.size, cfg.data.windows.size)
    network = registry.build("vae", cfg.model, window)
    return PrecipitationModel(network, "vae", cfg.model, window, for_data(stats), stats)


def test_holdout_scores_the_test_windows(tmp_path, store):
    cfg = load_config(
        TrainJobConfig, ROOT / "jobs/configs/vae-demo.yaml", tiny_base(tmp_path, store)
    )
    packaged = tiny_package(cfg)
    test = holdout_metrics(packaged, cfg, limit=16)
    assert {"test_qmse_top5", "test_mean_bias", "test_q0.999_error"} <= set(test)
    assert not [k for k in test if not k.startswith("test_") or "qmse_bin" in k]
    assert all(math.isfinite(test[k]) for k in ("test_qmse_top5", "test_mean_bias"))
    # the same model on validation windows: other windows, other scores
    val = registry.family("vae").epoch_metrics
    data = split_windows(cfg, packaged.transform, 16, "val")
    probe = EpochProbe(data["x"], data["mask"], packaged.transform, data["stats"].histogram_edges)
    on_val = val(packaged.model, probe)
    assert on_val["val_q0.999_input"] != test["test_q0.999_input"]


def test_holdout_without_test_windows_is_named(tmp_path, store):
    overrides = [*tiny_base(tmp_path, store), "data.split.scheme=none"]
    cfg = load_config(TrainJobConfig, ROOT / "jobs/configs/vae-demo.yaml", overrides)
    with pytest.raises(ValueError, match="no test windows"):
        holdout_metrics(tiny_package(cfg), cfg, limit=16)


def test_shipped_sweep_configs_load():
    for path in sorted((ROOT / "jobs/configs").glob("sweep-*.yaml")):
        sweep = SweepConfig.model_validate(yaml.safe_load(path.read_text()))
        base = load_config(TrainJobConfig, ROOT / sweep.base, sweep.overrides)
        space_mod.check_keys(base, dict(sweep.space))
        assert sweep.objective.metric in registry.family(base.model.kind).metrics
        assert sweep.trials() >= 4


def test_search_algorithm_must_fit_the_space():
    base = {"name": "s", "base": "x.yaml", "space": {"train.lr": {"type": "choice", "values": [1]}}}
    with pytest.raises(ValueError, match="grid needs grid domains only; train.lr"):
        SweepConfig.model_validate(base | {"search": {"algorithm": "grid"}})
    grid = {"model.bins": {"type": "grid", "values": [2, 3]}}
    with pytest.raises(ValueError, match=r"optuna cannot search grid domains \(model.bins\)"):
        SweepConfig.model_validate(base | {"space": grid, "search": {"algorithm": "optuna"}})
    with pytest.raises(ValueError, match="loguniform needs 0 < low < high"):
        SweepConfig.model_validate(
            base | {"space": {"train.lr": {"type": "loguniform", "low": 0, "high": 1}}}
        )
    with pytest.raises(ValueError, match="does not match any of the expected tags|'gird'"):
        SweepConfig.model_validate(base | {"space": {"train.lr": {"type": "gird", "values": [1]}}})


def test_grid_trials_and_points():
    sweep = SweepConfig.model_validate(
        {
            "name": "s",
            "base": "x.yaml",
            "samples": 3,
            "space": {
                "model.bins": {"type": "grid", "values": [25, 50]},
                "model.loss": {"type": "grid", "values": ["rec", "rec+wqt", "focal_hist"]},
            },
        }
    )
    assert sweep.trials() == 2 * 3 * 3
    pts = space_mod.points(dict(sweep.space), 100)
    assert len(pts) == 6
    assert {(p["model.bins"], p["model.loss"]) for p in pts} == {
        (b, loss) for b in (25, 50) for loss in ("rec", "rec+wqt", "focal_hist")
    }
    ranged = space_mod.points(
        {"train.lr": space_mod.LogUniform(type="loguniform", low=1e-4, high=1e-2)}, 10, seed=3
    )
    values = [p["train.lr"] for p in ranged]
    assert values[0] == 1e-4 and values[-1] == 1e-2 and 1e-4 < values[1] < 1e-2


def test_unknown_key_names_the_missing_field(tmp_path, store, mlflow_state):
    sweep = sweep_of(tmp_path, store, space={"model.binz": {"type": "choice", "values": [2]}})
    with pytest.raises(SweepError, match=r"'model.binz': model has no field 'binz'.*bins"):
        prepare(sweep)
    sweep = sweep_of(tmp_path, store, space={"trian.lr": {"type": "choice", "values": [1e-3]}})
    with pytest.raises(SweepError, match=r"the config has no field 'trian'"):
        prepare(sweep)
    sweep = sweep_of(tmp_path, store, space={"train.lr.x": {"type": "choice", "values": [1]}})
    with pytest.raises(SweepError, match=r"train.lr is a value"):
        prepare(sweep)


def test_a_point_that_builds_no_valid_config_is_refused(tmp_path, store, mlflow_state):
    sweep = sweep_of(tmp_path, store, space={"model.bins": {"type": "grid", "values": [50, 1]}})
    with pytest.raises(SweepError, match=r"(?s)not a valid training config.*model.bins: got 1"):
        prepare(sweep)
    # the last value of a range is checked too
    sweep = sweep_of(
        tmp_path, store, space={"train.patience": {"type": "randint", "low": 0, "high": 3}}
    )
    with pytest.raises(SweepError, match=r"train.patience: got 0"):
        prepare(sweep)


def test_objective_must_be_a_reported_metric(tmp_path, store, mlflow_state):
    sweep = sweep_of(tmp_path, store, objective={"metric": "val_psd_spatial_eror"})
    with pytest.raises(SweepError, match=r"'val_psd_spatial_eror' is not a metric the vae"):
        prepare(sweep)
    sweep = sweep_of(tmp_path, store, objective={"bias_metric": "val_bias"})
    with pytest.raises(SweepError, match=r"objective.bias_metric 'val_bias'.*val_mean_bias"):
        prepare(sweep)


def test_keys_the_sweep_sets_itself_are_refused(tmp_path, store, mlflow_state):
    sweep = sweep_of(tmp_path, store, space={"run.name": {"type": "choice", "values": ["a"]}})
    with pytest.raises(SweepError, match="'run.name' is set by the sweep itself"):
        prepare(sweep)


def test_grace_period_must_leave_epochs(tmp_path, store, mlflow_state):
    sweep = sweep_of(
        tmp_path,
        store,
        scheduler={"kind": "asha", "grace_period": 3},
        overrides=[*tiny_base(tmp_path, store), "train.epochs=3"],
    )
    with pytest.raises(SweepError, match="grace_period 3 leaves ASHA no epoch"):
        prepare(sweep)


def test_a_bad_base_config_is_named(tmp_path, store, mlflow_state):
    sweep = sweep_of(tmp_path, store, overrides=["model.latnet=3"])
    with pytest.raises(SweepError, match=r"(?s)base config .*model.latnet: .*unknown field"):
        prepare(sweep)


# ------------------------------------------------------------------------------- selection

ROWS = [
    {"trial_id": "a", "status": "finished", "val_qmse_top5": 1.0, "val_mean_bias": 0.5},
    {"trial_id": "b", "status": "finished", "val_qmse_top5": 2.0, "val_mean_bias": -0.1},
    {"trial_id": "c", "status": "finished", "val_qmse_top5": 3.0, "val_mean_bias": 0.05},
    {"trial_id": "d", "status": "finished", "val_qmse_top5": 4.0, "val_mean_bias": 0.15},
    {"trial_id": "e", "status": "stopped", "val_qmse_top5": 0.5, "val_mean_bias": 0.0},
    {"trial_id": "f", "status": "error"},
]


def test_the_best_within_the_bias_bound_wins():
    chosen = select(ROWS, Objective())
    assert chosen.best["trial_id"] == "b" and chosen.feasible
    assert "3 of 4 finished trials" in chosen.reason
    # no bound: the lowest error, whatever its bias; stopped trials never win
    assert select(ROWS, Objective(bias_metric=None)).best["trial_id"] == "a"
    # a bound nobody meets: the best overall, flagged infeasible
    tight = select(ROWS, Objective(bias_bound=0.01))
    assert tight.best["trial_id"] == "a" and not tight.feasible
    assert "no finished trial has |val_mean_bias| <= 0.01" in tight.reason
    assert select(ROWS, Objective(mode="max")).best["trial_id"] == "d"
    assert select(ROWS[4:], Objective()).best is None


def test_pareto_front():
    front = [r["trial_id"] for r in pareto_front(ROWS, Objective())]
    # a (1.0, 0.5), b (2.0, 0.1), c (3.0, 0.05); d (4.0, 0.15) is beaten by b and c
    assert front == ["a", "b", "c"]


def test_results_table_has_every_column():
    text = table_csv([{"trial_id": "a", "x": 1.0}, {"trial_id": "b", "y": 2.0}])
    assert text.splitlines() == ["trial_id,x,y", "a,1.0,", "b,,2.0"]


# ------------------------------------------------------------------ a real sweep on Ray Tune


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_module_state):
    folder = tmp_path_factory.mktemp("mlflow")
    try:
        with servers.mlflow_server(folder) as uri:
            yield uri
    except servers.ServerNotFound as exc:
        pytest.skip(str(exc))


def write_sweep(tmp: Path, store: str, uri: str, name: str, **fields) -> Path:
    tree = {
        "name": name,
        "base": "jobs/configs/vae-demo.yaml",
        "overrides": [*tiny_base(tmp, store), "train.epochs=4", "train.patience=10"],
        # a learning rate that learns and one that cannot: ASHA has something to stop
        "space": {"train.lr": {"type": "grid", "values": [3.0e-3, 1.0e-7]}},
        "search": {"algorithm": "random", "seed": 0},
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "samples": 2,
        "concurrent": 2,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "run": {"tracking_uri": uri, "registered_model": f"{name}-model"},
    } | fields
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def sweep_job(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "jobs/sweep.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def children(client: MlflowClient, parent: str) -> list:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.mark.integration
def test_asha_sweep_registers_the_best_and_stops_laggards(tmp_path, store, server):
    path = write_sweep(tmp_path, store, server, "asha")
    proc = sweep_job("--config", str(path))
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert "model: models:/asha-model/1" in out, out
    parent = [line for line in out.splitlines() if line.startswith("run: ")][-1].split()[1]
    client = MlflowClient(server, registry_uri=server)
    runs = children(client, parent)
    assert len(runs) == 4 and {r.data.tags[SWEEP_TAG] for r in runs} == {"asha"}
    table = client.download_artifacts(parent, "results.csv", str(tmp_path))
    rows = Path(table).read_text().splitlines()
    assert len(rows) == 5, rows
    statuses = [line.split(",")[1] for line in rows[1:]]
    assert statuses.count("stopped") >= 1, rows  # ASHA cut at least one laggard short
    assert statuses.count("finished") >= 1, rows
    # the registered version is the winning trial's model, tagged with the sweep
    mv = client.get_model_version_by_alias("asha-model", "candidate")
    best = client.get_run(parent).data.tags["cloudburst.sweep.best_trial"]
    winner = next(r for r in runs if r.data.tags[TRIAL_TAG] == best)
    assert mv.run_id == winner.info.run_id
    assert mv.tags["sweep"] == "asha" and mv.tags["sweep_run_id"] == parent
    assert mv.tags["sweep_objective"].startswith("val_qmse_top5=")
    # the winner is the table's lowest top-bin error among finished trials within the bias
    # bound (or among all finished ones when none is within it)
    table_rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    finished = [r for r in table_rows if r["status"] == "finished"]
    within = [r for r in finished if abs(float(r["val_mean_bias"])) <= 0.2] or finished
    expected = min(within, key=lambda r: float(r["val_qmse_top5"]))
    assert expected["trial_id"] == best
    assert json.loads(winner.data.params["sweep.train.lr"]) == float(expected["param:train.lr"])
    # every trial logged per-epoch physical metrics into its own run
    for r in runs:
        assert math.isfinite(r.data.metrics["val_qmse_top5"])
    artifacts = {a.path for a in client.list_artifacts(parent, "figures")}
    assert {"figures/pareto.png", "figures/parallel_coordinates.png"} <= artifacts
    # the front's finished trials (the winner among them) scored on the held-out test split
    assert "on the test split" in out, out
    holdout = client.download_artifacts(parent, "holdout.csv", str(tmp_path))
    held = list(csv.DictReader(io.StringIO(Path(holdout).read_text())))
    assert best in {r["trial_id"] for r in held}, held
    assert math.isfinite(client.get_run(winner.info.run_id).data.metrics["test_qmse_top5"])
    stopped = {r["trial_id"] for r in table_rows if r["status"] != "finished"}
    assert not stopped & {r["trial_id"] for r in held}


def _terminated_trials(folder: Path) -> int:
    states = sorted(folder.glob("experiment_state-*.json"))
    return states[-1].read_text().count("TERMINATED") if states else 0


@pytest.mark.integration
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, store, server):
    name = "resumed"
    path = write_sweep(
        tmp_path,
        store,
        server,
        name,
        scheduler={"kind": "none"},
        samples=1,
        concurrent=1,
        space={"model.bins": {"type": "grid", "values": [25, 50]}},
    )
    client = MlflowClient(server, registry_uri=server)
    proc = sweep_job("--config", str(path))
    folder = tmp_path / "ray" / name
    try:
        # until the first trial is recorded finished (a hang ends at pytest-timeout's limit)
        while _terminated_trials(folder) < 1:
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-sweep
        proc.wait()
    servers.kill_processes_naming(str(tmp_path))
    state = json.loads((folder / "cloudburst-sweep.json").read_text())
    parent = state["parent_run_id"]
    done_before = {
        r.data.tags[TRIAL_TAG]: r.info.start_time
        for r in children(client, parent)
        if MODEL_TAG in r.data.tags
    }
    assert len(done_before) >= 1

    resumed = sweep_job("--resume", name, "--storage-path", str(tmp_path / "ray"))
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-4000:]
    assert f"model: models:/{name}-model/1" in out
    runs = {r.data.tags[TRIAL_TAG]: r for r in children(client, parent)}
    assert len(runs) == 2 and all(MODEL_TAG in r.data.tags for r in runs.values())
    for trial, started in done_before.items():  # not trained again: same run, model logged once
        assert runs[trial].info.start_time == started
        history = client.get_metric_history(runs[trial].info.run_id, "packaged_val_loss")
        assert len(history) == 1
    assert client.get_run(parent).info.status == "FINISHED"


def test_resume_of_an_unknown_sweep_is_named(tmp_path):
    proc = sweep_job("--resume", "nothing-here", "--storage-path", str(tmp_path))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "no sweep 'nothing-here'" in err and "start it with --config" in err


def test_sweep_config_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase: jobs/configs/vae-demo.yaml\nspace: {}\n")
    proc = sweep_job("--config", str(bad))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "space" in err
    with pytest.raises(ConfigError):
        load_config(SweepConfig, bad)
