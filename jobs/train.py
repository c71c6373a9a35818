"""Train a model with Ray Train, track it in MLflow and register it.

    python jobs/train.py --config jobs/configs/vae-demo.yaml            # in-process Ray
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/vae-chirps.yaml

Re-running with the same run.name resumes from the last checkpoint in run.storage_path.
Ends with the line ``model: models:/NAME/VERSION`` and the MLflow run id.
"""

from __future__ import annotations

import os
import sys

from _common import load_job_config
from cloudburst import storage, tracking
from cloudburst.config import TrainJobConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.transforms import for_data
from cloudburst.evaluation.report import log_evaluation
from cloudburst.training import ray_train


def main(argv: list[str] | None = None) -> int:
    cfg = load_job_config(TrainJobConfig, argv, __doc__.splitlines()[0])
    cfg = ray_train.absolute_paths(cfg)
    try:
        sizes = ray_train.preflight(cfg)
        uri = tracking.setup(cfg.run.tracking_uri, cfg.run.experiment)
    except (ValueError, RuntimeError, storage.StorageError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"train: {sizes['train_windows']} train / {sizes['val_windows']} val windows; "
        f"tracking {uri}"
    )

    import mlflow
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    use_gpu = cfg.train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.train.workers
    with mlflow.start_run(run_name=cfg.run.name) as run:
        tracking.log_config(cfg)
        mlflow.log_params(
            {
                "train_windows": sizes["train_windows"],
                "val_windows": sizes["val_windows"],
                "use_gpu": use_gpu,
            }
        )
        trainer = ray_train.make_trainer(
            cfg, use_gpu=use_gpu, tracking_uri=uri, mlflow_run_id=run.info.run_id
        )
        result = trainer.fit()
        best = min(result.best_checkpoints, key=lambda cm: cm[1]["val_loss"], default=None)
        checkpoint = best[0] if best else result.checkpoint
        model = ray_train.load_checkpoint_model(cfg, checkpoint)
        _, stats = open_store(
            cfg.data.store,
            storage.storage_options(
                cfg.data.store,
                endpoint_url=cfg.storage.endpoint_url,
                anon=cfg.storage.anon,
                extra=cfg.storage.options,
            ),
        )
        window = (cfg.data.windows.length, cfg.data.windows.size, cfg.data.windows.size)
        packaged = tracking.PrecipitationModel(
            model,
            cfg.model,
            cfg.vae,
            window,
            for_data(stats, cfg.data.scaling, cfg.data.transform),
            stats,
        )
        version, model_uri = tracking.log_and_register(
            packaged,
            name=cfg.run.registered_model,
            run_id=run.info.run_id,
            tags={
                "dataset": cfg.data.store,
                "loss": cfg.vae.loss,
                "bins": cfg.vae.bins,
                "window": "x".join(map(str, window)),
            },
            experiment=cfg.run.experiment,
        )
        try:
            metrics = log_evaluation(cfg, packaged, run.info.run_id)
        except Exception as exc:  # noqa: BLE001 - the model is registered; report, do not fail
            print(f"train: warning: evaluation failed: {exc!r}", file=sys.stderr)
        else:
            top = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if "_top" in k)
            print(f"train: evaluation figures and quantized MSE logged ({top or 'no bins'})")
    print(f"model: {model_uri}")
    print(f"run: {run.info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
