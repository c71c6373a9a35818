"""Training overhead of Ray Train: the same VAE steps in a plain loop and in a TorchTrainer.

    .venv/bin/python benchmarks/train_overhead.py [--steps N] [--quick] [--device auto|cpu|cuda]

Both sides run IDENTICAL steps: the same model (VAEConfig(widths=(16, 32, 64), latent=16,
loss="rec+wqt") over 8x32x32 windows), initialised from the same seed, the same in-memory
synthetic batches of 32 (a pool generated from a fixed seed, cycled; no store, no loader), the
same Adam, ``cloudburst.training.loop.train_steps`` through ``LossModule``, ``--warmup`` untimed
steps then ``--steps`` timed ones, and ``torch.set_num_threads(2)`` on both sides (Ray sets
OMP_NUM_THREADS to the worker's CPUs, here 2, the plain loop gets the same explicitly):

(a) a plain PyTorch loop in this process;
(b) Ray Train: ``ray.init(num_cpus=2)`` in-process, a TorchTrainer with ONE worker
    (ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}), plus the GPU with --device
    cuda) whose train function builds the same model and batches, wraps the step module with
    ``ray.train.torch.prepare_model``, times its own section and reports samples/s through
    ``ray.train.report``.

The plain loop runs once before Ray starts and once after it has shut down; its figure is the
mean of the two (both printed). The overhead is 1 - Ray/plain samples/s, against a target of at
most 10 %. Ray's fixed costs (ray.init, and trainer.fit() wall time outside the worker's
training section) are printed separately. The final loss of each side is printed as a check that
the steps were the same. On CUDA the plain loop is also timed with bf16 autocast.

Cost: on 2 CPU cores one step takes about 2-3 s, so the default (10 + 60 steps, three runs)
takes about 10 minutes; --quick (3 + 10 steps) about 3. The figures are only as steady as the
machine: run it on an otherwise idle one (the before/after spread of the plain loop shows how
much the load moved). If another Ray instance runs on the same machine, Ray Train's
PlacementGroupCleaner logs "Found multiple active Ray instances"; harmless for the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

import _common  # noqa: F401 - before cloudburst: package path, quiet defaults
from cloudburst.config import VAEConfig
from cloudburst.models.vae import VAE, parameter_count
from cloudburst.training.loop import LossModule, train_steps

THREADS = 2
WINDOW = (8, 32, 32)
BATCH = 32
POOL = 8  # distinct batches, cycled
SEED = 0
TARGET = 0.10


def vae_config() -> VAEConfig:
    return VAEConfig(widths=(16, 32, 64), latent=16, loss="rec+wqt")


def make_batches(n: int = POOL, seed: int = SEED) -> list[dict[str, torch.Tensor]]:
    """Precipitation-like windows in [0, 1]: about 30 % wet cells, 2 % masked out."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        shape = (BATCH, 1, *WINDOW)
        wet = torch.rand(shape, generator=gen) < 0.3
        x = torch.where(wet, torch.rand(shape, generator=gen) ** 3, torch.zeros(shape))
        mask = torch.rand(shape, generator=gen) >= 0.02
        out.append({"x": x * mask, "mask": mask})
    return out


def cycle(batches: list[dict[str, torch.Tensor]], n: int):
    for i in range(n):
        yield batches[i % len(batches)]


def run_steps(
    step_module: torch.nn.Module,
    core: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    warmup: int,
    steps: int,
    mixed: bool,
) -> dict[str, float]:
    """``warmup`` untimed then ``steps`` timed optimisation steps; samples/s of the timed part."""
    optimizer = torch.optim.Adam(core.parameters(), lr=1e-3)
    kw = {"device": device, "mixed_precision": mixed}
    for _ in train_steps(step_module, cycle(batches, warmup), optimizer, **kw):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    for metrics in train_steps(step_module, cycle(batches, steps), optimizer, **kw):
        last = metrics
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {"s": dt, "samples_per_s": steps * BATCH / dt, "loss": float(last.get("loss", "nan"))}


def plain(device: torch.device, warmup: int, steps: int, mixed: bool = False) -> dict[str, float]:
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    model = VAE(vae_config(), WINDOW).to(device)
    batches = make_batches()
    return run_steps(LossModule(model), model, batches, device, warmup, steps, mixed)


def ray_train_fn(config: dict[str, Any]) -> None:
    """The Ray Train worker: the same model, batches and steps as :func:`plain`."""
    import ray.train
    import ray.train.torch

    started = time.time()
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    device = ray.train.torch.get_device()
    model = VAE(vae_config(), WINDOW)
    step_module = ray.train.torch.prepare_model(LossModule(model))
    core = model.to(device)
    batches = make_batches()
    out = run_steps(
        step_module, core, batches, device, config["warmup"], config["steps"], config["mixed"]
    )
    out["worker_start"] = started
    out["worker_end"] = time.time()
    out["threads"] = float(torch.get_num_threads())
    # Train V2 keeps only checkpointed reports in Result.metrics: attach a small one.
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump(out, f)
        ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(folder))


