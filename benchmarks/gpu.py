"""GPU figures of the two model families: training throughput in fp32 and bf16, ensemble
members/s against batch size, whether a member regenerated alone on CUDA keeps its bytes, and
the cost of a diffusion model's extreme direction.

    python3 benchmarks/gpu.py [--quick] [--device cuda|cpu] [--seconds S]

Self-contained: it imports only ``cloudburst.models.*``, ``cloudburst.training.loop`` and (when
it imports) ``cloudburst.ensembles.proposals`` from ``platform/`` (torch, numpy and pydantic;
scipy and pyyaml for the proposals), not ``benchmarks/_common.py``, MLflow, Ray or Zarr, so it
runs on a bare GPU machine with pydantic's wheels on the path. Networks are untrained (their
zero-initialised layers, which make an untrained U-Net output exactly 0, are filled with small
random weights so that outputs depend on inputs); weights do not change the cost.

(a) training: samples/s of ``model.loss`` + backward + Adam step of the diffusion model
    (``DiffusionConfig()``: widths 32/64/128, window 8x64x64, batch 16) and of the VAE
    (``VAEConfig()``: widths 64/128/256, latent 30; and the vae-fraser network, widths
    8/16/32, latent 16; both at vae-fraser's 8x12x12 windows, batch 32), fp32 against bf16
    autocast (``cloudburst.training.loop.autocast``): samples/s, bf16/fp32 and peak memory;
(b) ensembles: members/s of ``DiffusionModel.sample`` (DDIM and ancestral, 20 steps, fp32,
    batch 16/64/256) with one CPU generator per row, seeded as the engine does
    (``generate.sample_streams``), with one CPU generator for the batch and with one CUDA
    generator (noise drawn on the GPU), and of VAE decoding (batch 256/1024/4096) with z drawn
    per member from ``member_rng`` (the engine) or by one randn on the GPU; the host copy of
    the members is included;
(c) determinism: member k regenerated alone (its batch padded to the same size with other
    streams, as the engine does) against its row in the full batch, each run twice, for the
    DDIM and ancestral samplers and VAE decoding, with cuDNN's defaults and with
    ``cudnn.deterministic``; and one member on the CPU against CUDA (TF32 convolutions on,
    PyTorch's default, and off);
(d) ``DiffusionModel.extreme_direction(None, draws=4, steps=10)`` at the default size.

Every section and row is guarded: a failure is recorded and the rest still run. With ``OUT``
set, all figures go to ``$OUT/gpu.json`` (rewritten after each section). ``--quick``: tiny
networks and few iterations, for a check on a CPU (under a minute). About 2-3 minutes on one
H200.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform as host
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "platform") not in sys.path:
    sys.path.insert(0, str(ROOT / "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cloudburst.models.diffusion import DiffusionConfig, DiffusionModel  # noqa: E402
from cloudburst.models.vae import VAE, VAEConfig  # noqa: E402
from cloudburst.training.loop import autocast  # noqa: E402

try:  # the engine's per-member streams (imports pydantic, scipy and pyyaml through config)
    from cloudburst.ensembles.proposals import member_rng

    MEMBER_RNG = "cloudburst.ensembles.proposals.member_rng"
except Exception as exc:  # noqa: BLE001 - the same function, kept here for a bare machine
    MEMBER_RNG = f"local copy ({type(exc).__name__}: {exc})"

    def member_rng(seed: int, k: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([int(seed), int(k)]))


SEED = 2024  # the ensemble request's seed
STEPS = 20  # sampler steps of (b) and (c)
FRASER_WINDOW = (8, 12, 12)  # jobs/configs/vae-fraser.yaml: windows {length: 8, size: 12}


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "diffusion": (DiffusionConfig(widths=(4, 8), embedding=8), (4, 16, 16)),
            "vaes": {
                "vae": (VAEConfig(widths=(8, 16), latent=8), (4, 8, 8)),
                "vae-fraser": (VAEConfig(widths=(4, 8), latent=4), (4, 8, 8)),
            },
            "train_batch": {"diffusion": 2, "vae": 8},
            "sample_batches": (2, 4),
            "decode_batches": (16, 64),
            "steps": 3,
            "det_batch": 4,
            "det_member": 1,
            "warmup": 2,
        }
    return {
        "diffusion": (DiffusionConfig(), (8, 64, 64)),
        "vaes": {
            "vae": (VAEConfig(), FRASER_WINDOW),
            "vae-fraser": (VAEConfig(widths=(8, 16, 32), latent=16), FRASER_WINDOW),
        },
        "train_batch": {"diffusion": 16, "vae": 32},
        "sample_batches": (16, 64, 256),
        "decode_batches": (256, 1024, 4096),
        "steps": STEPS,
        "det_batch": 64,
        "det_member": 5,
        "warmup": 3,
    }


# ------------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def timed(
    fn: Callable[[], Any], device: torch.device, seconds: float, min_calls: int = 1
) -> tuple[float, int]:
    """(seconds per call, calls): ``fn`` called until ``seconds`` have passed (synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    calls = 0
    while True:
        fn()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if calls >= min_calls and elapsed >= seconds:
            return elapsed / calls, calls


def members_rate(members: int, fn: Callable[[], Any], device: torch.device, seconds: float) -> dict:
    """Members/s of ``fn`` making ``members`` per call, its calls and peak memory."""
    reset_peak(device)
    per_call, calls = timed(fn, device, seconds)
    return {
        "members_per_s": members / per_call,
        "s_per_call": per_call,
        "calls": calls,
        "peak_mib": peak_mib(device),
    }


def randomise_zero_layers(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Fill weights that are exactly zero (the U-Net's identity-initialised blocks and output
    layer) with N(0, std^2), so that an untrained network's output depends on its input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_diffusion(cfg: DiffusionConfig, window: tuple[int, ...], device: torch.device) -> Any:
    torch.manual_seed(0)
    model = DiffusionModel(cfg, window)
    randomise_zero_layers(model)
    return model.to(device)


def build_vae(cfg: VAEConfig, window: tuple[int, ...], device: torch.device) -> Any:
    torch.manual_seed(0)
    return VAE(cfg, window).to(device)


def windows(n: int, window: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch like the loader's: skewed values in [0, 1], 2 % of pixels masked out."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand((n, 1, *window), generator=g) ** 4
    mask = torch.rand((n, 1, *window), generator=g) > 0.02
    return {"x": x.to(device), "mask": mask.to(device)}


def stream_seed(k: int) -> int:
    """The engine's seed of draw k's noise streams (``sample_streams``)."""
    return int(member_rng(SEED, k).integers(2**62))


def padded_generators(rows: list[int], batch: int) -> list[torch.Generator]:
    """One CPU generator per row for draws ``rows``, padded to ``batch`` rows with streams of
    their own, as ``sample_streams`` does."""
    seeds = [stream_seed(k) for k in rows]
    seeds += [int(member_rng(SEED, 2**62 + j).integers(2**62)) for j in range(batch - len(rows))]
    return [torch.Generator().manual_seed(s) for s in seeds]


def latent_rows(rows: range | list[int], latent: int) -> np.ndarray:
    """z of draws ``rows`` from the engine's per-member streams (the prior proposal)."""
    return np.stack([member_rng(SEED, k).standard_normal(latent) for k in rows]).astype(np.float32)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0.0:
            return "0"
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n{title}")
    cells = [[fmt(r.get(c)) if "error" not in r or c in r else "" for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r, row in zip(rows, cells, strict=True):
        line = "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
        if "error" in r:
            line += f"  ERROR {r['error']}"
        print(line.rstrip())
    sys.stdout.flush()


def guarded(row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``row`` updated with ``fn()``'s figures, or with its error."""
    try:
        row.update(fn())
    except Exception as exc:  # noqa: BLE001 - one row's failure must not stop the others
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        traceback.print_exc(limit=3)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------ (a) training


def train_section(args: argparse.Namespace, device: torch.device, size: dict) -> dict:
    specs: list[tuple[str, Callable[[], Any], tuple[int, ...], int]] = []
    cfg, window = size["diffusion"]
    specs.append(
        (
            "diffusion",
            lambda: build_diffusion(cfg, window, device),
            window,
            size["train_batch"]["diffusion"],
        )
    )
    for name, (vcfg, vwindow) in size["vaes"].items():
        specs.append(
            (
                name,
                lambda vcfg=vcfg, vwindow=vwindow: build_vae(vcfg, vwindow, device),
                vwindow,
                size["train_batch"]["vae"],
            )
        )
    rows = []
    for name, build, window_, batch_size in specs:
        by_precision = {}
        for bf16 in (False, True):
            row: dict[str, Any] = {
                "model": name,
                "precision": "bf16" if bf16 else "fp32",
                "batch": batch_size,
                "window": "x".join(map(str, window_)),
            }

            def run(
                build: Callable[[], Any] = build, bf16: bool = bf16, bs: int = batch_size
            ) -> dict:
                model = build()
                model.train()
                opt = torch.optim.Adam(model.parameters(), lr=1e-4)
                batch = windows(bs, tuple(model.window), device)

                def step() -> None:
                    opt.zero_grad(set_to_none=True)
                    with autocast(device, bf16):
                        loss, _ = model.loss(batch)
                    if not math.isfinite(float(loss.detach())):
                        raise FloatingPointError(f"loss {float(loss)}")
                    loss.backward()
                    opt.step()

                for _ in range(size["warmup"]):
                    step()
                reset_peak(device)
                per_step, steps = timed(step, device, args.seconds, min_calls=3)
                return {
                    "samples_per_s": bs / per_step,
                    "ms_per_step": 1e3 * per_step,
                    "steps": steps,
                    "peak_mib": peak_mib(device),
                    "params": sum(p.numel() for p in model.parameters()),
                }

            rows.append(guarded(row, run))
            by_precision[row["precision"]] = row
        fp32, bf16_ = by_precision.get("fp32", {}), by_precision.get("bf16", {})
        if "samples_per_s" in fp32 and "samples_per_s" in bf16_:
            bf16_["bf16/fp32"] = bf16_["samples_per_s"] / fp32["samples_per_s"]
    note = None if device.type == "cuda" else "bf16 autocast is a no-op off CUDA (fp32 there)"
    table(
        "(a) training: loss + backward + Adam step" + (f" [{note}]" if note else ""),
        rows,
        [
            "model",
            "precision",
            "batch",
            "window",
            "samples_per_s",
            "ms_per_step",
            "bf16/fp32",
            "peak_mib",
            "steps",
        ],
    )
    return {"rows": rows, "note": note}


# ---------------------------------------------------------------------- (b) ensembles


def ensemble_section(args: argparse.Namespace, device: torch.device, size: dict) -> dict:
    steps = size["steps"]
    rows: list[dict[str, Any]] = []
    cfg, window = size["diffusion"]
    model = build_diffusion(cfg, window, device).eval()
    modes = ["per-row cpu gens", "one cpu gen"] + (
        ["one cuda gen"] if device.type == "cuda" else []
    )

    def call(bs: int, sampler: str, mode: str, steps: int = steps) -> None:
        if mode == "per-row cpu gens":
            u = model.sample(
                bs, generators=padded_generators(list(range(bs)), bs), steps=steps, sampler=sampler
            )
        elif mode == "one cpu gen":
            u = model.sample(
                bs, generator=torch.Generator().manual_seed(SEED), steps=steps, sampler=sampler
            )
        else:  # noise drawn on the device: factory calls default to it, with its own generator
            with torch.device(device):
                g = torch.Generator(device=device).manual_seed(SEED)
                u = model.sample(bs, generator=g, steps=steps, sampler=sampler)
        u.cpu()

    for sampler in ("ddim", "ancestral"):  # first calls of each path (kernels, generators)
        for mode in modes:
            try:
                call(size["sample_batches"][0], sampler, mode, 2)
            except Exception:  # noqa: BLE001 - the rows below record it
                traceback.print_exc(limit=3)
    for bs in size["sample_batches"]:
        try:  # the first call at a batch size (cuDNN's choices, allocator growth) is not timed
            model.sample(
                bs, generator=torch.Generator().manual_seed(0), steps=2, sampler="ddim"
            ).cpu()
        except Exception:  # noqa: BLE001 - the rows below record it
            traceback.print_exc(limit=3)
        for sampler in ("ddim", "ancestral"):
            for mode in modes:
                row: dict[str, Any] = {
                    "model": "diffusion",
                    "how": f"{sampler} {steps} steps",
                    "batch": bs,
                    "noise": mode,
                }

                def run(bs: int = bs, sampler: str = sampler, mode: str = mode) -> dict:
                    fn = lambda: call(bs, sampler, mode)  # noqa: E731
                    return members_rate(bs, fn, device, args.seconds / 2)

                rows.append(guarded(row, run))
    for name, (vcfg, vwindow) in size["vaes"].items():
        vae = build_vae(vcfg, vwindow, device).eval()
        latent = vae.latent_size
        for bs in size["decode_batches"]:
            with torch.no_grad():
                try:
                    vae.decode(torch.zeros(bs, latent, device=device)).cpu()
                except Exception:  # noqa: BLE001 - the rows below record it
                    traceback.print_exc(limit=3)
            for mode in ("per-member numpy z", "one device randn"):
                row = {"model": name, "how": "decode", "batch": bs, "noise": mode}

                @torch.no_grad()
                def decode(
                    bs: int = bs, mode: str = mode, vae: Any = vae, latent: int = latent
                ) -> None:
                    if mode == "per-member numpy z":
                        z = torch.from_numpy(latent_rows(range(bs), latent)).to(device)
                    else:
                        g = torch.Generator(device=device).manual_seed(SEED)
                        z = torch.randn(bs, latent, generator=g, device=device)
                    vae.decode(z).cpu()

                def run(bs: int = bs, decode: Callable[[], None] = decode) -> dict:
                    return members_rate(bs, decode, device, args.seconds / 2)

                rows.append(guarded(row, run))
        del vae
    # the cost of the engine's CPU-side noise: per-row against the device-side draw
    fastest: dict[tuple, float] = {}
    for r in rows:
        if "members_per_s" in r and r["noise"] in ("one cuda gen", "one device randn"):
            fastest[(r["model"], r["how"], r["batch"])] = r["members_per_s"]
    for r in rows:
        ref = fastest.get((r["model"], r["how"], r["batch"]))
        if ref and "members_per_s" in r:
            r["vs_device_noise"] = r["members_per_s"] / ref
    table(
        "(b) ensemble members/s (fp32; host copy included)",
        rows,
        [
            "model",
            "how",
            "batch",
            "noise",
            "members_per_s",
            "vs_device_noise",
            "s_per_call",
            "peak_mib",
            "calls",
        ],
    )
    return {"rows": rows, "steps": steps, "member_rng": MEMBER_RNG}


# -------------------------------------------------------------------- (c) determinism


class CudnnFlags:
    """Set cuDNN / TF32 flags for a block and restore them after."""

    def __init__(self, **flags: bool) -> None:
        self.flags = flags
        self.saved: dict[str, bool] = {}

    def __enter__(self) -> CudnnFlags:
        for name, value in self.flags.items():
            obj, attr = self._where(name)
            self.saved[name] = getattr(obj, attr)
            setattr(obj, attr, value)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            obj, attr = self._where(name)
            setattr(obj, attr, value)

    @staticmethod
    def _where(name: str) -> tuple[Any, str]:
        if name == "matmul_tf32":
            return torch.backends.cuda.matmul, "allow_tf32"
        return torch.backends.cudnn, name


def compare(
    full1: torch.Tensor, full2: torch.Tensor, alone1: torch.Tensor, alone2: torch.Tensor, k: int
) -> dict:
    return {
        "full_repeat_identical": bool(torch.equal(full1, full2)),
        "alone_identical": bool(torch.equal(alone1, full1[k])),
        "alone_repeat_identical": bool(torch.equal(alone1, alone2)),
        "alone_vs_full_max_abs": float((alone1.double() - full1[k].double()).abs().max()),
        "full_repeat_max_abs": float((full1.double() - full2.double()).abs().max()),
    }


def determinism_section(args: argparse.Namespace, device: torch.device, size: dict) -> dict:
    steps, B, k = size["steps"], size["det_batch"], size["det_member"]
    settings = {"cudnn default": {}, "cudnn.deterministic": {"deterministic": True}}
    rows: list[dict[str, Any]] = []
    cross: list[dict[str, Any]] = []
    cfg, window = size["diffusion"]
    model = build_diffusion(cfg, window, device).eval()
    full_default: dict[str, torch.Tensor] = {}
    for sampler in ("ddim", "ancestral"):
        for setting, flags in settings.items():
            row: dict[str, Any] = {
                "check": f"diffusion {sampler} {steps} steps",
                "batch": B,
                "member": k,
                "setting": setting,
            }

            def run(sampler: str = sampler, flags: dict = flags, setting: str = setting) -> dict:
                with CudnnFlags(**flags):

                    def draw(rows: list[int]) -> torch.Tensor:
                        gens = padded_generators(rows, B)
                        return model.sample(B, generators=gens, steps=steps, sampler=sampler).cpu()

                    full1, full2 = draw(list(range(B))), draw(list(range(B)))
                    alone1, alone2 = draw([k])[0], draw([k])[0]
                if setting == "cudnn default":
                    full_default[sampler] = full1[k]
                return compare(full1, full2, alone1, alone2, k)

            rows.append(guarded(row, run))
    for name, (vcfg, vwindow) in size["vaes"].items():
        vae = build_vae(vcfg, vwindow, device).eval()
        batch = max(size["decode_batches"][0], B)
        z = latent_rows(range(batch), vae.latent_size)
        for setting, flags in settings.items():
            row = {"check": f"{name} decode", "batch": batch, "member": k, "setting": setting}

            @torch.no_grad()
            def run(
                flags: dict = flags,
                setting: str = setting,
                vae: Any = vae,
                z: np.ndarray = z,
                name: str = name,
            ) -> dict:
                alone = np.zeros_like(z)  # the engine pads with zero rows
                alone[0] = z[k]
                with CudnnFlags(**flags):
                    full1, full2 = (
                        vae.decode(torch.from_numpy(z).to(device)).cpu() for _ in range(2)
                    )
                    alone1, alone2 = (
                        vae.decode(torch.from_numpy(alone).to(device)).cpu()[0] for _ in range(2)
                    )
                if setting == "cudnn default":
                    full_default[name] = full1[k]
                return compare(full1, full2, alone1, alone2, k)

            rows.append(guarded(row, run))
        # one member on the CPU against its value in the full CUDA batch (TF32 on and off)
        row = {"member": f"{name} decode", "model": name}

        @torch.no_grad()
        def cpu_vae(vae: Any = vae, z: np.ndarray = z, name: str = name) -> dict:
            cpu = copy.deepcopy(vae).cpu()
            ref = cpu.decode(torch.from_numpy(z[k : k + 1]))[0]
            out = {
                "cpu_vs_device_max_abs": float(
                    (ref.double() - full_default[name].double()).abs().max()
                )
            }
            alone = np.zeros_like(z)
            alone[0] = z[k]
            with CudnnFlags(allow_tf32=False, matmul_tf32=False):
                off = vae.decode(torch.from_numpy(alone).to(device)).cpu()[0]
            out["cpu_vs_device_tf32_off_max_abs"] = float((ref.double() - off.double()).abs().max())
            out["cpu_identical_tf32_off"] = bool(torch.equal(ref, off))
            return out

        cross.append(guarded(row, cpu_vae))
        del vae
    for sampler in ("ddim",):
        row = {"member": f"diffusion {sampler} {steps} steps", "model": "diffusion"}

        def cpu_diffusion(sampler: str = sampler) -> dict:
            cpu = copy.deepcopy(model).cpu()
            t0 = time.perf_counter()
            ref = cpu.sample(1, generators=padded_generators([k], 1), steps=steps, sampler=sampler)[
                0
            ]
            out = {"cpu_seconds": time.perf_counter() - t0}
            out["cpu_vs_device_max_abs"] = float(
                (ref.double() - full_default[sampler].double()).abs().max()
            )
            with CudnnFlags(allow_tf32=False, matmul_tf32=False):
                gens = padded_generators([k], B)
                off = model.sample(B, generators=gens, steps=steps, sampler=sampler).cpu()[0]
            out["cpu_vs_device_tf32_off_max_abs"] = float((ref.double() - off.double()).abs().max())
            out["cpu_identical_tf32_off"] = bool(torch.equal(ref, off))
            return out

        cross.append(guarded(row, cpu_diffusion))
    table(
        f"(c) determinism on {device.type}: member {k} alone (padded batch) against its row in the "
        "full batch, each run twice",
        rows,
        [
            "check",
            "setting",
            "batch",
            "full_repeat_identical",
            "alone_identical",
            "alone_repeat_identical",
            "alone_vs_full_max_abs",
            "full_repeat_max_abs",
        ],
    )
    table(
        f"(c) one member on the CPU against {device.type} (its value in the full batch; TF32 off: "
        "regenerated alone with TF32 convolutions and matmuls off); values in [0, 1]",
        cross,
        [
            "member",
            "cpu_vs_device_max_abs",
            "cpu_vs_device_tf32_off_max_abs",
            "cpu_identical_tf32_off",
            "cpu_seconds",
        ],
    )
    identical = [
        r["check"] + " / " + r["setting"]
        for r in rows
        if r.get("alone_identical") and r.get("full_repeat_identical")
    ]
    differs = [
        r["check"] + " / " + r["setting"]
        for r in rows
        if r.get("alone_identical") is False or r.get("full_repeat_identical") is False
    ]
    print(
        "\nbyte-identical (alone = full row, and full = full again): "
        + ("; ".join(identical) or "none")
    )
    print("NOT byte-identical: " + ("; ".join(differs) or "none"))
    return {"rows": rows, "cpu_vs_device": cross, "identical": identical, "not_identical": differs}


# -------------------------------------------------------------- (d) extreme direction


def direction_section(args: argparse.Namespace, device: torch.device, size: dict) -> dict:
    cfg, window = size["diffusion"]
    model = build_diffusion(cfg, window, device)
    row: dict[str, Any] = {
        "model": "diffusion",
        "window": "x".join(map(str, window)),
        "draws": 4,
        "steps": 10,
    }

    def run() -> dict:
        model.extreme_direction(None, draws=4, steps=10)  # warm-up
        reset_peak(device)
        per_call, calls = timed(
            lambda: model.extreme_direction(None, draws=4, steps=10),
            device,
            args.seconds / 2,
            min_calls=3,
        )
        return {"seconds": per_call, "calls": calls, "peak_mib": peak_mib(device)}

    guarded(row, run)
    table(
        "(d) DiffusionModel.extreme_direction(None, draws=4, steps=10)",
        [row],
        ["model", "window", "draws", "steps", "seconds", "peak_mib", "calls"],
    )
    return row


# --------------------------------------------------------------------------------- main


def environment(device: torch.device, args: argparse.Namespace) -> dict:
    env = {
        "python": host.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else host.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "member_rng": MEMBER_RNG,
        "quick": args.quick,
        "seconds_per_measurement": args.seconds,
    }
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    return env


def write(results: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu.json").write_text(json.dumps(results, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny networks, few iterations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=None, help="time per measurement")
    parser.add_argument(
        "--only", nargs="*", choices=["train", "ensemble", "determinism", "direction"]
    )
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = 0.2 if args.quick else 2.0
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    size = sizes(args.quick)
    t_start = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(device, args), "seconds": {}}
    sections = {
        "train": train_section,
        "ensemble": ensemble_section,
        "determinism": determinism_section,
        "direction": direction_section,
    }
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            results[name] = fn(args, device, size)
        except Exception as exc:  # noqa: BLE001 - one section's failure must not stop the others
            traceback.print_exc(limit=5)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"\n{name}: ERROR {type(exc).__name__}: {exc}")
        results["seconds"][name] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(results)
    results["seconds"]["total"] = time.perf_counter() - t_start
    write(results)
    secs = " ".join(f"{k}={v:.1f}" for k, v in results["seconds"].items())
    print(
        f"\nseconds: {secs}"
        + (f"; figures in {os.environ['OUT']}/gpu.json" if os.environ.get("OUT") else "")
    )


if __name__ == "__main__":
    main()
