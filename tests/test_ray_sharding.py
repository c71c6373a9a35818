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

    rank = ray.train.get_context().get_world_rank()
    for shuffle in (True, False):  # neither told its rank: both take it from Ray Train
        ds = WindowDataset(config["store"], config["index"], seed=3, shuffle=shuffle)
        ds.set_epoch(1)
        seen = np.stack([item["origin"].numpy() for item in ds])
        name = "shuffled" if shuffle else "ordered"
        np.save(os.path.join(config["out"], f"{name}{rank}.npy"), seen)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "origins.npy"), seen)
        ray.train.report({"n": len(seen)}, checkpoint=Checkpoint.from_directory(tmp))


def test_two_ray_train_workers_read_disjoint_equal_shards(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
    origins = index.origins
    half = len(index) // 2
    assert half > 0
    every = set(map(tuple, origins.tolist()))
    shuffled = [np.load(out / f"shuffled{r}.npy") for r in range(2)]
    assert len(shuffled[0]) == len(shuffled[1]) == half
    as_set = [set(map(tuple, s.tolist())) for s in shuffled]
    assert len(as_set[0]) == len(as_set[1]) == half  # no window twice
    assert not as_set[0] & as_set[1]
    assert as_set[0] | as_set[1] <= every
    # in order, the sequence is by chunk of the origin (time chunks of 32 steps; one spatial
    # chunk): rank 0 reads its first half, rank 1 the second, in that order
    assert open_store(store)[0].precip.encoding["chunks"] == (32, 24, 24)
    by_chunk = origins[np.argsort(origins[:, 0] // 32, kind="stable")]
    ordered = [np.load(out / f"ordered{r}.npy") for r in range(2)]
    np.testing.assert_array_equal(ordered[0], by_chunk[:half])
    np.testing.assert_array_equal(ordered[1], by_chunk[half : 2 * half])
