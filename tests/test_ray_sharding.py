"""The loader inside real Ray Train workers: each rank reads its own, equal, disjoint shard."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cloudburst.config import SyntheticConfig, WindowConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.synthetic import write_synthetic
from cloudburst.data.windows import build_index

pytestmark = pytest.mark.integration


def _worker(config: dict) -> None:
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    from cloudburst.data.loader import WindowDataset

    ds = WindowDataset(config["store"], config["index"], seed=3)
    ds.set_epoch(1)
    seen = np.stack([item["origin"].numpy() for item in ds])
    ctx = ray.train.get_context()
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "origins.npy"), seen)
        np.save(os.path.join(config["out"], f"rank{ctx.get_world_rank()}.npy"), seen)
        ray.train.report({"n": len(seen)}, checkpoint=Checkpoint.from_directory(tmp))


def test_two_ray_train_workers_read_disjoint_equal_shards(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cloudburst.data.loader import WindowDataset

    store = str(tmp_path / "s.zarr")
    write_synthetic(
        SyntheticConfig(nt=200, ny=24, nx=24), store, chunks={"time": 32}, progress=False
    )
    index = build_index(open_store(store)[0], WindowConfig(length=4, size=16, stride=4))
    out = tmp_path / "out"
    out.mkdir()
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": tests_dir}},
    )
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"store": store, "index": index, "out": str(out)},
            scaling_config=ScalingConfig(
                num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}
            ),
            run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="shards"),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    shards = [np.load(out / f"rank{r}.npy") for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(index) // 2
    as_set = [set(map(tuple, s.tolist())) for s in shards]
    assert not as_set[0] & as_set[1]
    # together they are exactly what a single-process reader assigns to ranks 0 and 1
    expected = set()
    for r in range(2):
        ref = WindowDataset(store, index, seed=3, rank=r, world_size=2)
        ref.set_epoch(1)
        expected |= {tuple(o.numpy().tolist()) for o in (i["origin"] for i in ref)}
    assert as_set[0] | as_set[1] == expected
