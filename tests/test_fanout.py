"""Ensembles fanned out over a real Ray cluster of two worker nodes (``ray.cluster_utils``):
the same bytes as the single-process engine, workers on both nodes, dead workers' chunks
redone, resume, and the batch job's ``--workers``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import servers
import torch
import zarr
from test_ensembles import WINDOW, chunk_files, tiny

from cloudburst import tracking
from cloudburst.ensembles.generate import Generator, generate, open_ensemble, resolve
from cloudburst.ensembles.plan import PlanError, plain_tasks, screening
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.store import Layout, read_marker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
NAME = "fanout-vae"


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory, mlflow_module_state):
    root = tmp_path_factory.mktemp("fanout-mlflow")
    uri = tracking.setup(f"sqlite:///{root}/mlflow.db", experiment="fanout")
    tracking.log_and_register(tiny(), name=NAME, tracking_uri=uri)
    return uri


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPU (it only schedules) and two worker nodes of one CPU each."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(servers.RAY_ENV)
    net = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [net.add_node(num_cpus=1) for _ in range(2)]
    try:
        net.wait_for_nodes()
        ray.init(address=net.address, include_dashboard=False)
        yield net, nodes
    finally:
        ray.shutdown()
        net.shutdown()


def ask(output: Path | str, **kw) -> EnsembleRequest:
    base = {
        "model": f"models:/{NAME}/1",
        "members": 200,
        "seed": 11,
        "output": str(output),
        "batch_size": 8,
        "chunk_members": 24,
    }
    return EnsembleRequest.model_validate({**base, **kw})


def single_process(request: EnsembleRequest, uri: str) -> None:
    """The reference: the in-process engine with one intra-op thread, as each worker has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(request, tracking_uri=uri)
    finally:
        torch.set_num_threads(threads)


def both_started(pool) -> list[str]:
    """Wait until every worker of ``pool`` is up (a loaded machine may start one late, and
    the other would write every chunk alone); the nodes they run on."""
    import ray

    return [str(n) for n in ray.get(list(pool.starting))]


def records(store: Path) -> dict[int, tuple[list[int], list[int], float]]:
    out = {}
    for path in (store / "_cloudburst" / "progress").glob("chunk-*.json"):
        r = json.loads(path.read_bytes())
        out[r["chunk"]] = (r["members"], r["draws"], r["weight_sum"])
    return out


# ------------------------------------------------------------------------- plans, no Ray


def screen_out_of_order(plan, gen: Generator) -> None:
    """Screen the plan's blocks, handing results back four at a time in reverse order, as
    workers finishing in any order would."""
    pending: list[tuple[int, int]] = []
    for block in plan.blocks():
        pending.append(block)
        if len(pending) == 4:
            for a, b in reversed(pending):
                plan.add(a, gen.accepted(a, b))
            pending = []
    for a, b in reversed(pending):
        plan.add(a, gen.accepted(a, b))


def test_screened_blocks_in_any_order_give_the_chunks_the_sequential_engine_writes(
    tmp_path, registry_uri
):
    req = ask(
        tmp_path / "seq.zarr", members=60, scenario={"kind": "unconditional", "threshold": 30.0}
    )
    generate(req, tracking_uri=registry_uri)
    stored = zarr.open_group(str(tmp_path / "seq.zarr"), mode="r")
    want_candidates = np.asarray(stored["candidate"][:])
    want = records(tmp_path / "seq.zarr")

    gen = Generator(req, resolve(req.model, registry_uri))
    layout = Layout(60, WINDOW, 24)
    plan = screening(
        layout, {}, batch_size=8, max_candidates_per_member=100, threshold=gen.threshold
    )
    screen_out_of_order(plan, gen)
    tasks = plan.tasks()
    assert [t.chunk for t in tasks] == [0, 1, 2]
    assert np.array_equal(np.concatenate([t.candidates for t in tasks]), want_candidates)
    assert {t.chunk: list(t.draws) for t in tasks} == {c: r[1] for c, r in want.items()}
    # a chunk already written is left out, its draws still consumed by the plan
    done = {1: {"members": [24, 48], "draws": want[1][1]}}
    again = screening(layout, done, batch_size=8, max_candidates_per_member=100, threshold=30.0)
    screen_out_of_order(again, gen)
    assert [(t.chunk, list(t.draws)) for t in again.tasks()] == [
        (0, want[0][1]),
        (2, want[2][1]),
    ]


def test_a_budget_too_small_for_the_threshold_is_named():
    layout = Layout(40, WINDOW, 20)
    plan = screening(layout, {}, batch_size=10, max_candidates_per_member=2, threshold=5.0)
    for a, b in plan.blocks():
        plan.add(a, np.arange(a, b)[:1])  # one accepted draw per block of 20
    assert plan.exhausted()
    with pytest.raises(PlanError, match="after 80 draws only 4 members reach the threshold 5"):
        plan.tasks()


