"""Training across nodes that share no local disk: a Ray cluster of separate raylets on this
machine, the data and the runs' storage on a moto S3 server, MLflow on a real server.

Each worker node has one CPU and a training worker takes one: two workers can only run on
two nodes. A node is lost mid-run; Ray Train restarts the worker group on the node that
replaces it, from the checkpoint in the bucket, and the epochs go on from there. A sweep on
the same kind of cluster keeps Tune's state in the bucket and resumes from it. The storage
paths Ray is given (``cloudburst.arrow_fs``) are checked against moto and fake-gcs-server.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import servers
from servers import free_port, kill_processes_naming

from cloudburst import arrow_fs, storage
from cloudburst.config import SyntheticConfig, TrainJobConfig, load_config
from cloudburst.data.synthetic import write_synthetic

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 10
STORE_MEMORY = 100 * 1024 * 1024  # each node's object store


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------ the cluster


@dataclass
class MultiNode:
    """A head (no CPU: it runs the driver's actors only) and worker nodes of one CPU each."""

    cluster: Any
    workers: list[Any]
    node_args: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_worker_node(self) -> Any:
        node = self.cluster.add_node(**self.node_args)
        self.workers.append(node)
        return node

    def remove(self, node: Any) -> None:
        """The node's raylet and every process it started are killed."""
        self.cluster.remove_node(node)
        self.workers.remove(node)


@pytest.fixture
def multinode(monkeypatch) -> Iterator[MultiNode]:
    """Three raylets on loopback (a head without CPUs, two worker nodes with one each) under a
    temp dir of their own; every process of it is stopped afterwards, by that dir."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # short: Ray's Unix sockets live under it. RAY_TMPDIR also keeps this cluster's address
    # file out of /tmp/ray, where another test's ray.init() would find it and join it.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    dashboard = free_port()
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Ray Train's placement-group cleaner asks this state API (not another instance's)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dashboard}")
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": STORE_MEMORY}
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **common,
                "num_cpus": 0,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard,
                "dashboard_agent_listen_port": free_port(),
            },
        )
        node_args = {**common, "num_cpus": 1}
        multi = MultiNode(cluster, [], node_args)
        for _ in range(2):
            multi.add_worker_node()
        ray.init(address=cluster.address, log_to_driver=False)
        yield multi
    finally:
        ray.shutdown()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()
        kill_processes_naming(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def tracking_server(tmp_path, mlflow_state) -> Iterator[str]:
    folder = tmp_path / "mlflow"
    folder.mkdir()
    try:
        with servers.mlflow_server(folder) as uri:
            yield uri
    except servers.ServerNotFound as exc:
        pytest.skip(f"mlflow server not available: {exc}")


# ------------------------------------------------------------------------ what Ray reports


def _reports_actor() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Reports:
        """What the run's controller registered, in order: each complete report's epoch and
        the path of its checkpoint in the bucket (None without one)."""

        def __init__(self) -> None:
            self.seen: list[tuple[int, str | None]] = []

        def add(self, epoch: int, path: str | None) -> None:
            self.seen.append((epoch, path))

        def get(self) -> list[tuple[int, str | None]]:
            return list(self.seen)

    return Reports


def epoch_callback(reports: Any) -> Any:
    """A Ray Train user callback (it runs in the controller) that notes every report."""
    from ray.train import UserCallback

    class NoteEpochs(UserCallback):
        def __init__(self, sink: Any) -> None:
            self.sink = sink

        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            path = None if checkpoint is None else checkpoint.path
            self.sink.add.remote(int(metrics[0]["epoch"]), path)

    return NoteEpochs(reports)


def train_worker_nodes(address: str) -> dict[str, str]:
    """Node id of every training worker actor the cluster has run: actor id -> node id."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=1000
    )
    return {a.actor_id: a.node_id for a in actors}


def alive_train_worker_nodes(address: str) -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return sorted(a.node_id for a in actors)


# ---------------------------------------------------------------------------- the run


