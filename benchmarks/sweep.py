"""A sweep against the same trials run one after another with jobs/train.py.

    .venv/bin/python benchmarks/sweep.py [--trials 4] [--concurrent 2] [--epochs 3] [--steps 40]

Runs N trials of the demo VAE (bins 25, 50, 100, 200, ...; the demo store, made first if
missing) twice, in one run: as a sweep (``jobs/sweep.py``, ``concurrent`` trials at once on one
CPU each, no early stopping) and as N sequential ``jobs/train.py`` runs with the same settings
(one CPU, the whole machine otherwise idle). Prints both wall times and their ratio (target:
sweep <= 0.65 x sequential with 2 concurrent trials), and per trial the time from its MLflow
run's start to its first epoch's report, the epoch time (second report minus first), and their
difference: what a trial costs before its first optimisation step (Ray Train's worker group,
the store's statistics, the loader's first blocks).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _common import ROOT  # before cloudburst: package path, quiet defaults
from cloudburst.config import SyntheticConfig
from cloudburst.data.synthetic import write_synthetic


def overrides(store: str, tmp: Path, epochs: int, steps: int) -> list[str]:
    return [
        f"data.store={store}",
        f"train.epochs={epochs}",
        f"train.max_steps_per_epoch={steps}",
        "train.max_val_batches=4",
        "train.patience=100",
        "train.cpus_per_worker=1",
        "train.dry_threshold_samples=4",
        "run.system_metrics_interval=null",
        f"run.storage_path={tmp / 'ray'}",
    ]


def first_report(client, run_id: str) -> tuple[float, float]:  # noqa: ANN001
    """(seconds from the run's start to its first epoch report, seconds between the first
    two epoch reports)."""
    run = client.get_run(run_id)
    history = sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)
    start = run.info.start_time
    first = (history[0].timestamp - start) / 1000
    epoch = (history[1].timestamp - history[0].timestamp) / 1000 if len(history) > 1 else 0.0
    return first, epoch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    from mlflow.tracking import MlflowClient

    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    bins = [25 * 2**i for i in range(args.trials)]
    with tempfile.TemporaryDirectory(prefix="cloudburst-sweep-bench-") as folder:
        tmp = Path(folder)
        store = str(tmp / "demo.zarr")
        write_synthetic(SyntheticConfig(), store, progress=False)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        common = overrides(store, tmp, args.epochs, args.steps)

        sweep = {
            "name": "bench",
            "base": str(ROOT / "jobs/configs/vae-demo.yaml"),
            "overrides": common,
            "space": {"model.bins": {"type": "grid", "values": bins}},
            "scheduler": {"kind": "none"},
            "concurrent": args.concurrent,
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "run": {"tracking_uri": uri, "registered_model": "bench-sweep"},
        }
        path = tmp / "sweep.yaml"
        path.write_text(yaml.safe_dump(sweep))
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "jobs/sweep.py", "--config", str(path)],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        sweep_s = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        print(
            f"sweep of {args.trials} trials, {args.concurrent} at once: {sweep_s:.0f} s", flush=True
        )

        seq_runs = []
        t0 = time.perf_counter()
        for b in bins:
            run = subprocess.run(
                [
                    sys.executable, "jobs/train.py", "--config", "jobs/configs/vae-demo.yaml",
                    *common, f"model.bins={b}", f"run.name=bench-seq-{b}",
                    f"run.tracking_uri={uri}", "run.registered_model=bench-seq",
                ],
                cwd=ROOT, env=env, capture_output=True, text=True,
            )  # fmt: skip
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                return 1
            seq_runs.append(run.stdout.split("run: ")[-1].split()[0])
        seq_s = time.perf_counter() - t0
        print(f"{args.trials} sequential jobs/train.py runs: {seq_s:.0f} s", flush=True)

        client = MlflowClient(uri)
        parent = [ln for ln in done.stdout.splitlines() if ln.startswith("run: ")][-1].split()[1]
        experiment = client.get_run(parent).info.experiment_id
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
        print()
        print(f"{'':34}{'sweep':>10}{'sequential':>12}{'ratio':>8}")
        print(f"{'wall time (s)':34}{sweep_s:>10.0f}{seq_s:>12.0f}{sweep_s / seq_s:>8.2f}")
        print(f"{'  target':34}{'':>10}{'':>12}{0.65:>8.2f}")
        rows = {
            "sweep": [first_report(client, r.info.run_id) for r in children],
            "sequential": [first_report(client, r) for r in seq_runs],
        }
        for label, pick in (
            ("start -> first epoch report (s)", lambda v: v[0]),
            ("epoch (s)", lambda v: v[1]),
            ("start -> first step, est. (s)", lambda v: v[0] - v[1]),
        ):
            a = sum(pick(v) for v in rows["sweep"]) / len(rows["sweep"])
            b = sum(pick(v) for v in rows["sequential"]) / len(rows["sequential"])
            print(f"{label:34}{a:>10.1f}{b:>12.1f}{a / b if b else float('nan'):>8.2f}")
        print("(per trial means; a sequential run's own start also includes its process and Ray)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
