"""MLflow glue on real stores: a SQLite store in tmp_path, and one real ``mlflow server``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# before mlflow is imported (see ../shared/STACK.md)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import servers  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from cloudburst import cli, tracking, versions  # noqa: E402
from cloudburst.config import DatasetJobConfig, VAEConfig  # noqa: E402
from cloudburst.data.ingest import StoreStats  # noqa: E402
from cloudburst.data.transforms import for_data  # noqa: E402
from cloudburst.evaluation import figures
from cloudburst.models import package as package_mod  # noqa: E402
from cloudburst.models import registry  # noqa: E402
from cloudburst.models.package import PrecipitationModel

# MLflow's own SQLAlchemy use, not ours
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
TINY = VAEConfig(widths=(4, 8), latent=3)
WINDOW = (4, 8, 8)


def store_stats(vmax: float = 40.0) -> StoreStats:
    return StoreStats(
        count=1000,
        nan_fraction=0.01,
        wet_fraction=0.3,
        mean=1.5,
        max=vmax,
        quantiles={"0.5": 0.0, "0.99": 20.0},
        bins=4,
        histogram_edges=[0.0, 10.0, 20.0, 30.0, vmax],
        histogram_counts=[900, 60, 30, 10],
        units="mm/day",
    )


def package(seed: int = 0) -> PrecipitationModel:
    torch.manual_seed(seed)
    stats = store_stats()
    return PrecipitationModel(
        registry.build("vae", TINY, WINDOW), "vae", TINY, WINDOW, for_data(stats), stats
    )


def physical_batch(n: int = 3, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.gamma(0.5, 6.0, size=(n, *WINDOW)) * (rng.random((n, *WINDOW)) < 0.4)).astype(
        np.float32
    )
    x[0, 0, 0, :3] = np.nan  # missing values are allowed
    return x


def assert_physical(arr: np.ndarray, n: int) -> None:
    assert arr.shape == (n, *WINDOW) and arr.dtype == np.float32
    assert np.isfinite(arr).all() and float(arr.min()) >= 0.0
    assert float(arr.max()) <= store_stats().max + 1e-3  # sigmoid output within [0, max]


@pytest.fixture
def store(tmp_path, mlflow_state):
    """A real SQLite tracking store and registry in tmp_path, active in MLflow."""
    return tracking.setup(f"sqlite:///{tmp_path}/mlflow/mlflow.db", experiment="tests")


def unused_port() -> int:
    return servers.free_port()


# ---------------------------------------------------------------------------------- URIs


def test_tracking_uri_configured_then_env_then_local_store(tmp_path, mlflow_state, monkeypatch):
    assert tracking.tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert tracking.tracking_uri(None) == "http://from-env:5000"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = tracking.tracking_uri(None, root=tmp_path)
    base = tmp_path.resolve() / "outputs" / "mlflow"
    assert uri == f"sqlite:///{base / 'mlflow.db'}"
    assert (base / "artifacts").is_dir()
    assert tracking.artifact_root(uri) == (base / "artifacts").as_uri()
    assert tracking.artifact_root("http://127.0.0.1:5000") is None


def test_experiments_of_a_sqlite_store_keep_artifacts_beside_it(tmp_path, store):
    with mlflow.start_run() as run:
        mlflow.log_text("hello", "notes/hello.txt")
    assert (tmp_path / "mlflow" / "artifacts" / "tests").is_dir()
    found = list((tmp_path / "mlflow" / "artifacts").rglob("hello.txt"))
    assert len(found) == 1 and run.info.run_id in str(found[0])
    assert not Path("mlruns").exists() or not any(Path("mlruns").rglob(run.info.run_id))


def test_unreachable_tracking_server_fails_fast_with_advice(mlflow_state):
    uri = f"http://127.0.0.1:{unused_port()}"
    with pytest.raises(tracking.TrackingError) as err:
        tracking.check_tracking(uri)
    message = str(err.value)
    assert uri in message and "unreachable" in message and "mlflow server" in message
    # the TCP probe's own answer (refused at once), not a client giving up after retries
    assert "refused" in message.lower()
    for call in (
        lambda: versions.list_models(uri),
        lambda: versions.promote("m", "1", tracking_uri=uri),
    ):
        with pytest.raises(tracking.TrackingError, match="unreachable") as err:
            call()
        assert uri in str(err.value) and "refused" in str(err.value).lower()


def test_a_port_that_never_answers_http_fails_at_the_http_timeout(mlflow_state, monkeypatch):
    monkeypatch.setattr(tracking, "HTTP_TIMEOUT_S", 2.0)  # 5 s by default
    with socket.socket() as listener:  # accepts connections (backlog), never speaks HTTP
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(tracking.TrackingError) as err:
            tracking.check_tracking(uri)
    message = str(err.value)
    # given up by the module's own deadline on the health route, without a second request
    assert f"{uri} accepts connections but gives no answer" in message
    assert f"no answer from {uri}/health within 2 s" in message
    assert "timed out" in message
    assert "experiments/search" not in message


# -------------------------------------------------------------------------------- params


def test_flatten_params_nested_config_and_dicts():
    params = tracking.flatten_params(DatasetJobConfig())
    assert params["data.windows.length"] == "8"
    assert params["synthetic.advection"] == "[0.6, 1.1]"
    assert params["ingest.bbox"] == "None"
    assert all(isinstance(v, str) for v in params.values())

    nested = {
        "model": {"vae": TINY, "name": "vae"},
        "lr": 1e-3,
        "steps": [1, 2, {"a": 3}],
        "long": "x" * 2000,
        "odd key!": {"deep": {"er": True}},
        "empty": {},
    }
    flat = tracking.flatten_params(nested, prefix="cfg")
    assert flat["cfg.model.vae.widths"] == "[4, 8]"
    assert flat["cfg.model.vae.latent"] == "3"
    assert flat["cfg.model.name"] == "vae"
    assert flat["cfg.lr"] == "0.001"
    assert json.loads(flat["cfg.steps"]) == [1, 2, {"a": 3}]
    assert len(flat["cfg.long"]) == 500 and flat["cfg.long"].endswith("...")
    assert flat["cfg.odd key_.deep.er"] == "True"
    assert flat["cfg.empty"] == "{}"


def test_log_config_logs_every_param_to_the_store(store):
    cfg = DatasetJobConfig()
    with mlflow.start_run() as run:
        logged = tracking.log_config(cfg)
        tracking.log_config({"model": TINY}, prefix="train")
    params = MlflowClient().get_run(run.info.run_id).data.params
    assert params == {**logged, **tracking.flatten_params({"model": TINY}, prefix="train")}


# ---------------------------------------------------------------------------- packaging


def test_package_saves_loads_and_speaks_physical_units(tmp_path):
    original = package()
    x = physical_batch()
    folder = original.save(tmp_path / "pkg")
    meta = json.loads((folder / package_mod.METADATA_FILE).read_text())
    assert meta["model"] == "vae" and meta["window"] == list(WINDOW)
    assert meta["transform"] == {"kind": "scale", "low": 0.0, "high": 40.0, "target": "unit"}
    assert meta["stats"]["units"] == "mm/day" and meta["config"]["widths"] == [4, 8]

    loaded = PrecipitationModel.load(folder)
    assert loaded.units == "mm/day"
    np.testing.assert_allclose(loaded.reconstruct(x), original.reconstruct(x), atol=1e-6)
    samples = loaded.sample(5, seed=3)
    assert_physical(samples, 5)
    np.testing.assert_array_equal(samples, loaded.sample(5, seed=3))
    assert not np.array_equal(samples, loaded.sample(5, seed=4))
    assert_physical(loaded.reconstruct(x), 3)
    assert loaded.reconstruct(x[1]).shape == WINDOW  # one window in, one out

    with pytest.raises(ValueError, match=r"\(n, 4, 8, 8\)"):
        loaded.reconstruct(np.zeros((2, 4, 8, 9), np.float32))
    with pytest.raises(FileNotFoundError, match="no packaged model"):
        PrecipitationModel.load(tmp_path)


# ------------------------------------------------------------------- registry, SQLite store


def test_log_register_list_promote_and_load(store, capsys):
    first, second = package(0), package(1)
    x = physical_batch()
    with mlflow.start_run() as run:
        mlflow.log_metric("best_val_loss", 0.25)
        version, uri = tracking.log_and_register(
            first, name="precip-vae", tags={"dataset": "synthetic"}
        )
    assert (version, uri) == ("1", "models:/precip-vae/1")
    version2, _ = tracking.log_and_register(second, name="precip-vae", tags={"dataset": "chirps"})
    assert version2 == "2"  # logged in a run of its own (no active run)

    client = MlflowClient()
    mv = client.get_model_version("precip-vae", "1")
    assert mv.run_id == run.info.run_id
    assert {
        "loss": "rec+wqt",
        "bins": "100",
        "dataset": "synthetic",
        "window": "4x8x8",
    }.items() <= (mv.tags.items())
    aliases = client.get_registered_model("precip-vae").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "2"}

    assert versions.promote("precip-vae", 1)["previous"] is None
    moved = versions.promote("precip-vae", "2", alias="champion")
    assert moved == {"name": "precip-vae", "version": "2", "alias": "champion", "previous": "1"}
    versions.promote("precip-vae", "1")

    [listed] = versions.list_models(store)
    assert listed["name"] == "precip-vae" and listed["aliases"] == {
        "candidate": "2",
        "champion": "1",
    }
    v2, v1 = listed["versions"]
    assert (v1["version"], v1["aliases"], v1["val_loss"]) == ("1", ["champion"], 0.25)
    assert (v2["version"], v2["aliases"], v2["val_loss"]) == ("2", ["candidate"], None)
    assert v1["tags"]["dataset"] == "synthetic" and v1["run_id"] == run.info.run_id

    champion = tracking.load_model("models:/precip-vae@champion")
    np.testing.assert_allclose(champion.reconstruct(x), first.reconstruct(x), atol=1e-5)
    assert_physical(champion.sample(4, seed=0), 4)
    pyfunc = mlflow.pyfunc.load_model("models:/precip-vae/2")
    np.testing.assert_allclose(pyfunc.predict(x), second.reconstruct(x), atol=1e-5)
    np.testing.assert_array_equal(pyfunc.unwrap_python_model().sample(2, 7), second.sample(2, 7))

    assert cli.main(["models", "list", "--tracking-uri", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["aliases"]["champion"] == "1"
    assert cli.main(["models", "list", "--tracking-uri", store]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["name", "version", "aliases", "loss"]
    assert table[2].split()[:5] == ["precip-vae", "1", "champion", "rec+wqt", "100"]
    # the gate cannot compare models of a made-up dataset: refused, then forced with a reason
    assert cli.main(["models", "promote", "precip-vae", "2", "--tracking-uri", store]) == 2
    assert "--force --reason" in capsys.readouterr().err
    forced = ["models", "promote", "precip-vae", "2", "--tracking-uri", store, "--force"]
    assert cli.main([*forced, "--reason", "the made-up dataset cannot be read"]) == 0
    assert "precip-vae@champion -> version 2 (was version 1)" in capsys.readouterr().out


def test_promote_unknown_model_or_version_errors_clearly(store, capsys):
    tracking.log_and_register(package(), name="known", tags={"dataset": "synthetic"})
    with pytest.raises(tracking.TrackingError, match=r"'known' has no version 7; versions: 1"):
        versions.promote("known", "7")
    with pytest.raises(tracking.TrackingError, match=r"no registered model 'nope'.*known"):
        versions.promote("nope", "1")
    with pytest.raises(tracking.TrackingError, match="is a number"):
        versions.promote("known", "latest")
    assert cli.main(["models", "promote", "known", "9", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cloudburst models promote: error:") and "no version 9" in last


def test_failed_registration_leaves_no_version_behind(store, monkeypatch):
    client = MlflowClient()
    tracking.log_and_register(package(), name="kept", tags={})

    def refuse(self, name, alias, version):
        raise mlflow.exceptions.MlflowException("alias service down")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(tracking.TrackingError, match="alias service down"):
        tracking.log_and_register(package(), name="kept", tags={})
    assert [str(v.version) for v in client.search_model_versions("name='kept'")] == ["1"]
    with pytest.raises(tracking.TrackingError):
        tracking.log_and_register(package(), name="fresh", tags={})
    assert not client.search_model_versions("name='fresh'")
    assert [m.name for m in client.search_registered_models()] == ["kept"]


def test_log_figure_needs_a_run_and_writes_a_png(store):
    fig = figures.figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    with pytest.raises(tracking.TrackingError, match="active MLflow run"):
        tracking.log_figure(fig, "plots/curve")
    with mlflow.start_run() as run:
        tracking.log_figure(fig, "plots/curve")
    [art] = MlflowClient().list_artifacts(run.info.run_id, "plots")
    assert art.path == "plots/curve.png" and art.file_size > 100


# ------------------------------------------------------------------ a real tracking server


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free loopback port in its own process group, killed afterwards."""
    try:
        with servers.mlflow_server(tmp_path) as uri:
            yield uri
    except servers.ServerNotFound as exc:
        pytest.skip(str(exc))


