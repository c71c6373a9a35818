"""What a user browsing the MLflow registry reads: model and version descriptions and the gate
metric tags, written through the real registration and evaluation code paths and read back
through the REST API of a real ``mlflow server``."""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
import urllib.request

# before mlflow is imported (see ../shared/STACK.md)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import pytest  # noqa: E402
import servers  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from test_tracking import WINDOW, package  # noqa: E402

from cloudburst import registry_notes, tracking  # noqa: E402
from cloudburst.config import TrainJobConfig  # noqa: E402
from cloudburst.evaluation.entries import Entry  # noqa: E402
from cloudburst.evaluation.publish import log_to_mlflow  # noqa: E402
from cloudburst.evaluation.request import EvaluationRequest  # noqa: E402
from cloudburst.models import registry  # noqa: E402

# MLflow's own SQLAlchemy use, not ours
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

STORE = "s3://precip-archive/chirps-16.zarr"
NAME = "notes-vae"
EVALUATION = {  # what the evaluation after training logs (report.log_evaluation's names)
    "eval_qmse_top5": 0.123456789,
    "eval_qmse_top10": 0.0456,
    "eval_qmse_bin_3": 0.5,  # per-bin scores stay out of the table
    "eval_q0.99_error": -0.0521,
    "eval_mean_bias": 0.0123,
    "eval_active_units": 3.0,
}
ROW = re.compile(r"^\| `(?P<name>[^`]+)` \| (?P<value>\S+) \|$", re.MULTILINE)


# ------------------------------------------------------------------------------ the texts


def test_a_section_is_replaced_or_appended_and_the_rest_kept():
    text = registry_notes.set_section("My own words.", "registration", "data v1")
    text = registry_notes.set_section(text, "evaluation", "scores v1")
    text = registry_notes.set_section(text, "registration", "data v2")
    assert text.startswith("My own words.")
    assert registry_notes.parse_sections(text) == {
        "registration": "data v2",
        "evaluation": "scores v1",
    }
    assert text.count("<!-- cloudburst:registration -->") == 1


def test_a_description_stays_within_what_mlflow_keeps():
    text = registry_notes.set_section("intro", "registration", "data " * 200)
    text = registry_notes.set_section(text, "evaluation", "row\n" * 2000)
    assert len(text) <= registry_notes.DESCRIPTION_LIMIT
    sections = registry_notes.parse_sections(text)
    assert set(sections) == {"registration", "evaluation"}  # markers survive the cut
    assert sections["registration"] == ("data " * 200).strip()  # the longest one was cut
    assert "cut to fit" in sections["evaluation"]


def test_gate_tags_are_the_family_gate_metrics_known():
    assert registry_notes.gate_tags("vae", EVALUATION, prefix="eval_") == {
        "metric.qmse_top5": "0.123457"
    }
    generated = {"mean_abs_bias": 0.2, "extreme_window_fraction": 0.3}
    generated["observed_extreme_window_fraction"] = 0.25
    assert registry_notes.gate_tags("diffusion", generated) == {
        "metric.mean_abs_bias": "0.2",
        "metric.extreme_window_fraction_error": "0.05",
    }


# ------------------------------------------------------------------ a real tracking server


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_module_state):
    """``mlflow server`` on a free loopback port, MLflow's tracking and registry URI."""
    folder = tmp_path_factory.mktemp("registry-notes")
    try:
        with servers.mlflow_server(folder) as uri:
            tracking.setup(uri, experiment="registry-notes")
            yield uri
    except servers.ServerNotFound as exc:
        pytest.skip(str(exc))


def rest(uri: str, endpoint: str, **query: str) -> dict:
    url = f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def version_of(uri: str, version: str) -> tuple[str, dict[str, str]]:
    mv = rest(uri, "model-versions/get", name=NAME, version=version)["model_version"]
    return mv.get("description", ""), {t["key"]: t["value"] for t in mv.get("tags", [])}


@pytest.fixture(scope="module")
def registered(server):
    """A tiny VAE registered from a run that holds a training config and losses, then its
    evaluation after training recorded: (version, run id)."""
    cfg = TrainJobConfig.model_validate(
        {
            "data": {"store": STORE, "windows": {"length": WINDOW[0], "size": WINDOW[1]}},
            "train": {"epochs": 5, "max_steps_per_epoch": 20},
        }
    )
    with mlflow.start_run() as run:
        tracking.log_config(cfg)
        mlflow.log_params({"train_windows": 120, "val_windows": 12})
        for epoch, loss in enumerate((0.9, 0.5, 0.6)):
            mlflow.log_metric("val_loss", loss, step=epoch)
            mlflow.log_metric("train_loss", loss + 0.1, step=epoch)
        mlflow.log_metric("best_val_loss", 0.5, step=2)
        version, _ = tracking.log_and_register(package(), name=NAME, tags={"dataset": STORE})
    run_id = run.info.run_id
    # what report.log_evaluation leaves in the run: metrics, the split tag, figures
    client = MlflowClient()
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in EVALUATION.items()])
    client.set_tag(run_id, "evaluation_split", "val split (12 windows)")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    for name in ("samples", "qq_reconstruction"):
        fig = Figure(figsize=(2, 2))
        fig.add_subplot().plot([0, 1], [0, 1])
        tracking.log_figure(fig, f"figures/{name}.png", run_id=run_id)
    registry_notes.record_evaluation(NAME, version, run_id, EVALUATION)
    return version, run_id


