"""Diffusion sampling: speed and fidelity of the ancestral sampler at T steps and of DDIM.

    .venv/bin/python benchmarks/sampling.py [--model models:/NAME@ALIAS] [--samples 8]
        [--ancestral 25 100 500] [--ddim 25 50] [--device cpu|cuda]

For each sampler, ``--samples`` windows are drawn from the registered diffusion model (same
seeds for all) and compared with observed windows of the store it was trained on (its run's
``data.*`` params; up to 400 windows): members/s, the tail error (mean |log10| ratio of
generated to observed quantiles at 0.9, 0.99, 0.999 ... as far as the sample resolves) and
the spatial / temporal PSD errors (mean |log10| ratio). Each row is also given as a ratio to
ancestral at the largest T. Target: DDIM at >= 10x fewer steps with no worse tail and PSD
error than ancestral T=500. Train a model first, e.g. ``python benchmarks/diffusion_transforms.py``
(registers cloudburst-diffusion-radolan-learnt) or ``python jobs/train.py --config
jobs/configs/diffusion-radolan.yaml``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import _common  # noqa: F401 - before cloudburst: package path, quiet defaults
from cloudburst import tracking, versions
from cloudburst.evaluation.evaluate import EvaluationRequest
from cloudburst.evaluation.observations import observed_windows, run_params
from cloudburst.evaluation.spectra import radial_psd, temporal_psd
from cloudburst.models.roles import ConditionalSampler

LEVELS = (0.9, 0.99, 0.999, 0.9999, 0.99999)


def log_error(a: np.ndarray, b: np.ndarray) -> float:
    ok = (a > 0) & (b > 0)
    return float(np.mean(np.abs(np.log10(a[ok] / b[ok])))) if ok.any() else float("nan")


def tail_error(gen: np.ndarray, obs: np.ndarray) -> float:
    g, o = gen[np.isfinite(gen)], obs[np.isfinite(obs)]
    levels = [q for q in LEVELS if (1 - q) * min(g.size, o.size) >= 10]
    return log_error(np.quantile(g, levels), np.quantile(o, levels))


def spectra(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, p = radial_psd(np.nan_to_num(windows))
    _, pt = temporal_psd(np.moveaxis(np.nan_to_num(windows), 1, -1), axis=-1)
    return p, pt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models:/cloudburst-diffusion-radolan-learnt@candidate")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ancestral", type=int, nargs="*", default=[25, 100, 500])
    p.add_argument("--ddim", type=int, nargs="*", default=[25, 50])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tracking-uri")
    args = p.parse_args()

    uri = tracking.setup(args.tracking_uri)
    version, run_id = versions.pin(args.model, uri)
    packaged = tracking.load_model(version, tracking_uri=uri, map_location=args.device)
    if not packaged.plays(ConditionalSampler):
        print(
            f"{version} is a {packaged.name} model without an iterative sampler; give a "
            "diffusion model",
            file=sys.stderr,
        )
        return 2
    params = run_params(run_id, uri)
    store = params.get("data.store")
    request = EvaluationRequest(data=store, split="train@none", limit=400, models=[args.model])
    obs = observed_windows(request, packaged.window, params).x
    obs_p, obs_pt = spectra(obs)
    model = packaged.network(ConditionalSampler)
    print(
        f"{version} on {args.device}; {args.samples} samples of {packaged.window} against "
        f"{len(obs)} observed windows of {store}\n"
    )
    rows = []
    runs = [("ancestral", t) for t in args.ancestral] + [("ddim", t) for t in args.ddim]
    for sampler, steps in runs:
        out = []
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for a in range(0, args.samples, args.batch):
            n = min(args.batch, args.samples - a)
            g = torch.Generator().manual_seed(1000 + a)
            u = model.sample(n, generator=g, steps=steps, sampler=sampler)
            out.append(packaged.to_physical(u))
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        gen = np.concatenate(out)
        gp, gpt = spectra(gen)
        rows.append(
            {
                "sampler": f"{sampler} T={steps}",
                "steps": steps,
                "rate": args.samples / seconds,
                "tail": tail_error(gen, obs),
                "psd": log_error(gp, obs_p),
                "psd_t": log_error(gpt, obs_pt),
            }
        )
        r = rows[-1]
        print(f"  {r['sampler']:16} {seconds:8.1f} s", flush=True)
    ref = max((r for r in rows if r["sampler"].startswith("ancestral")), key=lambda r: r["steps"])
    print(
        f"\n{'sampler':16}{'members/s':>11}{'x speed':>9}{'tail err':>10}{'x ref':>7}"
        f"{'PSD err':>9}{'x ref':>7}{'tPSD err':>10}{'x ref':>7}"
    )
    for r in rows:
        print(
            f"{r['sampler']:16}{r['rate']:>11.3g}{r['rate'] / ref['rate']:>9.1f}"
            f"{r['tail']:>10.3f}{r['tail'] / ref['tail']:>7.2f}"
            f"{r['psd']:>9.3f}{r['psd'] / ref['psd']:>7.2f}"
            f"{r['psd_t']:>10.3f}{r['psd_t'] / ref['psd_t']:>7.2f}"
        )
    print(f"(errors: mean |log10| ratio to the observed; reference row: {ref['sampler']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