@pytest.mark.integration
def test_registry_round_trip_through_a_real_server(mlflow_server, mlflow_state):
    uri = tracking.setup(mlflow_server, experiment="integration")
    original = package(0)
    x = physical_batch()
    with mlflow.start_run():
        mlflow.log_params(tracking.flatten_params({"model": TINY}))
        mlflow.log_metric("best_val_loss", 0.5)
        version, model_uri = tracking.log_and_register(
            original, name="radar-vae", tags={"dataset": "synthetic"}
        )
    assert model_uri == f"models:/radar-vae/{version}"
    aliases = MlflowClient().get_registered_model("radar-vae").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": version}
    assert versions.promote("radar-vae", version, tracking_uri=uri)["alias"] == "champion"
    with pytest.raises(tracking.TrackingError, match="no version 99"):
        versions.promote("radar-vae", "99", tracking_uri=uri)

    loaded = tracking.load_model("models:/radar-vae@champion")
    assert_physical(loaded.sample(3, seed=0), 3)
    rec = loaded.reconstruct(x)
    assert_physical(rec, 3)
    np.testing.assert_allclose(rec, original.reconstruct(x), atol=1e-5)

    proc = subprocess.run(
        [sys.executable, "-m", "cloudburst.cli", "models", "list", "--json"],
        cwd=ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    [listed] = json.loads(proc.stdout)
    assert listed["aliases"] == {"candidate": version, "champion": version}
    assert listed["versions"][0]["val_loss"] == 0.5
    assert listed["versions"][0]["tags"]["dataset"] == "synthetic"


@pytest.mark.integration
def test_a_tracking_server_whose_port_was_taken_starts_on_another(tmp_path, monkeypatch):
    with servers.first_pick_taken(monkeypatch) as taken:
        try:
            with servers.mlflow_server(tmp_path) as uri:
                assert uri != f"http://127.0.0.1:{taken.port}"
                tracking.check_tracking(uri)
        except servers.ServerNotFound as exc:
            pytest.skip(str(exc))
        assert taken.tried()  # the taken port was tried first
    assert "already in use" in (tmp_path / "mlflow-server-0.log").read_text().lower()