def s3_config(s3_server: Any, bucket: str, store: str, tracking_uri: str, name: str):
    return load_config(
        TrainJobConfig,
        ROOT / "jobs" / "configs" / "vae-demo.yaml",
        [
            f"data.store={store}",
            "data.windows.size=8",
            "data.windows.length=4",
            "data.windows.stride=4",
            "model.widths=[4, 8]",
            "model.latent=4",
            "train.workers=2",
            "train.cpus_per_worker=1",
            "train.use_gpu=false",
            f"train.epochs={EPOCHS}",
            "train.max_steps_per_epoch=2",
            "train.max_val_batches=1",
            "train.patience=100",
            "train.max_failures=2",
            f"train.checkpoints_to_keep={EPOCHS}",
            "train.dry_threshold=none",
            f"storage.endpoint_url={s3_server.endpoint}",  # credentials: the environment's
            f"run.storage_path={bucket}/ray",
            f"run.tracking_uri={tracking_uri}",
            f"run.name={name}",
            "run.system_metrics_interval=null",
        ],
    )


def checkpoint_files(s3_server: Any, run_url: str) -> list[str]:
    fs, path = storage.filesystem(run_url, s3_server.options)
    fs.invalidate_cache()
    return sorted(p for p in fs.find(path) if p.endswith("/state.pt"))