def test_plain_tasks_skip_written_chunks():
    layout = Layout(50, WINDOW, 20)
    tasks = list(plain_tasks(layout, {1: {}}))
    assert [(t.chunk, t.draws) for t in tasks] == [(0, (0, 20)), (2, (40, 50))]
    assert np.array_equal(tasks[1].candidates, np.arange(40, 50))


# ------------------------------------------------------------------------- on the cluster


@pytest.mark.parametrize(
    "scenario",
    [
        {"kind": "unconditional"},
        {"kind": "unconditional", "threshold": 30.0},
        {"kind": "extreme", "proposal": "shift", "shift": 1.5, "threshold": 25.0},
    ],
    ids=["plain", "threshold", "extreme-shift"],
)
def test_fanned_out_ensemble_has_the_single_process_bytes(
    tmp_path, registry_uri, cluster, scenario
):
    from cloudburst.ensembles.fanout import generate_on_cluster

    _, nodes = cluster
    seq, fan = tmp_path / "seq.zarr", tmp_path / "fan.zarr"
    single_process(ask(seq, scenario=scenario), registry_uri)
    pools = []
    result = generate_on_cluster(
        ask(fan, scenario=scenario),
        workers=2,
        tracking_uri=registry_uri,
        pool_ready=lambda pool: pools.append((pool, both_started(pool))),
    )
    assert result.chunks_written == 9 and result.members == 200
    pool, started_on = pools[0]
    assert sorted(started_on) == sorted(n.node_id for n in nodes)  # one worker on each node
    assert sorted(pool.chunks_by_node) == sorted(started_on)  # and both wrote chunks
    assert sum(pool.chunks_by_node.values()) == 9
    assert chunk_files(fan) == chunk_files(seq)  # every array, every chunk, byte for byte
    assert records(fan) == records(seq)
    marker, reference = read_marker(str(fan)), read_marker(str(seq))
    for key in ("draws", "acceptance_rate", "draw_weight_sum", "members"):
        assert marker[key] == reference[key], key


def test_a_dead_worker_has_its_chunks_redone_and_every_chunk_is_written_once(
    tmp_path, registry_uri, cluster
):
    import ray

    from cloudburst.ensembles.fanout import generate_on_cluster

    seq, fan = tmp_path / "seq.zarr", tmp_path / "fan.zarr"
    single_process(ask(seq), registry_uri)
    pools = []
    killed = []

    def kill_one(done: int, total: int) -> None:
        if not killed:  # after the first chunk: a worker with work queued dies
            killed.append(pools[0].actors[0])
            ray.kill(pools[0].actors[0], no_restart=True)

    result = generate_on_cluster(
        ask(fan), workers=2, tracking_uri=registry_uri, on_chunk=kill_one, pool_ready=pools.append
    )
    assert killed and pools[0].deaths >= 1
    assert result.chunks_written == 9
    assert chunk_files(fan) == chunk_files(seq)
    assert sorted(records(fan)) == list(range(9))


def test_an_interrupted_fan_out_resumes_with_the_missing_chunks_only(
    tmp_path, registry_uri, cluster
):
    from cloudburst.ensembles.fanout import generate_on_cluster

    seq, fan = tmp_path / "seq.zarr", tmp_path / "fan.zarr"
    scenario = {"kind": "unconditional", "threshold": 30.0}
    single_process(ask(seq, scenario=scenario), registry_uri)

    class Stop(Exception):
        pass

    def stop_after_three(done: int, total: int) -> None:
        if len(records(fan)) >= 3:
            raise Stop

    with pytest.raises(Stop):
        generate_on_cluster(
            ask(fan, scenario=scenario),
            workers=2,
            tracking_uri=registry_uri,
            on_chunk=stop_after_three,
        )
    assert read_marker(str(fan)) is None
    before = len(records(fan))
    result = generate_on_cluster(ask(fan, scenario=scenario), workers=2, tracking_uri=registry_uri)
    assert result.chunks_written == 9 - before
    assert chunk_files(fan) == chunk_files(seq)
    assert records(fan) == records(seq)
    # and the single-process engine finishes a fan-out's store the same way
    opened = open_ensemble(ask(fan, scenario=scenario), tracking_uri=registry_uri)
    assert opened.complete is not None


def test_batch_job_fans_out_with_workers_and_writes_the_same_store(tmp_path, registry_uri, cluster):
    net, _ = cluster
    seq, fan = tmp_path / "seq.zarr", tmp_path / "fan.zarr"
    single_process(ask(seq), registry_uri)
    env = {**os.environ, "RAY_ADDRESS": net.address}
    args = ["--model", f"models:/{NAME}/1", "--tracking-uri", registry_uri, "--members", "200"]
    args += ["--seed", "11", "--batch-size", "8", "--chunk-members", "24", "--output", str(fan)]

    def job(workers: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "jobs/ensemble.py", *args, "--workers", workers],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    ran = job("2")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert '"workers": 2' in ran.stdout
    assert chunk_files(fan) == chunk_files(seq)
    bad = job("0")
    assert bad.returncode == 2 and "--workers" in bad.stderr
