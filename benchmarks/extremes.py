"""Extreme scenarios: variance reduction of the importance-weighted exceedance estimator.

    .venv/bin/python benchmarks/extremes.py [--families vae diffusion]
        [--samplers ddim ancestral] [--members 200000 128000] [--is-members 20000 16000]
        [--shift 3 [2 4 5 ...]] [--defensive 0.1] [--direction-draws 64]
        [--proposals shift fitted] [--pilot-draws 1000 16000]
        [--window 4 8 8] [--train-steps 300 300] [--lr 2e-4 2e-3] [--steps 8]
        [--threads 1] [--data ../shared/data/fraser_daily_1986_2017.nc]

What is measured: how much an ``extreme`` scenario (``proposal: shift``, a defensive mixture of
the prior and N(shift d, I) over the model's standard-normal input z, members weighted by
p(z) / q(z)) lowers the variance of the estimate of P(window max > L) against plain Monte Carlo
draws of the same model (``unconditional``, weights 1), per member generated and per second,
for a VAE (z: its latent code, d: ``decoder_direction``) and a diffusion model (z: the
sampler's initial noise z_1, d: ``DiffusionModel.extreme_direction``, a gradient through a few
DDIM steps), with the DDIM and the ancestral sampler (whose step noise keeps its prior, so
steering z_1 alone is expected to do less there); and ``proposal: fitted``: for the VAE a
Gaussian N(m, C) over the latent fitted by the cross-entropy method to the model's own tail,
aimed at the 0.999 level; for diffusion a union of local events (a noise pattern placed
where maxima occur, one per edge class of places, learnt from the best 3% of 16,000 prior
pilot draws, each pattern's numbers that are noise alone shrunk to 0, the noise's variance
learnt along each pattern, around it and beyond it); pilot draws counted in
the cost (of the extreme run: its members/s and so its VRF per second).

Method:

1. Each model is trained briefly on CPU (a hand loop of ``--train-steps`` Adam steps, batch 16,
   ``net.loss({"x": windows in model space, "mask": all True})``) on random ``--window``
   windows of the Fraser daily file (14 x 31 grid, mm/day; the synthetic generator's data,
   with a printed note, when the file is absent). Sizes: VAE widths 8/16, latent 16 (its
   default loss rec+wqt and MMD); diffusion widths 8/16, embedding 16, sqrt transformation,
   ``--steps`` sampler steps. Learning rates: 2e-3 for diffusion, 2e-4 for the VAE (at 5e-4 and
   above its sigmoid decoder saturates to 0 within 300 steps: every window dry, no direction).
   The training seconds and final loss (mean of the last 20 steps) are printed. The packaged
   model is bound to requests directly (``ResolvedModel``, no MLflow).
2. Per family and sampler, one plain run (``--members``) and one extreme run per ``--shift``
   (``--is-members``, ``--defensive``) through ``cloudburst.ensembles.generate.Generator``
   (``draws``), timed: members/s, the extreme run's cost counting the Generator's construction
   (where the direction is computed) as well as its draws. ``--direction-draws N`` adds, for
   diffusion, extreme runs steered along ``extreme_direction(draws=N)`` given as
   ``scenario.direction`` (the engine averages 4 draws), its computation counted in the cost.
3. Levels L_0.99 and L_0.999: the 0.99 and 0.999 quantiles of the window maximum under the model
   itself, the plain run's empirical quantiles (so about N/1000 plain members exceed L_0.999),
   with the weighted quantile of the first extreme run printed beside as a cross-check.
4. At each level: p_plain and its stderr from the plain run; p_IS, its stderr and the Kish
   effective member count from ``cloudburst.ensembles.extremes.exceedance_probability``; their
   agreement z = |p_IS - p_plain| / sqrt(se_IS^2 + se_plain^2); per-member variances: plain
   p (1 - p) with p = p_IS (the lower-variance estimate), IS N_IS se_IS^2; VRF per member their
   ratio, VRF per second = VRF per member x (IS members/s) / (plain members/s).
5. A cross-check of the IS variance that does not depend on the extreme run hitting its rare
   high-weight events: E_q[w^2 1_A] = E_p[w 1_A], so the plain run's own z (re-drawn from its
   seeds; checked against the DDIM members, which z_1 alone fixes) give the IS variance per
   member as mean_plain(w(z) 1_A) - p^2, with p = p_plain ("VRF plain-z": the plain run's
   figures alone). Beside it, the mean of z.d over the
   plain run's exceedances: a shift proposal helps where this is near the shift, and cannot
   where it is near 0 (events not along one direction of z).

Target: VRF per member >= 10x at the 0.999 level for both families, by the extreme run's own
variance and, where it is computed, by the plain-z cross-check too (PASS / FAIL per row; the
benchmark reports and exits 0). A VRF of 10x or more counts only where p_IS agrees with
p_plain (agreement <= 2): an extreme run that misses its rare high-weight events
underestimates both p and se_IS, and so shows a large VRF that is not real. The plain-z
figure rests on the plain events beside it (``events``): with a few dozen it is itself
uncertain by tens of per cent.

Cost on 2 CPU cores (1 torch thread): about 20 minutes with the defaults (a diffusion plain run
of 128,000 members takes about 7.5 minutes per sampler, a fit's 16,000 pilot draws about 1); each
further shift, or ``--direction-draws``, adds about 15 s per diffusion sampler.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from _common import DATA  # before cloudburst: package path, quiet defaults
from cloudburst.config import DiffusionConfig, SyntheticConfig, VAEConfig
from cloudburst.data.transforms import Scale
from cloudburst.ensembles.extremes import exceedance_probability
from cloudburst.ensembles.generate import DIRECTION_STEPS, Generator, ResolvedModel
from cloudburst.ensembles.proposals import log_density_ratio, member_rng
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.union import UnionFit
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.roles import NoiseSteerable

LEVELS = (0.99, 0.999)
TARGET = 10.0  # VRF per member at the 0.999 level
AGREE = 2.0  # a VRF counts only where p IS is within this many stderrs of p plain
BATCH = 256  # members per model call
CHUNK = 2048  # members per draws() call (window maxima kept, windows dropped)
FRASER = DATA / "fraser_daily_1986_2017.nc"


# ------------------------------------------------------------------------------- data


def load_field(path: Path) -> tuple[np.ndarray, str]:
    """(precipitation (time, y, x) float32 in mm/day, where it came from)."""
    if path.is_file():
        import xarray as xr

        with xr.open_dataset(path) as ds:
            name = "precip" if "precip" in ds else next(iter(ds.data_vars))
            values = np.asarray(ds[name].values, dtype=np.float32)
        return (
            values,
            f"{path.name} ({values.shape[0]} days x {values.shape[1]} x {values.shape[2]})",
        )
    from cloudburst.data.ingest import PRECIP, open_store
    from cloudburst.data.synthetic import write_synthetic

    print(f"note: {path} is absent; training on the synthetic generator's data instead")
    with tempfile.TemporaryDirectory(prefix="cloudburst-extremes-") as tmp:
        store = str(Path(tmp) / "synthetic.zarr")
        write_synthetic(SyntheticConfig(nt=2000, ny=16, nx=32), store, progress=False)
        ds, _ = open_store(store)
        values = np.asarray(ds[PRECIP].values, dtype=np.float32)
    return values, f"synthetic ({values.shape[0]} days x {values.shape[1]} x {values.shape[2]})"


def random_windows(
    field: np.ndarray, window: tuple[int, int, int], n: int, rng: np.random.Generator
) -> np.ndarray:
    t, y, x = window
    starts = zip(
        rng.integers(0, field.shape[0] - t + 1, n),
        rng.integers(0, field.shape[1] - y + 1, n),
        rng.integers(0, field.shape[2] - x + 1, n),
        strict=True,
    )
    return np.stack([field[a : a + t, b : b + y, c : c + x] for a, b, c in starts])


# ---------------------------------------------------------------------------- models


def train(
    family: str,
    field: np.ndarray,
    window: tuple[int, int, int],
    steps: int,
    lr: float,
    diffusion_steps: int,
) -> tuple[ResolvedModel, float, float]:
    """(the model bound as models:/x/1, training seconds, final loss)."""
    torch.manual_seed(0)
    if family == "vae":
        cfg = VAEConfig(widths=(8, 16), latent=16)
    else:
        cfg = DiffusionConfig(
            widths=(8, 16),
            embedding=16,
            transform="sqrt",
            steps=diffusion_steps,
            sampler="ddim",
            probe_samples=0,
        )
    top = float(np.nanmax(field))
    stats = {
        "units": "mm/day",
        "max": top,
        "quantiles": {f"{q:g}": float(np.nanquantile(field, q)) for q in LEVELS},
    }
    net = registry.build(family, cfg, window)
    packaged = PrecipitationModel(net, family, cfg, window, Scale(0.0, top, "unit"), stats)
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        x = packaged.to_model_space(random_windows(field, window, 16, rng))
        batch = torch.from_numpy(x)[:, None]
        loss, _ = net.loss({"x": batch, "mask": torch.ones_like(batch, dtype=torch.bool)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    net.eval()
    model = ResolvedModel(packaged, "models:/x/1", "models:/x/1", None)
    return model, seconds, float(np.mean(losses[-20:]))


# ------------------------------------------------------------------------------- runs


@dataclass
class Run:
    gen: Generator
    maxima: np.ndarray  # window maximum per member
    weights: np.ndarray
    seconds: float  # construction (direction) and draws
    direction_seconds: float

    @property
    def rate(self) -> float:
        return len(self.maxima) / self.seconds


def run(
    model: ResolvedModel,
    members: int,
    seed: int,
    scenario: dict,
    settings: dict,
    direction: dict | None = None,
) -> Run:
    """Draw ``members`` through a Generator; ``direction``: {"draws": N} to steer along
    ``extreme_direction(draws=N)`` given as scenario.direction (its time counted)."""
    t0 = time.perf_counter()
    if direction is not None:
        net = model.packaged.network(NoiseSteerable)
        steps = min(DIRECTION_STEPS, int(settings["steps"]))
        d = net.extreme_direction(None, draws=direction["draws"], steps=steps)
        scenario = {**scenario, "direction": d.double().reshape(-1).tolist()}
    request = EnsembleRequest.model_validate(
        {
            "model": "models:/x/1",
            "members": members,
            "seed": seed,
            "output": "unused.zarr",  # draws() writes nothing
            "batch_size": BATCH,
            "scenario": scenario,
            **settings,
        }
    )
    gen = Generator(request, model)
    t_direction = time.perf_counter() - t0
    maxima, weights = [], []
    for a in range(0, members, CHUNK):
        x, w = gen.draws(np.arange(a, min(members, a + CHUNK), dtype=np.int64))
        maxima.append(x.reshape(len(x), -1).max(axis=1).astype(np.float64))
        weights.append(w)
    seconds = time.perf_counter() - t0
    return Run(gen, np.concatenate(maxima), np.concatenate(weights), seconds, t_direction)


def plain_inputs(plain: Run) -> np.ndarray:
    """The standard-normal input z of each plain member (members, size): a latent model's
    from its prior proposal, a sampler's initial noise z_1 re-drawn from the member's stream
    as ``Generator.sample_streams`` draws it (its first draw)."""
    gen = plain.gen
    idx = np.arange(len(plain.maxima), dtype=np.int64)
    seed = gen.request.seed
    if not gen.streams:
        assert gen.proposal is not None
        return gen.proposal.draw(seed, idx)[0]
    shape = (1, *gen.window)
    rows = []
    for k in idx:
        g = torch.Generator().manual_seed(int(member_rng(seed, int(k)).integers(2**62)))
        rows.append(torch.randn(shape, generator=g, dtype=torch.float32).reshape(-1))
    return torch.stack(rows).double().numpy()


def check_inputs(plain: Run, z: np.ndarray) -> bool:
    """Whether re-sampling DDIM members from ``z`` gives the plain run's maxima (z_1 alone
    fixes a DDIM member; for other samplers and latent models this is not checked)."""
    gen = plain.gen
    if not gen.streams or gen.request.sampler != "ddim":
        return True
    idx = np.arange(min(8, len(z)), dtype=np.int64)
    x = gen.sample_streams(idx, z[idx].astype(np.float32))
    again = x.reshape(len(x), -1).max(axis=1)
    return bool(np.allclose(again, plain.maxima[idx], rtol=1e-3, atol=1e-3))


def proposal_weights(z: np.ndarray, direction: np.ndarray, shift: float, a: float) -> np.ndarray:
    """p(z) / q(z) of the defensive shift mixture, as GaussianProposal computes it."""
    log_ratio = np.minimum(shift * (z @ direction) - 0.5 * shift**2, 700.0)
    return 1.0 / (a + (1.0 - a) * np.exp(log_ratio))


def weighted_level(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest member value v whose weighted exceedance sum_{v_i > v} w_i / N is at most
    1 - q: the q quantile of the weighted empirical CDF, as exceedance_probability reads it."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    tail = (np.cumsum(w[::-1])[::-1] - w) / len(v)  # weight strictly above each sorted value
    return float(v[np.argmax(tail <= 1.0 - q)])


@dataclass
class Row:
    family: str
    sampler: str
    direction: str
    shift: float
    level: float
    threshold: float
    p_plain: float
    se_plain: float
    p_is: float
    se_is: float
    kish: float  # effective members / N_IS
    vrf_member: float
    vrf_second: float
    vrf_plain_z: float  # VRF per member with the IS variance from the plain run's z
    events: int  # plain members over the level
    event_zd: float  # mean z.d over them

    @property
    def agreement(self) -> float:
        return abs(self.p_is - self.p_plain) / max(math.hypot(self.se_is, self.se_plain), 1e-300)


def compare(
    label: tuple[str, str, str],
    shift: float,
    defensive: float,
    plain: Run,
    z_plain: np.ndarray | None,
    steered: Run,
    levels: dict[float, float],
) -> list[Row]:
    rows = []
    direction = steered.gen.direction
    fitted = steered.gen.fitted
    zd = z_plain @ direction if z_plain is not None and direction is not None else None
    w_plain = None
    if z_plain is not None and direction is not None:
        w_plain = proposal_weights(z_plain, direction, shift, defensive)
    elif z_plain is not None and fitted is not None:
        if isinstance(fitted, UnionFit):
            logs = np.array([fitted.log_mixture(row) for row in z_plain])
        else:
            logs = log_density_ratio(z_plain, fitted)
        ratio = np.exp(np.minimum(logs, 700.0))
        w_plain = 1.0 / (defensive + (1.0 - defensive) * ratio)
    for q, threshold in levels.items():
        a = exceedance_probability(plain.maxima, threshold)
        b = exceedance_probability(steered.maxima, threshold, steered.weights)
        p_plain, se_plain = float(a.probability[0]), float(a.stderr[0])
        p_is, se_is = float(b.probability[0]), float(b.stderr[0])
        var_plain = p_is * (1.0 - p_is)
        var_is = len(steered.maxima) * se_is**2
        vrf = var_plain / var_is if var_is > 0 else float("nan")
        over = plain.maxima > threshold
        vrf_pz, event_zd = float("nan"), float("nan")
        if w_plain is not None:
            # from the plain run alone: E_p[w 1_A] = E_q[w^2 1_A], and p from its members
            second = float(np.mean(w_plain * over))
            if second - p_plain**2 > 0:
                vrf_pz = p_plain * (1.0 - p_plain) / (second - p_plain**2)
        if zd is not None and over.any():
            event_zd = float(zd[over].mean())
        rows.append(
            Row(
                *label,
                shift,
                q,
                threshold,
                p_plain,
                se_plain,
                p_is,
                se_is,
                b.effective_members / len(steered.maxima),
                vrf,
                vrf * steered.rate / plain.rate,
                vrf_pz,
                int(over.sum()),
                event_zd,
            )
        )
    return rows


def describe(name: str, r: Run) -> None:
    extra = (
        f", construction (direction or fit) {r.direction_seconds:.2f} s included"
        if r.direction_seconds > 0.05
        else ""
    )
    print(
        f"  {name:30}{len(r.maxima):>8,} members {r.seconds:7.1f} s {r.rate:8,.0f} members/s"
        f"{extra}",
        flush=True,
    )


# ------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--families", nargs="+", default=["vae", "diffusion"], choices=["vae", "diffusion"]
    )
    p.add_argument(
        "--samplers", nargs="+", default=["ddim", "ancestral"], choices=["ddim", "ancestral"]
    )
    p.add_argument(
        "--members",
        type=int,
        nargs=2,
        default=[200_000, 128_000],
        metavar=("VAE", "DIFFUSION"),
        help="plain Monte Carlo members (about 200 and 128 events at 0.999: what the plain-z "
        "cross-check rests on)",
    )
    p.add_argument(
        "--is-members",
        type=int,
        nargs=2,
        default=[20_000, 16_000],
        metavar=("VAE", "DIFFUSION"),
        help="extreme-scenario members per shift",
    )
    p.add_argument(
        "--shift", type=float, nargs="+", default=[3.0], help="shift sizes (levels from the first)"
    )
    p.add_argument("--defensive", type=float, default=0.1)
    p.add_argument(
        "--proposals",
        nargs="+",
        default=["shift", "fitted"],
        choices=["shift", "fitted"],
        help="fitted: the cross-entropy Gaussian (latent models only)",
    )
    p.add_argument(
        "--pilot-draws",
        type=int,
        nargs=2,
        default=[1000, 16_000],
        metavar=("VAE", "DIFFUSION"),
        help="fitted: pilot draws (per level for the VAE)",
    )
    p.add_argument(
        "--direction-draws",
        type=int,
        default=0,
        help="diffusion: also steer along extreme_direction(draws=N) (0: off)",
    )
    p.add_argument("--window", type=int, nargs=3, default=[4, 8, 8], metavar=("T", "Y", "X"))
    p.add_argument(
        "--train-steps", type=int, nargs=2, default=[300, 300], metavar=("VAE", "DIFFUSION")
    )
    p.add_argument("--lr", type=float, nargs=2, default=[2e-4, 2e-3], metavar=("VAE", "DIFFUSION"))
    p.add_argument("--steps", type=int, default=8, help="diffusion sampler steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=FRASER)
    args = p.parse_args()  # fmt: skip
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    window = tuple(args.window)
    field, source = load_field(args.data)
    print(f"data: {source}; windows {window}; {args.threads} torch thread(s)")

    rows: list[Row] = []
    for family in args.families:
        k = 0 if family == "vae" else 1
        model, seconds, loss = train(
            family, field, window, args.train_steps[k], args.lr[k], args.steps
        )
        print(
            f"\n{family}: trained {args.train_steps[k]} steps (lr {args.lr[k]:g}) in "
            f"{seconds:.1f} s, final loss {loss:.4g}",
            flush=True,
        )
        samplers = ["-"] if family == "vae" else args.samplers
        directions: list[tuple[str, dict | None]] = [("engine", None)]
        if family == "diffusion" and args.direction_draws > 0:
            directions.append((f"{args.direction_draws} draws", {"draws": args.direction_draws}))
        for sampler in samplers:
            settings = {} if family == "vae" else {"steps": args.steps, "sampler": sampler}
            print(f" {family if family == 'vae' else f'{family} {sampler} ({args.steps} steps)'}")
            plain = run(model, args.members[k], 1, {"kind": "unconditional"}, settings)
            describe("plain Monte Carlo", plain)
            z_plain: np.ndarray | None = plain_inputs(plain)
            if not check_inputs(plain, z_plain):
                print("  (the plain run's z could not be re-drawn: no plain-z cross-check)")
                z_plain = None
            levels: dict[float, float] = {}
            runs: list[tuple[str, float, dict, dict | None]] = []
            if "shift" in args.proposals:
                runs += [
                    (name, shift, {"proposal": "shift", "shift": shift}, direction)
                    for name, direction in directions
                    for shift in args.shift
                ]
            if "fitted" in args.proposals:
                fit = {"proposal": "fitted", "pilot_draws": args.pilot_draws[k]}
                runs.append(("fitted", float("nan"), {**fit, "tail_quantile": 0.999}, None))
            for name, shift, proposal, direction in runs:
                scenario = {"kind": "extreme", "defensive": args.defensive, **proposal}
                steered = run(model, args.is_members[k], 2, scenario, settings, direction)
                what = f"shift {shift:g}, d: {name}" if name != "fitted" else "fitted"
                describe(f"extreme, {what}", steered)
                fitted = steered.gen.fitted
                if fitted is not None:
                    print(
                        f"  fit: {fitted.pilot_draws} pilot draws (cost included), levels "
                        f"{', '.join(f'{v:.2f}' for v in fitted.levels)} mm/day"
                    )
                if not levels:
                    for q in LEVELS:
                        levels[q] = float(np.quantile(plain.maxima, q, method="inverted_cdf"))
                        check = weighted_level(steered.maxima, steered.weights, q)
                        print(
                            f"  L_{q:g} = {levels[q]:.2f} mm/day (the plain run's quantile); "
                            f"weighted quantile of this extreme run {check:.2f}"
                        )
                label = (family, sampler, name)
                rows.extend(compare(label, shift, args.defensive, plain, z_plain, steered, levels))

    print(
        "\nVRF: variance reduction of P(window max > L), importance-weighted over plain Monte Carlo"
    )
    head = (
        f"{'family':10}{'sampler':10}{'d':>9}{'shift':>6}{'level':>7}{'L':>7}{'p IS':>10}"
        f"{'p plain':>10}{'agree':>6}{'se plain':>10}{'se IS':>10}{'Kish/N':>7}"
        f"{'VRF/mbr':>9}{'VRF/s':>8}{'plain-z':>9}{'events':>7}{'z.d':>6}  target"
    )
    print(head)
    print("-" * (len(head) + 20))
    for r in rows:
        target = ""
        if r.level == 0.999:
            verdict = "PASS" if r.vrf_member >= TARGET else "FAIL"
            if r.vrf_member >= TARGET and not r.agreement <= AGREE:
                verdict = "FAIL (p IS disagrees with plain)"
            elif r.vrf_member >= TARGET and r.vrf_plain_z < TARGET:
                verdict = "FAIL (plain-z below the target)"
            target = f"{r.vrf_member / TARGET:.2f}x of {TARGET:g}x {verdict}"
        print(
            f"{r.family:10}{r.sampler:10}{r.direction:>9}{r.shift:6g}{r.level:7g}"
            f"{r.threshold:7.2f}{r.p_is:10.2e}{r.p_plain:10.2e}{r.agreement:6.2f}"
            f"{r.se_plain:10.2e}{r.se_is:10.2e}{r.kish:7.3f}{r.vrf_member:8.1f}x"
            f"{r.vrf_second:7.1f}x{r.vrf_plain_z:8.1f}x{r.events:7d}{r.event_zd:6.2f}  {target}"
        )
    print(
        "agree: |p IS - p plain| / sqrt(se IS^2 + se plain^2); VRF/mbr: p(1-p) / (N_IS se_IS^2) "
        "with p = p IS;\nVRF/s: VRF/mbr x IS members/s / plain members/s; plain-z: VRF/mbr from "
        "the plain run alone, p(1-p) / (E_p[w 1_A] - p^2) with p = p plain;\n"
        "events, z.d: plain members over L and their mean z.d (a shift proposal of shift S "
        "helps where z.d is near S)"
    )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
