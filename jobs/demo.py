"""The main job on embedded defaults: synthetic data, a local store, a small VAE trained on Ray.

python jobs/demo.py                          # embedded defaults, no download
python jobs/demo.py synthetic.nt=365 ...     # overrides of the dataset
python jobs/demo.py --config jobs/configs/chirps.yaml
python jobs/demo.py --no-train               # data steps only

Training uses jobs/configs/vae-demo.yaml with this dataset; the model is registered in the
local MLflow store (outputs/mlflow) with alias `candidate`, and a small ensemble of it is
written to outputs/ensembles/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _common import load_job_config, setup_logging, take_verbose
from cloudburst.config import DatasetJobConfig, TrainJobConfig, load_config
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import WindowDataset, make_loader
from cloudburst.data.prepare import prepare_dataset, target_options
from cloudburst.data.transforms import for_data
from cloudburst.data.windows import build_index, split_index

VAE_DEMO = Path(__file__).resolve().parent / "configs" / "vae-demo.yaml"
ENSEMBLE_MEMBERS = 256


def main(argv: list[str] | None = None) -> int:
    argv, verbose = take_verbose(argv)
    setup_logging(verbose)
    argv = list(sys.argv[1:] if argv is None else argv)
    do_train = "--no-train" not in argv
    argv = [a for a in argv if a != "--no-train"]
    cfg = load_job_config(DatasetJobConfig, argv, __doc__.splitlines()[0])
    steps = 5 if do_train else 3
    print(f"[1/{steps}] preparing dataset '{cfg.name}' -> {cfg.ingest.target}")
    s = prepare_dataset(cfg)
    q = s["quantiles"]
    print(
        f"      {s['shape'][0]} steps x {s['shape'][1]} x {s['shape'][2]} cells, "
        f"{s['time_start'][:10]} .. {s['time_end'][:10]}, units {s['units']}"
    )
    print(
        f"      wet fraction {s['wet_fraction']:.2f}, NaN fraction {s['nan_fraction']:.3f}, "
        f"max {s['max']:.1f}, q0.99 {q['0.99']:.1f}, q0.999 {q['0.999']:.1f}"
    )
    w = s["windows"]
    wc = cfg.data.windows
    print(
        f"[2/{steps}] windows of {wc.length} x {wc.size} x {wc.size}: {w['all']} "
        f"(train {w['train']}, val {w['val']}, test {w['test']}; split {cfg.data.split.scheme})"
    )

    opts = target_options(cfg, cfg.data.store)
    ds, stats = open_store(cfg.data.store, opts)
    train = split_index(build_index(ds, wc), cfg.data.split, "train")
    dataset = WindowDataset(
        cfg.data.store,
        train,
        storage_options=opts,
        transform=for_data(stats, cfg.data.scaling, cfg.data.transform),
        cache_blocks=cfg.data.loader.cache_blocks,
        shuffle_buffer_blocks=cfg.data.loader.shuffle_buffer_blocks,
        prefetch_requests=cfg.data.loader.prefetch_requests,
    )
    loader = make_loader(dataset, cfg.data.loader.batch_size)
    t0, n, batch = time.perf_counter(), 0, None
    for batch in loader:
        n += batch["x"].shape[0]
    dt = time.perf_counter() - t0
    lo, hi = (float(batch["x"].min()), float(batch["x"].max())) if batch is not None else (0, 0)
    print(
        f"[3/{steps}] one shuffled training epoch: {n} windows in {dt:.2f} s ({n / dt:,.0f}/s), "
        f"batch {tuple(batch['x'].shape) if batch is not None else ()}, "
        f"scaled range [{lo:.2f}, {hi:.2f}]"
    )
    if do_train:
        from cloudburst.evaluation.report import train_and_evaluate
        from cloudburst.training.job import check

        tcfg = load_config(TrainJobConfig, VAE_DEMO).model_copy(update={"data": cfg.data})
        tcfg, sizes, uri = check(tcfg)
        print(
            f"[4/{steps}] training a small VAE on Ray ({tcfg.train.epochs} epochs of at most "
            f"{tcfg.train.max_steps_per_epoch} steps); tracking {uri}"
        )
        outcome = train_and_evaluate(tcfg, sizes, uri)
        print(f"      model: {outcome.model_uri} (alias candidate), run {outcome.run_id}")
        print(
            "      look at:  .venv/bin/cloudburst models list\n"
            f"                make mlflow   (the MLflow UI on {uri})"
        )
        from cloudburst.ensembles.generate import generate
        from cloudburst.ensembles.request import EnsembleRequest

        ensemble = EnsembleRequest(
            model=outcome.model_uri,
            members=ENSEMBLE_MEMBERS,
            seed=0,
            output=str(Path("outputs/ensembles") / f"{cfg.name}-v{outcome.version}.zarr"),
        )
        result = generate(ensemble, tracking_uri=uri)
        print(
            f"[5/{steps}] ensemble of {result.members} members in {result.seconds:.1f} s: "
            f"{result.output}\n"
            f"      open it:  xarray.open_zarr('{result.output}', consolidated=False)\n"
            "      more:     .venv/bin/python jobs/ensemble.py --model "
            f"{outcome.model_uri} --members 10000 --seed 1 --output outputs/ensembles/big.zarr"
        )
    print(
        f"\nStore: {cfg.ingest.target}\n  inspect:  .venv/bin/cloudburst info {cfg.ingest.target}"
        f"\n  windows:  .venv/bin/cloudburst windows {cfg.ingest.target} --length {wc.length} "
        f"--size {wc.size} --stride {wc.stride} --split test"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
