"""Science check: the VQ-VAE as a discrete compressor of precipitation, beside the
quantized-loss VAE of about the same size.

    .venv/bin/python benchmarks/compressor.py [--steps 400] [--quick] [--batch 32]
        [--lr 2e-4] [--vq-output sigmoid|linear] [--window 8 12 12] [--split-year 2011]
        [--threads 1] [--seed 0] [--data ../shared/data/fraser_daily_1986_2017.nc]

Data: the Fraser daily precipitation (``../shared/data/fraser_daily_1986_2017.nc``, 14 x 31 at
0.1 deg, mm/day, no missing values, read in place), ingested into two temporary stores split by
time: train 1986 to ``--split-year - 1``, test ``--split-year`` to 2018-01-02 (no test day in
any training window). Both models are scaled by ``for_data`` with the TRAIN store's statistics
(unit scaling of [0, train max]); the quantized MSE uses the train store's histogram edges.
Skipped with a message when the file is absent.

Method:

1. Training windows (``--window``, time x y x x, the VAE benchmark's 8 x 12 x 12 by default)
   are drawn at random positions of the train store's field; test windows are every
   non-overlapping block of ``window[0]`` days of the test store at 6 spatial positions that
   cover the grid (y 0 / 2, x 0 / 12 / 19).
2. Three models, each trained for ``--steps`` Adam steps (lr ``--lr``) of batch ``--batch``
   through ``cloudburst.training.loop.train_steps`` (``LossModule``): ``vqvae-rec`` and
   ``vqvae-rec+wqt``, the same VQ-VAE (``VQ`` below; no discriminator) with the plain and the
   quantized reconstruction objective on its decoder output, and ``vae-rec+wqt``, the
   project's quantized-loss VAE (MMD regulariser, latent 16) whose widths (w, 2w, c) are
   chosen to bring its parameter count closest to the VQ-VAE's. The VQ-VAE's own learning
   rate (4.5e-6, the study's) is far too slow for a few hundred steps; all three share
   ``--lr``. With the sigmoid output (the family's default, and the VAE's), plain ``rec``
   drives the VQ-VAE's output to about 0 (nearly every pixel dry) within about 100 steps at
   any lr from 1e-4 to 1e-3 on this field, and it barely comes back (after 400 steps at 2e-4
   its 0.99 quantile is 1.3 mm/day against the inputs' 17): the table shows it as the near
   trivial compressor it is then. ``--vq-output linear`` avoids the saturated sigmoid (the
   physical values are clipped at 0 anyway). The VAE has no active latent unit after 400
   steps at 2e-4 or 5e-4 (MMD posterior collapse: one field for every window); at 5e-4 that
   field is dry as well, at 2e-4 it is wet: the reference is a weak one at this budget.
3. On the test windows, physical units (mm/day): MSE over all pixels, the quantized MSE of the
   top 5 / top 10 non-empty histogram bins (``reconstructor_scores``, ``reconstruction_scores``
   for the VAE), each also as a ratio to the VAE's; for the VQ-VAEs the share of codes used and
   the code perplexity on these windows.
4. Compression: each VQ-VAE is packaged (``PrecipitationModel``, saved and loaded back) and
   ``encode_store`` encodes the whole test store (blocks of ``window[0]`` days over the whole
   14 x 31 grid). Bit ratio: the encoder's ``compression_ratio`` of that store (float32 bits
   of a block over its code bits, codebook left out). On-disk ratio: ``stored_bytes`` of the
   test store's ``precip`` against the codes store's ``codes`` + ``codebook`` (+ ``valid``),
   both after Zarr's own compression. ``decode_store`` gives the field back; its MSE against
   the test store's values (whole frames) is the "decoded MSE". For the VAE the bit ratio is
   the window in float32 over its float32 latent code (``latent`` numbers a window), for
   context only: no VAE codes store is written.

Cost on 2 CPU cores (1 torch thread): about 5 minutes with the defaults, about 80 s of
training per model and 25 s of encoding and decoding per VQ-VAE (twice that when the cores are
shared); ``--quick``: 80 steps and 1 test window in 4, about a minute.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import DATA  # before cloudburst: package path, quiet defaults
from cloudburst.config import VAEConfig
from cloudburst.data.ingest import StoreStats, ingest, open_store
from cloudburst.data.sources import PRECIP
from cloudburst.data.transforms import for_data
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.scoring import reconstruction_scores, reconstructor_scores
from cloudburst.models.vae import parameter_count
from cloudburst.models.vqvae import VQVAEConfig, codebook_scores
from cloudburst.products.codes import (
    compression_ratio,
    decode_store,
    encode_store,
    stored_bytes,
)
from cloudburst.training.loop import LossModule, train_steps

FRASER = DATA / "fraser_daily_1986_2017.nc"
END = "2018-12-31"
# the VQ-VAE of the comparison: CPU-sized, downsample 4, no discriminator
VQ = {
    "codebook_size": 512,
    "code_dim": 64,
    "widths": (16, 32),
    "residual_blocks": 1,
    "downsample": 4,
    "adversarial_weight": 0.0,
}
VAE_LATENT = 16
VAE_BASE_WIDTHS = range(4, 17)  # candidates w of the VAE's widths (w, 2w, c), 2w <= c <= 6w


# ------------------------------------------------------------------------------- data


@dataclass
class Split:
    train_store: str
    test_store: str
    train: np.ndarray  # (time, y, x) mm/day
    test: np.ndarray
    stats: StoreStats  # the train store's


def load_split(data: Path, tmp: Path, split_year: int) -> Split:
    """Ingest the file into a train and a test store (by time) and read both fields."""
    stores = {
        "train": (None, f"{split_year - 1}-12-31"),
        "test": (f"{split_year}-01-01", END),
    }
    fields: dict[str, np.ndarray] = {}
    urls: dict[str, str] = {}
    stats: StoreStats | None = None
    for part, (start, end) in stores.items():
        url = str(tmp / f"{part}.zarr")
        result = ingest(str(data), url, time_start=start, time_end=end, progress=False)
        ds, part_stats = open_store(url)
        fields[part] = np.asarray(ds[PRECIP].values, dtype=np.float32)
        urls[part] = url
        if part == "train":
            stats = part_stats
        times = ds.time.values
        print(
            f"  {part}: {url} {result.shape[0]} days {str(times[0])[:10]} to "
            f"{str(times[-1])[:10]}, max {part_stats.max:.1f} {part_stats.units}"
        )
    assert stats is not None
    return Split(urls["train"], urls["test"], fields["train"], fields["test"], stats)


def random_windows(
    values: np.ndarray, window: tuple[int, int, int], n: int, rng: np.random.Generator
) -> np.ndarray:
    t, y, x = window
    a = rng.integers(0, values.shape[0] - t + 1, n)
    b = rng.integers(0, values.shape[1] - y + 1, n)
    c = rng.integers(0, values.shape[2] - x + 1, n)
    return np.stack(
        [values[i : i + t, j : j + y, k : k + x] for i, j, k in zip(a, b, c, strict=True)]
    )


def test_windows(values: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
    """Every non-overlapping time block at spatial offsets that cover the whole grid."""
    t, y, x = window
    nt, ny, nx = values.shape

    def offsets(n: int, w: int) -> list[int]:
        return sorted({*range(0, n - w + 1, w), n - w})

    return np.stack(
        [
            values[a : a + t, b : b + y, c : c + x]
            for a in range(0, nt - t + 1, t)
            for b in offsets(ny, y)
            for c in offsets(nx, x)
        ]
    )


# ---------------------------------------------------------------------------- models


@dataclass
class Result:
    name: str
    packaged: PrecipitationModel
    parameters: int
    train_seconds: float
    final_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def matched_vae(window: tuple[int, int, int], target: int) -> VAEConfig:
    """The VAE config (widths (w, 2w, c), latent 16, rec+wqt) whose parameter count is
    closest to ``target``."""
    best: tuple[int, VAEConfig] | None = None
    for w in VAE_BASE_WIDTHS:
        for c in range(2 * w, 6 * w + 1, 2):
            cfg = VAEConfig(widths=(w, 2 * w, c), latent=VAE_LATENT, loss="rec+wqt")
            gap = abs(parameter_count(registry.build("vae", cfg, window)) - target)
            if best is None or gap < best[0]:
                best = (gap, cfg)
    assert best is not None
    return best[1]


def train(
    name: str,
    family: str,
    cfg: Any,
    split: Split,
    window: tuple[int, int, int],
    args: argparse.Namespace,
) -> Result:
    torch.manual_seed(args.seed)
    net = registry.build(family, cfg, window)
    packaged = PrecipitationModel(net, family, cfg, window, for_data(split.stats), split.stats)
    rng = np.random.default_rng(args.seed)

    def batches():
        while True:
            x = packaged.to_model_space(random_windows(split.train, window, args.batch, rng))
            tensor = torch.from_numpy(x)[:, None]
            yield {"x": tensor, "mask": torch.ones_like(tensor, dtype=torch.bool)}

    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    losses = []
    t0 = time.perf_counter()
    for metrics in train_steps(LossModule(net), batches(), optimizer, max_steps=args.steps):
        losses.append(metrics["loss"])
    seconds = time.perf_counter() - t0
    net.eval()
    loss = float(np.mean(losses[-20:]))
    print(f"  {name}: {args.steps} steps in {seconds:.1f} s, final loss {loss:.4g}", flush=True)
    return Result(name, packaged, parameter_count(net), seconds, loss)


def score(result: Result, x: torch.Tensor, mask: torch.Tensor, edges: torch.Tensor) -> None:
    """Test-window scores in physical units into ``result.metrics``."""
    packaged = result.packaged
    net = packaged.model
    fn = reconstruction_scores if packaged.name == "vae" else reconstructor_scores
    rec = fn(net, x, mask, packaged.transform, edges, prefix="test_")
    m = result.metrics
    m.update(rec.metrics)
    valid = mask.bool()
    m["mse"] = float(((rec.phys_hat - rec.phys)[valid] ** 2).mean())
    if packaged.name == "vqvae":
        codes = codebook_scores(net, x)
        m["usage"], m["perplexity"] = codes["val_codebook_usage"], codes["val_perplexity"]


def compress(result: Result, split: Split, tmp: Path, window: tuple[int, int, int]) -> None:
    """Package, encode the test store, measure the stores and decode it back."""
    folder = result.packaged.save(tmp / f"{result.name}-model")
    packaged = PrecipitationModel.load(folder)
    out = str(tmp / f"{result.name}-codes.zarr")
    t0 = time.perf_counter()
    marker = encode_store(packaged, split.test_store, out, model_uri=str(folder), progress=False)
    encode_seconds = time.perf_counter() - t0
    source_bytes = stored_bytes(split.test_store, prefix=PRECIP)
    parts = {p: stored_bytes(out, prefix=p) for p in ("codes", "codebook", "valid")}
    t0 = time.perf_counter()
    decoded = decode_store(packaged, out)
    decode_seconds = time.perf_counter() - t0
    valid = np.isfinite(split.test)
    m = result.metrics
    m["bit_ratio"] = float(marker["ratio"])
    cfg = packaged.config
    f = int(cfg["downsample"])
    code_window = (window[0], math.ceil(window[1] / f), math.ceil(window[2] / f))
    m["window_bit_ratio"] = compression_ratio(window, code_window, int(cfg["codebook_size"]))
    m["disk_ratio"] = source_bytes / sum(parts.values())
    m["disk_ratio_no_codebook"] = source_bytes / (parts["codes"] + parts["valid"])
    m["codebook_bytes"] = float(parts["codebook"])
    m["decoded_mse"] = float(np.mean((decoded[valid] - split.test[valid]) ** 2))
    m["store_usage"], m["store_perplexity"] = marker["codebook_usage"], marker["perplexity"]
    print(
        f"  {result.name}: codes {marker['code_shape']} ({marker['codes']:,} codes), "
        f"encode {encode_seconds:.1f} s, decode {decode_seconds:.1f} s; bytes: source "
        f"{source_bytes:,}, " + ", ".join(f"{k} {v:,}" for k, v in parts.items() if v),
        flush=True,
    )


# ------------------------------------------------------------------------------ table


def fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, spec)


def table(results: list[Result], ref: Result) -> str:
    head = [
        "model",
        "parameters",
        "bit ratio",
        "on-disk ratio",
        "MSE",
        "/VAE",
        "qMSE top5",
        "/VAE",
        "qMSE top10",
        "/VAE",
        "decoded MSE",
        "codebook usage",
        "perplexity",
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    r0 = ref.metrics
    for r in results:
        m = r.metrics
        cells = [
            r.name,
            f"{r.parameters:,}",
            fmt(m.get("bit_ratio"), ".1f") + ("" if r.packaged.name == "vqvae" else " (latent)"),
            fmt(m.get("disk_ratio"), ".1f"),
        ]
        for key in ("mse", "test_qmse_top5", "test_qmse_top10"):
            cells += [fmt(m.get(key)), fmt(m[key] / r0[key], ".3f")]
        cells += [
            fmt(m.get("decoded_mse")),
            fmt(m["usage"], ".1%") if "usage" in m else "-",
            fmt(m.get("perplexity"), ".1f"),
            f"{r.train_seconds:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="Adam steps per model (400; --quick 80)")
    p.add_argument("--quick", action="store_true", help="80 steps, 1 test window in 4")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument(
        "--vq-output",
        choices=["sigmoid", "linear"],
        default="sigmoid",
        help="the VQ-VAEs' output activation (the VAE's is always sigmoid)",
    )
    p.add_argument("--window", type=int, nargs=3, default=[8, 12, 12], metavar=("T", "Y", "X"))
    p.add_argument("--split-year", type=int, default=2011, help="first test year")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=FRASER)
    args = p.parse_args()
    if args.steps is None:
        args.steps = 80 if args.quick else 400
    if not args.data.is_file():
        print(f"skipped: {args.data} (the real Fraser sample) is absent")
        return 0
    torch.set_num_threads(args.threads)
    window = tuple(args.window)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="cloudburst-compressor-") as name:
        tmp = Path(name)
        print(f"data: {args.data}")
        split = load_split(args.data, tmp, args.split_year)
        transform = for_data(split.stats)
        test = test_windows(split.test, window)
        if args.quick:
            test = test[::4]
        x = torch.from_numpy(transform.forward(np.nan_to_num(test, nan=0.0)).astype(np.float32))
        x = x[:, None]
        mask = torch.from_numpy(np.isfinite(test))[:, None]
        edges = torch.tensor(split.stats.histogram_edges, dtype=torch.float64)

        vq = VQVAEConfig(**VQ, output=args.vq_output)
        size = parameter_count(registry.build("vqvae", vq, window))
        vae = matched_vae(window, size)
        configs = {
            "vqvae-rec": ("vqvae", vq.model_copy(update={"loss": "rec"})),
            "vqvae-rec+wqt": ("vqvae", vq.model_copy(update={"loss": "rec+wqt"})),
            "vae-rec+wqt": ("vae", vae),
        }
        print(
            f"windows {window}: {len(test)} test windows; training: {args.steps} Adam steps, "
            f"batch {args.batch}, lr {args.lr:g}, {args.threads} torch thread(s)",
            flush=True,
        )
        results = [train(n, fam, cfg, split, window, args) for n, (fam, cfg) in configs.items()]
        for r in results:
            score(r, x, mask, edges)
            if r.packaged.name == "vqvae":
                compress(r, split, tmp, window)
            else:
                r.metrics["bit_ratio"] = math.prod(window) / vae.latent

    ref = results[-1]
    print(f"\ncommand: {command}")
    print(
        f"data: Fraser daily, {split.train.shape[1]} x {split.train.shape[2]} grid, train "
        f"{split.train.shape[0]} days (to {args.split_year - 1}), test {split.test.shape[0]} "
        f"days ({args.split_year} on); scaling for_data(train stats): [0, "
        f"{split.stats.max:.1f}] mm/day -> [0, 1]; {len(test)} test windows {window}"
    )
    print(
        f"training: {args.steps} Adam steps, batch {args.batch}, lr {args.lr:g}, seed {args.seed}"
    )
    print(
        f"vqvae config: {VQ}; other fields at their defaults (beta {vq.beta:g}, ema "
        f"{vq.ema}, dead codes restarted after {vq.dead_code_steps} steps), output "
        f"{vq.output}"
    )
    print(
        f"vae config: widths {vae.widths}, latent {vae.latent}, regulariser {vae.regulariser}, "
        f"bins {vae.bins} (parameters matched to the VQ-VAE's {size:,})"
    )
    print("\ntest windows, physical units (mm/day; MSE in (mm/day)^2); /VAE: ratio to vae-rec+wqt")
    print(table(results, ref))
    vq0 = results[0].metrics
    print(
        f"\nbit ratio: encode_store's compression_ratio over the test store's blocks of "
        f"{window[0]} days x whole grid ({vq0['bit_ratio']:.1f}; per training window "
        f"{vq0['window_bit_ratio']:.1f}); VAE: float32 window over its float32 latent of "
        f"{vae.latent} numbers.\non-disk ratio: stored_bytes of the test store's precip over "
        f"the codes store's codes + codebook (+ valid). decoded MSE: decode_store against the "
        f"test store, whole frames."
    )
    for r in results:
        m = r.metrics
        extra = ""
        if "store_usage" in m:
            extra = (
                f"; whole test store: usage {m['store_usage']:.1%}, perplexity "
                f"{m['store_perplexity']:.1f}, on-disk ratio without the codebook "
                f"({m['codebook_bytes']:,.0f} bytes) {m['disk_ratio_no_codebook']:.1f}"
            )
        if "test_active_units" in m:
            extra = f", active latent units {m['test_active_units']:.0f} of {vae.latent}"
        print(
            f"  {r.name}: final train loss {r.final_loss:.4g}; q0.99 {m['test_q0.99_recon']:.2f} "
            f"/ q0.999 {m['test_q0.999_recon']:.2f} mm/day (inputs {m['test_q0.99_input']:.2f} / "
            f"{m['test_q0.999_input']:.2f}){extra}"
        )
        if not m["test_q0.99_recon"] > 0:
            print(
                f"    note: {r.name} reconstructs (nearly) every test pixel as dry: its "
                "output collapsed to 0 in this short training"
            )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
