"""The jobs and their configs: the demo runs, every config validates, real samples prepare."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr
import yaml
from samples import DATA as SHARED
from samples import needs_data
from servers import ray_head

from cloudburst.config import (
    ConfigError,
    DatasetJobConfig,
    TrainJobConfig,
    job_config_class,
    load_config,
)
from cloudburst.data.prepare import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
SERVE_CONFIGS = [p for p in ALL_CONFIGS if "applications" in yaml.safe_load(p.read_text())]
CONFIGS = [p for p in ALL_CONFIGS if p not in SERVE_CONFIGS]

REAL = ["chirps", "fraser", "radolan", "bom"]


RUN_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


def job(script: str, *args: str, cwd: Path, timeout: int = 180):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=cwd,
        env={**env, **RUN_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_runs_and_prints_the_summary(tmp_path):
    target = tmp_path / "demo.zarr"
    overrides = [
        "synthetic.nt=120",
        "synthetic.ny=24",
        "synthetic.nx=24",
        "data.windows.size=16",
        f"ingest.target={target}",
    ]
    # from an empty folder, as on a new machine: the store, Ray checkpoints and the MLflow
    # store all land under it; another Ray instance runs on the machine meanwhile (its own
    # local cluster must not be confused with it)
    with ray_head(num_cpus=1):
        proc = job("demo.py", *overrides, cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Traceback" not in proc.stderr
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in out
    assert "model: models:/cloudburst-vae-demo/1 (alias candidate)" in out
    ensemble = tmp_path / "outputs" / "ensembles" / "demo-v1.zarr"
    assert f"{ensemble.relative_to(tmp_path)}" in out
    members = xr.open_zarr(ensemble, consolidated=False).precip
    assert members.shape[0] == 256 and float(members.min()) >= 0
    assert (tmp_path / "outputs" / "mlflow" / "mlflow.db").exists()
    assert any((tmp_path / "outputs" / "ray").iterdir())
    assert "120 steps x 24 x 24 cells" in out
    assert f"inspect:  .venv/bin/cloudburst info {target}" in out

    cfg = load_config(DatasetJobConfig, None, overrides)
    assert cfg.data.store == str(target)
    m = re.search(r"windows of 8 x 16 x 16: (\d+) \(train (\d+), val (\d+), test (\d+)", out)
    assert m, out
    printed = dict(zip(("all", "train", "val", "test"), map(int, m.groups()), strict=True))
    # 120 daily steps: 113 starts of 8-step windows, 2 x 2 positions of 16 cells by 8 in 24
    assert printed["all"] == 113 * 2 * 2
    # the record spans two seasons (DJF and MAM 2001): no fifth one, so no test part; one of
    # its four validation blocks of 4 x 8 steps (the last one 24) is carved from training
    assert printed["test"] == 0
    windows = {0: (81, 25), 1: (74, 25), 2: (74, 25), 3: (89, 17)}  # block -> (train, val)
    assert (printed["train"], printed["val"]) in {(4 * t, 4 * v) for t, v in windows.values()}
    m = re.search(r"one shuffled training epoch: (\d+) windows", out)
    assert m and int(m.group(1)) == printed["train"]
    m = re.search(r"scaled range \[(-?[\d.]+), (-?[\d.]+)\]", out)
    assert m and 0.0 <= float(m.group(1)) <= float(m.group(2)) <= 1.0


def test_demo_without_training_stops_after_the_data(tmp_path):
    proc = job(
        "demo.py",
        "--no-train",
        "synthetic.nt=60",
        "synthetic.ny=16",
        "synthetic.nx=16",
        "data.windows.size=8",
        f"ingest.target={tmp_path / 'd.zarr'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[3/3]" in proc.stdout and "[4/" not in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_ingest_job_prints_the_summary_as_json(tmp_path):
    target = tmp_path / "tiny.zarr"
    proc = job(
        "ingest.py",
        "synthetic.nt=60",
        "synthetic.ny=8",
        "synthetic.nx=8",
        "data.windows.size=8",
        "data.windows.length=4",
        "data.split.scheme=none",
        f"ingest.target={target}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["shape"] == [60, 8, 8]
    assert proc.stderr.strip().splitlines()[-1] == f"ingest: {target} (60x8x8; 57 windows)"
    assert summary["windows"]["all"] == 57  # one position per step, 60 - 4 + 1 starts
    assert summary["windows"]["test"] == 0
    assert summary["windows"]["train"] + summary["windows"]["val"] <= 57


def test_job_with_a_bad_override_fails_before_any_work(tmp_path):
    target = tmp_path / "never.zarr"
    proc = job("ingest.py", "data.windows.size=0", f"ingest.target={target}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.windows.size" in proc.stderr and "Traceback" not in proc.stderr
    assert not target.exists()


def test_demo_yaml_is_the_embedded_defaults():
    from_file = load_config(DatasetJobConfig, ROOT / "jobs" / "configs" / "demo.yaml")
    defaults = load_config(DatasetJobConfig)
    assert from_file == defaults
    assert from_file.model_dump() == defaults.model_dump()


DATASET_CONFIGS = [p for p in CONFIGS if job_config_class(p) is DatasetJobConfig]


def test_training_configs_are_told_apart():
    kinds = {p.stem: job_config_class(p) for p in CONFIGS}
    assert kinds["vae-demo"] is TrainJobConfig and kinds["demo"] is DatasetJobConfig
    load_config(TrainJobConfig, ROOT / "jobs" / "configs" / "vae-demo.yaml")


def written_source(path: Path) -> str | None:
    """The ``ingest.source`` the YAML file itself gives (None: synthetic data)."""
    return (yaml.safe_load(path.read_text()).get("ingest") or {}).get("source")


SOURCED_CONFIGS = [p for p in DATASET_CONFIGS if written_source(p) is not None]


@pytest.mark.parametrize("path", DATASET_CONFIGS, ids=[p.stem for p in DATASET_CONFIGS])
def test_every_config_validates(path):
    cfg = load_config(DatasetJobConfig, path)
    assert cfg.name
    assert cfg.data.store == cfg.ingest.target
    assert cfg.ingest.source == written_source(path)
    # overrides still apply on top of the file; a wrong one names the field
    with pytest.raises(ConfigError, match="data.windows.lenght"):
        load_config(DatasetJobConfig, path, ["data.windows.lenght=4"])


@pytest.mark.parametrize("path", SOURCED_CONFIGS, ids=[p.stem for p in SOURCED_CONFIGS])
def test_config_sources_point_into_the_shared_data(path):
    # sources are given relative to the repository root, pointing into ../shared/data
    source = load_config(DatasetJobConfig, path).ingest.source
    assert source.startswith("../shared/data/")
    assert (ROOT / source).resolve().parent == SHARED.resolve()


def test_every_real_sample_config_names_a_source():
    assert {p.stem for p in SOURCED_CONFIGS} >= set(REAL)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.stem for p in SERVE_CONFIGS])
def test_serve_configs_validate(path):
    from ray.serve.schema import ServeDeploySchema

    from cloudburst.serving.app import ServeSettings

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "cloudburst.serving.app:build"
    settings = ServeSettings.model_validate(app.args).resolved()
    assert all(os.path.isabs(p) for p in settings.allowed_prefixes)
    assert settings.tracking_uri


def test_all_real_sample_configs_are_there():
    assert {p.stem for p in CONFIGS} >= {*REAL, "demo"}


# the real samples' configs: with a held-out split (test and validation parts), or none
HELD_OUT = {"chirps": True, "fraser": True, "radolan": False, "bom": False}


def test_the_held_out_table_names_every_real_sample():
    assert set(HELD_OUT) == set(REAL)
    for name, held_out in HELD_OUT.items():
        data = yaml.safe_load((ROOT / "jobs" / "configs" / f"{name}.yaml").read_text())["data"]
        assert (data["split"]["scheme"] != "none") is held_out, name


def prepared(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    cfg = load_config(
        DatasetJobConfig,
        ROOT / "jobs" / "configs" / f"{name}.yaml",
        [f"ingest.target={tmp_path}/s"],
    )
    needs_data(Path(cfg.ingest.source).name)
    monkeypatch.chdir(ROOT)  # the configs name their sources relative to the repository root
    summary = prepare_dataset(cfg, progress=False)
    assert summary["ingest_skipped"] is False
    assert 0.0 <= summary["nan_fraction"] < 0.5 and summary["max"] > 0
    # a second run of the same job writes nothing
    assert prepare_dataset(cfg, progress=False)["ingest_skipped"] is True
    return summary["windows"]


@pytest.mark.data
@pytest.mark.parametrize("name", [n for n, held_out in HELD_OUT.items() if held_out])
def test_real_sample_configs_with_a_held_out_split_prepare(name, tmp_path, monkeypatch):
    windows = prepared(name, tmp_path, monkeypatch)
    assert windows["train"] > 0 and windows["val"] > 0 and windows["test"] > 0
    assert windows["train"] + windows["val"] + windows["test"] <= windows["all"]


@pytest.mark.data
@pytest.mark.parametrize("name", [n for n, held_out in HELD_OUT.items() if not held_out])
def test_real_sample_configs_without_a_split_train_on_every_window(name, tmp_path, monkeypatch):
    windows = prepared(name, tmp_path, monkeypatch)
    assert windows["all"] > 0
    assert windows == {"all": windows["all"], "train": windows["all"], "val": 0, "test": 0}
