"""Shared pytest fixtures."""

from __future__ import annotations

import os

from cloudburst import environment

# before Ray and MLflow are imported: no telemetry, a loopback stack (see cloudburst/environment.py)
environment.apply_defaults(environment.IMPORT, environment.PROGRAM, environment.LOCAL)

import mlflow  # noqa: E402
import pytest  # noqa: E402
import servers  # noqa: E402
from mlflow.tracking import _model_registry as _registry_state  # noqa: E402
from mlflow.tracking import _tracking_service as _tracking_state  # noqa: E402

# ---------------------------------------------------------------------------- object storage

# Local emulators only: no real credentials, no cloud metadata probes, no region guessing.
os.environ.update(servers.TEST_ENV)


def _serve(start):
    try:
        with start() as server:
            yield server
    except servers.ServerNotFound as exc:
        pytest.skip(f"object-store server not available: {exc}")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free loopback port: ``.endpoint``, ``.options``, ``.make_bucket``."""
    yield from _serve(servers.moto_s3_server)


@pytest.fixture(scope="session")
def gcs_server():
    """A fake-gcs-server on a free loopback port: ``.endpoint``, ``.options``, ``.make_bucket``."""
    yield from _serve(servers.fake_gcs_server)


# ---------------------------------------------------------------------------- MLflow


def _isolate_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.setenv(var, "unset-by-test")  # records the original, restored afterwards
        monkeypatch.delenv(var)
    monkeypatch.setattr(_tracking_state.utils, "_tracking_uri", None)
    monkeypatch.setattr(_registry_state.utils, "_registry_uri", None)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)


@pytest.fixture
def mlflow_state(monkeypatch):
    """Undo what the tracking glue sets process-wide (URIs, their env vars, the experiment)."""
    _isolate_mlflow(monkeypatch)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="module")
def mlflow_module_state():
    """:func:`mlflow_state` for a module-scoped fixture (a server shared by a module's tests)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate_mlflow(monkeypatch)
        yield
        while mlflow.active_run() is not None:
            mlflow.end_run()


# ---------------------------------------------------------------------- environment isolation


def _mlflow_globals() -> tuple[object, object, object]:
    return (
        _tracking_state.utils._tracking_uri,
        _registry_state.utils._registry_uri,
        mlflow.tracking.fluent._active_experiment_id,
    )


def _restore(env: dict[str, str], state: tuple[object, object, object]) -> None:
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
    (
        _tracking_state.utils._tracking_uri,
        _registry_state.utils._registry_uri,
        mlflow.tracking.fluent._active_experiment_id,
    ) = state


@pytest.fixture(autouse=True, scope="module")
def _module_environment():
    """What a module's tests and fixtures set process-wide (environment variables such as
    MLFLOW_TRACKING_URI or RAY_ADDRESS, MLflow's tracking and registry URIs and active
    experiment) is undone after the module, so no later module sees it."""
    env, state = dict(os.environ), _mlflow_globals()
    yield
    _restore(env, state)


@pytest.fixture(autouse=True)
def _test_environment(_module_environment):
    """The same for each test: it leaves the process as the module's fixtures made it."""
    env, state = dict(os.environ), _mlflow_globals()
    yield
    _restore(env, state)