def ray_side(device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = device.type == "cuda"
    t0 = time.time()
    ray.init(num_cpus=THREADS, num_gpus=1 if use_gpu else 0)
    try:
        init_s = time.time() - t0
        with tempfile.TemporaryDirectory(prefix="cloudburst-train-overhead-") as tmp:
            trainer = TorchTrainer(
                ray_train_fn,
                train_loop_config={"warmup": warmup, "steps": steps, "mixed": False},
                scaling_config=ScalingConfig(
                    num_workers=1, use_gpu=use_gpu, resources_per_worker={"CPU": THREADS}
                ),
                run_config=RunConfig(name="train-overhead", storage_path=tmp),
            )
            t1 = time.time()
            result = trainer.fit()
            t2 = time.time()
            m = dict(result.metrics or {})
            if not m and result.checkpoint is not None:
                with result.checkpoint.as_directory() as folder:
                    with open(os.path.join(folder, "metrics.json")) as f:
                        m = json.load(f)
        m.update(
            init_s=init_s,
            fit_s=t2 - t1,
            before_worker_s=m["worker_start"] - t1,
            after_worker_s=t2 - m["worker_end"],
            worker_s=m["worker_end"] - m["worker_start"],
        )
        return m
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (default 10)")
    parser.add_argument("--quick", action="store_true", help="10 timed steps after 3 warm-up")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()
    steps, warmup = (10, 3) if args.quick else (args.steps, args.warmup)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here")
        return 2
    device = torch.device(args.device)

    n_params = parameter_count(VAE(vae_config(), WINDOW))
    cfg = vae_config()
    print(
        f"VAE widths {cfg.widths}, latent {cfg.latent}, loss {cfg.loss}, {n_params:,} params; "
        f"windows {'x'.join(map(str, WINDOW))}, batch {BATCH} ({POOL} in-memory batches, "
        f"seed {SEED}); {warmup} warm-up + {steps} timed steps; torch threads {THREADS}; "
        f"device {device}"
    )
    before = plain(device, warmup, steps)
    ray_m = ray_side(device, warmup, steps)
    after = plain(device, warmup, steps)
    base = (before["samples_per_s"] + after["samples_per_s"]) / 2
    ray_rate = ray_m["samples_per_s"]
    ratio = ray_rate / base
    overhead = 1.0 - ratio

    print(f"\n  {'':34}{'samples/s':>11}{'ms/step':>9}{'Ray / this':>12}{'final loss':>12}")
    rows = [
        ("(a) plain loop, before Ray", before),
        ("(a) plain loop, after Ray", after),
        ("(a) plain loop, mean", {"samples_per_s": base, "loss": before["loss"]}),
        ("(b) Ray Train, 1 worker", ray_m),
    ]
    for name, m in rows:
        rate = m["samples_per_s"]
        print(
            f"  {name:34}{rate:11,.1f}{1000 * BATCH / rate:9.1f}{ray_rate / rate:11.3f}x"
            f"{m['loss']:12.5f}"
        )
    verdict = "meets" if overhead <= TARGET else "MISSES"
    print(
        f"\n  Ray Train overhead on the training section: {100 * overhead:+.1f} % "
        f"(ratio {ratio:.3f}); target <= {100 * TARGET:.0f} %: {verdict}"
    )
    print(
        f"  worker torch threads {ray_m['threads']:.0f}; same steps: final loss "
        f"{'identical' if ray_m['loss'] == before['loss'] else 'differs'}"
    )
    print(
        f"  Ray fixed costs: ray.init {ray_m['init_s']:.1f} s; trainer.fit() wall "
        f"{ray_m['fit_s']:.1f} s = {ray_m['before_worker_s']:.1f} s until the train function "
        f"starts + {ray_m['worker_s']:.1f} s in it + {ray_m['after_worker_s']:.1f} s after; "
        f"startup total (init + until start) {ray_m['init_s'] + ray_m['before_worker_s']:.1f} s"
    )

    if device.type == "cuda":
        fp32 = plain(device, warmup, steps)
        bf16 = plain(device, warmup, steps, mixed=True)
        print(f"\n  plain loop on {torch.cuda.get_device_name(device)}:")
        print(f"  {'':34}{'samples/s':>11}{'ms/step':>9}{'bf16 / this':>12}")
        for name, m in (("fp32", fp32), ("bf16 autocast", bf16)):
            rate = m["samples_per_s"]
            print(
                f"  {name:34}{rate:11,.1f}{1000 * BATCH / rate:9.1f}"
                f"{bf16['samples_per_s'] / rate:11.3f}x"
            )
    else:
        print(
            "\n  fp32 vs bf16 autocast: skipped, CUDA is not available (autocast bf16 is CUDA-only)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