def test_two_nodes_train_to_s3_and_resume_after_losing_one(multinode, s3_server, tracking_server):
    import mlflow
    import ray
    import torch
    from mlflow.tracking import MlflowClient
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cloudburst.training import job

    bucket = s3_server.make_bucket(unique("multinode"))
    store = f"{bucket}/precip.zarr"
    write_synthetic(
        SyntheticConfig(nt=240, ny=16, nx=16), store, target_options=s3_server.options,
        progress=False,
    )  # fmt: skip
    name = unique("two-nodes")
    cfg = s3_config(s3_server, bucket, store, tracking_server, name)
    cfg, sizes, uri = job.check(cfg)
    run_url = f"{bucket}/ray/{name}"

    # where the controller's notes go: an actor on the head, which is never removed
    head = ray.get_runtime_context().get_node_id()
    reports = (
        _reports_actor()
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False))
        .remote()
    )
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            with mlflow.start_run(run_name=name) as run:
                outcome["run_id"] = run.info.run_id
                outcome["fitted"] = job.fit(
                    cfg, sizes, uri, run_id=run.info.run_id, callbacks=[epoch_callback(reports)]
                )
        except BaseException as exc:  # noqa: BLE001 - the test thread reports it
            outcome["error"] = exc

    first, second = (n.node_id for n in multinode.workers)
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    # a checkpoint counts once Ray Train has registered it (every worker reported its epoch);
    # one uploaded by rank 0 alone is not resumed from
    deadline = time.monotonic() + 240
    at_loss: list[tuple[int, str | None]] = []
    while thread.is_alive() and time.monotonic() < deadline and not at_loss:
        time.sleep(0.2)
        at_loss = ray.get(reports.get.remote())
    assert at_loss, f"no checkpoint registered: {outcome.get('error')!r}"
    placed = alive_train_worker_nodes(multinode.address)
    in_bucket = checkpoint_files(s3_server, run_url)
    # the second worker node is lost mid-run: its raylet and the worker on it are gone
    multinode.remove(multinode.workers[1])
    replacement = multinode.add_worker_node()
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish within 300 s of the node loss"
    assert "error" not in outcome, repr(outcome.get("error"))

    # two workers, on the two worker nodes: not on the head, not both on one node
    assert placed == sorted([first, second])
    # Ray Train restarted the worker group on the surviving and the replacement node
    ran_on = set(train_worker_nodes(multinode.address).values())
    assert ran_on == {first, second, replacement.node_id}
    # every epoch was registered once, in order, each with a checkpoint: after the loss the
    # run went on from the last checkpointed epoch (had it started over, the epochs
    # registered before the loss would come again)
    seen = ray.get(reports.get.remote())
    assert [epoch for epoch, _ in seen] == list(range(EPOCHS))
    assert seen[: len(at_loss)] == at_loss
    assert len(at_loss) < EPOCHS
    # the checkpoints are objects in the bucket, written by whichever node ran rank 0; those
    # registered before the loss were there before the node went, whole
    bucket_path = run_url.split("://", 1)[1]
    assert all(path is not None and path.startswith(bucket_path) for _, path in seen)
    after = checkpoint_files(s3_server, run_url)
    assert {f"{path}/state.pt" for _, path in seen} <= set(after)
    assert {f"{path}/state.pt" for _, path in at_loss} <= set(in_bucket)
    last_epoch, last_path = at_loss[-1]
    fs, _ = storage.filesystem(run_url, s3_server.options)
    state = torch.load(
        io.BytesIO(fs.cat_file(f"{last_path}/state.pt")), map_location="cpu", weights_only=False
    )
    assert state["epoch"] == last_epoch
    assert fs.exists(f"{run_url}/checkpoint_manager_snapshot.json")

    # MLflow (a real server, reached from the workers): rank 0 logged every epoch, and epoch
    # 0 only once (a run started over would have logged it twice); two workers really ran
    client = MlflowClient(tracking_uri=tracking_server)
    run = client.get_run(outcome["run_id"])
    assert run.data.params["world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(outcome["run_id"], "val_loss")]
    assert steps.count(0) == 1
    assert sorted(set(steps)) == list(range(EPOCHS))
    # the packaged model came from a checkpoint in the bucket and samples
    samples = outcome["fitted"].packaged.sample(2, seed=0)
    assert samples.shape == (2, 4, 8, 8)


# ----------------------------------------------------------------- storage paths for Ray


def test_local_storage_paths_go_to_ray_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert arrow_fs.ray_storage("outputs/ray") == (str(tmp_path / "outputs" / "ray"), None)
    assert arrow_fs.ray_storage(f"file://{tmp_path}/ray") == (str(tmp_path / "ray"), None)


@pytest.mark.parametrize("cloud", ["s3_server", "gcs_server"])
def test_object_storage_reaches_ray_through_the_projects_options(request, cloud):
    import pyarrow.fs

    server = request.getfixturevalue(cloud)
    bucket = server.make_bucket(unique("raystore"))
    url = f"{bucket}/ray"
    path, fs = arrow_fs.ray_storage(url, server.options, check=True)
    assert path == f"{bucket.split('://', 1)[1]}/ray"
    assert isinstance(fs, pyarrow.fs.FileSystem)
    # Ray ships the filesystem to its controller and workers: a copy writes as well
    copy = pickle.loads(pickle.dumps(fs))
    copy.create_dir(f"{path}/run")
    with copy.open_output_stream(f"{path}/run/state.json") as out:
        out.write(b'{"epoch": 3}')
    assert storage.read_bytes(f"{url}/run/state.json", server.options) == b'{"epoch": 3}'
    # and what another client wrote is seen at once (no stale listing)
    storage.write_bytes_atomic(f"{url}/run/other.json", b"{}", server.options)
    listed = {info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/run"))}
    assert listed == {"state.json", "other.json"}


def test_unusable_object_storage_fails_before_ray(s3_server):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    with pytest.raises(storage.StorageError, match="cannot reach the object-store endpoint"):
        arrow_fs.ray_storage("s3://runs/ray", options, check=True)
    missing = f"s3://{unique('missing')}/ray"
    with pytest.raises(storage.StorageError, match="does not exist"):
        arrow_fs.ray_storage(missing, s3_server.options, check=True)


# --------------------------------------------------------------------------------- sweeps


def test_a_sweep_across_nodes_keeps_its_state_in_s3_and_resumes_from_it(
    multinode, s3_server, tracking_server, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from cloudburst.tuning.config import SweepConfig
    from cloudburst.tuning.sweep import resume_sweep, run_sweep
    from cloudburst.tuning.trial import MODEL_TAG, TRIAL_TAG

    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # whatever went to a relative local default would be here
    bucket = s3_server.make_bucket(unique("sweep"))
    store = f"{bucket}/precip.zarr"
    write_synthetic(
        SyntheticConfig(nt=240, ny=16, nx=16), store, target_options=s3_server.options,
        progress=False,
    )  # fmt: skip
    name = unique("s3-sweep")
    sweep = SweepConfig.model_validate(
        {
            "name": name,
            "base": str(ROOT / "jobs" / "configs" / "vae-demo.yaml"),
            "overrides": [
                f"data.store={store}",
                "data.windows.size=8",
                "data.windows.length=4",
                "data.windows.stride=4",
                "model.widths=[4, 8]",
                "model.latent=4",
                "train.epochs=1",
                "train.max_steps_per_epoch=2",
                "train.max_val_batches=1",
                "train.dry_threshold=none",
                f"storage.endpoint_url={s3_server.endpoint}",
                "run.system_metrics_interval=null",
            ],
            "space": {"model.bins": {"type": "grid", "values": [25, 50]}},
            "concurrent": 2,
            "holdout": 0,
            "run": {
                "storage_path": f"{bucket}/ray",
                "tracking_uri": tracking_server,
                "registered_model": name,
            },
        }
    )
    outcome = run_sweep(sweep)
    assert [r["status"] for r in outcome.rows] == ["finished", "finished"]
    assert outcome.version == "1"
    # the trials trained on the worker nodes, away from the driver's disk
    ran_on = set(train_worker_nodes(multinode.address).values())
    assert ran_on and ran_on <= {n.node_id for n in multinode.workers}
    # Tune's experiment state, the sweep's own state and every trial's checkpoints are
    # objects in the bucket; nothing went to a local folder
    fs, root = storage.filesystem(f"{bucket}/ray", s3_server.options)
    files = set(fs.find(root))
    assert f"{root}/{name}/cloudburst-sweep.json" in files
    assert any(f.startswith(f"{root}/{name}/experiment_state-") for f in files)
    for row in outcome.rows:
        prefix = f"{root}/{name}-{row['trial_id']}/checkpoint_"
        assert any(f.startswith(prefix) and f.endswith("/state.pt") for f in files), row
    assert not list(workdir.iterdir())

    # resumed from the bucket alone (the endpoint from the environment, as `jobs/sweep.py
    # --resume NAME --storage-path s3://...`): the finished trials are not trained again
    monkeypatch.setenv("CLOUDBURST_ENDPOINT_URL", s3_server.endpoint)
    again = resume_sweep(name, f"{bucket}/ray")
    assert again.parent_run_id == outcome.parent_run_id
    assert [r["status"] for r in again.rows] == ["finished", "finished"]
    assert {r["trial_id"] for r in again.rows} == {r["trial_id"] for r in outcome.rows}
    client = MlflowClient(tracking_server)
    experiment = client.get_run(outcome.parent_run_id).info.experiment_id
    trials = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'"
    )
    assert sorted(r.data.tags[TRIAL_TAG] for r in trials) == sorted(
        r["trial_id"] for r in outcome.rows
    )
    for run in trials:
        assert MODEL_TAG in run.data.tags
        assert len(client.get_metric_history(run.info.run_id, "packaged_val_loss")) == 1


@pytest.mark.parametrize("where", ["missing bucket", "unreachable endpoint"])
def test_a_training_job_refuses_unusable_object_storage_before_any_worker(
    tmp_path, s3_server, mlflow_state, where
):
    from cloudburst.training import job

    store = str(tmp_path / "s.zarr")
    write_synthetic(SyntheticConfig(nt=120, ny=16, nx=16), store, progress=False)
    endpoint = s3_server.endpoint
    if where == "unreachable endpoint":
        endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    bucket = f"s3://{unique('never-made')}"
    cfg = s3_config(s3_server, bucket, store, f"sqlite:///{tmp_path / 'm.db'}", "refused")
    cfg.storage.endpoint_url = endpoint
    words = "does not exist" if where == "missing bucket" else "cannot reach the object-store"
    with pytest.raises(storage.StorageError, match=words):
        job.check(cfg)