@pytest.mark.integration
def test_registered_model_and_version_read_back_through_the_rest_api(server, registered):
    version, run_id = registered
    model = rest(server, "registered-models/get", name=NAME)["registered_model"]
    family = registry.family("vae").description
    assert family and model["description"].startswith(family)

    text, tags = version_of(server, version)
    sections = registry_notes.parse_sections(text)
    assert list(sections) == ["registration", "evaluation"]
    data = sections["registration"]
    assert f"- store: `{STORE}`" in data
    assert f"- windows: {WINDOW[0]} time steps × {WINDOW[1]} × {WINDOW[1]} pixels" in data
    assert "120 training, 12 validation windows" in data
    assert "- split: scheme `seasons`" in data
    assert "- 3 epochs run of at most 5" in data and "at most 20 steps per epoch" in data
    assert f"- loss: `{tags['loss']}`" in data
    assert "best validation loss 0.5" in data
    assert f"- run: `runs:/{run_id}`" in data

    evaluation = sections["evaluation"]
    assert "On the val split (12 windows)" in evaluation
    table = {m["name"]: float(m["value"]) for m in ROW.finditer(evaluation)}
    logged = {
        m["key"]: m["value"]
        for m in rest(server, "runs/get", run_id=run_id)["run"]["data"]["metrics"]
    }
    expected = {k for k in EVALUATION if "_bin_" not in k}
    assert set(table) == expected
    for key in expected:
        assert table[key] == pytest.approx(logged[key], rel=1e-5)
        assert logged[key] == pytest.approx(EVALUATION[key])
    assert next(iter(table)) == "eval_qmse_top5"  # the gate metric first
    for name in ("samples", "qq_reconstruction"):
        assert f"`runs:/{run_id}/figures/{name}.png`" in evaluation

    assert tags["model"] == "vae" and tags["dataset"] == STORE
    assert float(tags["metric.qmse_top5"]) == pytest.approx(logged["eval_qmse_top5"], rel=1e-5)
    assert run_id in tags["metric_source"]
    assert "metric.cond_crps" not in tags  # not known after training


@pytest.mark.integration
def test_a_published_evaluation_adds_its_section_and_updates_the_gate_tags(
    server, registered, tmp_path
):
    version, run_id = registered
    scores = {"qmse_top5": 0.2, "cond_crps": 0.31, "mean_abs_bias": 0.04, "mean": 1.5}
    entry = Entry(
        f"{NAME} v{version}",
        "model",
        {"version_uri": f"models:/{NAME}/{version}", "run_id": run_id, "model": "vae"},
        metrics=scores,
    )
    request = EvaluationRequest(data=STORE, experiment="registry-notes-evaluation")
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text("{}")
    report = {"data": {"split": "test (seasons)", "windows": 24}}
    evaluation_run = log_to_mlflow(request, report, [entry], [], metrics_path)

    text, tags = version_of(server, version)
    sections = registry_notes.parse_sections(text)
    key = next(k for k in sections if k.startswith("evaluate:"))
    assert list(sections) == ["registration", "evaluation", key]  # nothing lost
    table = {m["name"]: float(m["value"]) for m in ROW.finditer(sections[key])}
    assert table == pytest.approx(scores)
    assert f"runs:/{evaluation_run}" in sections[key]
    assert tags["metric.qmse_top5"] == "0.2"
    assert tags["metric.cond_crps"] == "0.31"
    assert tags["metric.mean_abs_bias"] == "0.04"
    assert evaluation_run in tags["metric_source"]


@pytest.mark.integration
def test_a_user_description_is_kept_and_a_failed_description_only_warns(
    server, registered, monkeypatch, caplog
):
    MlflowClient().update_registered_model(NAME, description="Our radar VAE.")

    def broken(*args, **kwargs):
        raise RuntimeError("no descriptions today")

    monkeypatch.setattr(registry_notes, "registration_section", broken)
    with caplog.at_level(logging.WARNING, logger="cloudburst.registry_notes"):
        version, uri = tracking.log_and_register(package(1), name=NAME, tags={"dataset": STORE})
    assert uri == f"models:/{NAME}/{version}"
    assert "no descriptions today" in caplog.text
    model = rest(server, "registered-models/get", name=NAME)["registered_model"]
    assert model["description"] == "Our radar VAE."
    text, tags = version_of(server, version)
    assert text == "" and tags["dataset"] == STORE
