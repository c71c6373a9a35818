"""Reconstruction objectives, latent regularisers and metrics of the quantized-loss VAE
(Szwarcman et al., "Quantizing reconstruction losses for improving weather data synthesis").

Why quantize: precipitation is extremely imbalanced inside every sample (mostly dry pixels, a few
heavy ones), so a plain pixel MSE is dominated by the frequent near-zero values and the model
learns to smooth extremes away. The quantized losses split the pixels of each INPUT sample into
B equal bins on [0, 1] (the sample's own histogram, never the reconstruction's) and average the
squared error inside each bin, so a bin holding one heavy-rain pixel weighs as much as the bin
holding thousands of dry ones.

Notation (the study's quantized losses): counts_j = |Omega_j|, h_j = counts_j / max_k counts_k,
w_j = 1 - h_j.

- ``l_rec``      mean_i e_i^2
- ``l_qt``       sum_{j non-empty} mean_{i in Omega_j} e_i^2
- ``l_wqt``      sum_{j non-empty} w_j mean_{i in Omega_j} e_i^2
- ``focal_mse``  lam * mean_i sigmoid(beta |e_i|)^gamma e_i^2   (paper Eq. 7, as written there)
- ``focal_hist`` lam * mean_i w_{j(i)}^gamma e_i^2
- ``rec+qt``, ``rec+wqt``: the sums.

Tensors are (batch, channel, time, y, x) (any shape with a leading batch dimension works); every
objective returns one value per sample. Everything is vectorised over samples and bins on a
flattened (batch, pixels) view with ``scatter_add``: no Python loop over samples or bins. An
optional boolean ``mask`` (True = valid) removes invalid pixels (NaN-filled sea, fill values)
from the histogram and from the errors; a sample with no valid pixel gets loss 0.

Pure torch: no Ray, no MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

__all__ = [
    "FocalBeta",
    "FocalGamma",
    "FocalLambda",
    "HistogramBins",
    "LOSSES",
    "LossChoice",
    "LossName",
    "RECONSTRUCTION_LOSSES",
    "LossSpec",
    "QuantizedMSE",
    "active_units",
    "bin_index",
    "focal_hist",
    "focal_mse",
    "histogram_edges",
    "kl_normal",
    "l_qt",
    "l_rec",
    "l_rec_qt",
    "l_rec_wqt",
    "l_wqt",
    "mmd",
    "mmd_imq",
    "mmd_rbf",
    "quantized_mse",
    "reconstruction_loss",
    "sample_histogram",
]

Reduction = Literal["none", "mean", "sum"]

# The table of reconstruction objectives is at the end of the module (LOSSES), next to the
# functions it names; RECONSTRUCTION_LOSSES is its key set.

# --------------------------------------------------------------------------------------------
# Binning
# --------------------------------------------------------------------------------------------


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")


def _index_dtype(x: Tensor) -> torch.dtype:
    # Bin membership is decided in at least float32: a bf16/fp16 value next to an edge would
    # otherwise land in a bin that depends on the autocast setting.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def histogram_edges(
    bins: int,
    lo: float = 0.0,
    hi: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The B + 1 edges of ``bins`` equal bins on [lo, hi] (the paper's B = 100 on [0, 1])."""
    _check_bins(bins)
    if not hi > lo:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")
    return torch.linspace(lo, hi, bins + 1, dtype=dtype, device=device)


def _bucket(values: Tensor, edges: Tensor) -> Tensor:
    """Bin j with edges[j] <= v < edges[j+1]; the last bin is closed; outside values clamp."""
    nbins = edges.numel() - 1
    # NaNs (masked pixels) go to bin 0; callers give them zero weight.
    values = torch.nan_to_num(values.detach().to(edges.dtype), nan=0.0)
    idx = torch.bucketize(values, edges, right=True) - 1
    return idx.clamp_(0, nbins - 1)


def bin_index(x: Tensor, bins: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Bin of every pixel among ``bins`` equal bins on [lo, hi], as int64 with x's shape.

    A value equal to an edge opens the bin above it (edges[j] <= v < edges[j+1]); v == hi goes
    to the last bin, and values outside [lo, hi] are clamped into the first/last bin, so a
    slightly overshooting value is never lost. Edges come from :func:`histogram_edges`, so a
    value equal to ``histogram_edges(...)[j]`` lands in bin j exactly.
    """
    edges = histogram_edges(bins, lo, hi, dtype=_index_dtype(x), device=x.device)
    return _bucket(x, edges)


def _flat_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """Boolean (batch, pixels) validity, broadcasting a mask such as (1, 1, 1, y, x)."""
    if mask is None:
        return torch.ones(x.shape[0], x[0].numel(), dtype=torch.bool, device=x.device)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = valid), got {mask.dtype}")
    try:
        full = mask.expand_as(x)
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit x {tuple(x.shape)}"
        ) from err
    return full.reshape(x.shape[0], -1)


def _histogram(idx: Tensor, valid: Tensor, bins: int) -> Tensor:
    """int64 counts (batch, bins) of the flat bin indices, valid pixels only."""
    counts = torch.zeros(idx.shape[0], bins, dtype=torch.int64, device=idx.device)
    return counts.scatter_add_(1, idx, valid.to(torch.int64))


def sample_histogram(x: Tensor, bins: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample histogram over ``bins`` equal bins on [0, 1]: (counts, h), each (batch, bins).

    ``counts`` is int64; ``h = counts / max_k counts`` lies in [0, 1] with 1 at the most populated
    bin (the paper normalises by the maximum, not the sum, so the penalty w = 1 - h vanishes on
    the dominant, usually dry, bin). A sample with no valid pixel has counts 0 and h 0.
    """
    _check_bins(bins)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("x needs a non-empty leading batch dimension")
    valid = _flat_mask(x, mask)
    idx = bin_index(x, bins).reshape(x.shape[0], -1)
    counts = _histogram(idx, valid, bins)
    peak = counts.amax(dim=1, keepdim=True).clamp_min(1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    h = counts.to(dtype) / peak.to(dtype)
    return counts, h


# --------------------------------------------------------------------------------------------
# Reconstruction objectives
# --------------------------------------------------------------------------------------------


class _Binned(NamedTuple):
    """What every objective needs, computed once per (x, x_hat)."""

    e: Tensor  # (N, P) error x_hat - x, 0 on invalid pixels
    e2: Tensor  # (N, P) squared error, 0 on invalid pixels
    valid: Tensor  # (N, P) bool
    n_valid: Tensor  # (N,) number of valid pixels, >= 1 (clamped)
    idx: Tensor | None  # (N, P) bin of the input pixel
    counts: Tensor | None  # (N, B) float counts
    w: Tensor | None  # (N, B) penalty 1 - h


def _prepare(x: Tensor, x_hat: Tensor, mask: Tensor | None, bins: int | None) -> _Binned:
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("x needs a non-empty leading batch dimension")
    n = x.shape[0]
    valid = _flat_mask(x, mask)
    # Half-precision errors lose the small differences the quantized losses are about.
    dtype = torch.promote_types(torch.promote_types(x.dtype, x_hat.dtype), torch.float32)
    diff = x_hat.reshape(n, -1).to(dtype) - x.reshape(n, -1).to(dtype)
    # where (not multiply): NaN-filled invalid pixels must give 0, and a 0 gradient.
    e = torch.where(valid, diff, torch.zeros((), dtype=dtype, device=x.device))
    e2 = e * e
    n_valid = valid.sum(dim=1).clamp_min(1).to(dtype)
    if bins is None:
        return _Binned(e, e2, valid, n_valid, None, None, None)
    _check_bins(bins)
    idx = bin_index(x, bins).reshape(n, -1)
    counts = _histogram(idx, valid, bins).to(dtype)
    h = counts / counts.amax(dim=1, keepdim=True).clamp_min(1.0)
    return _Binned(e, e2, valid, n_valid, idx, counts, 1.0 - h)


def _per_bin_mse(b: _Binned) -> Tensor:
    """(N, B) mean squared error inside each bin; 0 for empty bins (no division by zero)."""
    assert b.idx is not None and b.counts is not None
    sse = torch.zeros_like(b.counts).scatter_add(1, b.idx, b.e2)
    return sse / b.counts.clamp_min(1.0)


def _reduce(loss: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _rec(b: _Binned) -> Tensor:
    return b.e2.sum(dim=1) / b.n_valid


def _qt(b: _Binned) -> Tensor:
    return _per_bin_mse(b).sum(dim=1)


def _wqt(b: _Binned) -> Tensor:
    assert b.w is not None
    return (b.w * _per_bin_mse(b)).sum(dim=1)


def _focal_mse(b: _Binned, lam: float, beta: float, gamma: float) -> Tensor:
    # Paper Eq. 7 as printed: sigmoid(beta |e|) in [0.5, 1). Yang et al.'s code (Focal-R) uses
    # 2 sigmoid - 1 instead; we follow the paper. Invalid pixels have e2 = 0.
    modulation = torch.sigmoid(beta * b.e.abs()).pow(gamma)
    return lam * (modulation * b.e2).sum(dim=1) / b.n_valid


def _focal_hist(b: _Binned, lam: float, gamma: float) -> Tensor:
    assert b.w is not None and b.idx is not None
    phi = torch.gather(b.w, 1, b.idx)  # w of each pixel's bin
    return lam * (phi.pow(gamma) * b.e2).sum(dim=1) / b.n_valid


def l_rec(
    x: Tensor, x_hat: Tensor, mask: Tensor | None = None, reduction: Reduction = "none"
) -> Tensor:
    """Plain MSE over the valid pixels of each sample: the baseline that smooths extremes."""
    return _reduce(_rec(_prepare(x, x_hat, mask, None)), reduction)


def l_qt(
    x: Tensor,
    x_hat: Tensor,
    bins: int = 100,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """Sum over non-empty input bins of the in-bin MSE: every occupied bin weighs the same."""
    return _reduce(_qt(_prepare(x, x_hat, mask, bins)), reduction)


def l_wqt(
    x: Tensor,
    x_hat: Tensor,
    bins: int = 100,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """``l_qt`` with bin weights w_j = 1 - h_j: rarer bins count more, the commonest not at all."""
    return _reduce(_wqt(_prepare(x, x_hat, mask, bins)), reduction)


def l_rec_qt(
    x: Tensor,
    x_hat: Tensor,
    bins: int = 100,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """``l_rec + l_qt``: keeps the frequent values anchored while boosting the rare ones."""
    b = _prepare(x, x_hat, mask, bins)
    return _reduce(_rec(b) + _qt(b), reduction)


def l_rec_wqt(
    x: Tensor,
    x_hat: Tensor,
    bins: int = 100,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """``l_rec + l_wqt``: the MSE term restores a penalty on the dominant bin that w zeroes."""
    b = _prepare(x, x_hat, mask, bins)
    return _reduce(_rec(b) + _wqt(b), reduction)


def focal_mse(
    x: Tensor,
    x_hat: Tensor,
    lam: float = 100.0,
    beta: float = 0.2,
    gamma: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """Regression focal loss (Yang et al.): larger errors weigh more; lam rescales vs L_reg."""
    return _reduce(_focal_mse(_prepare(x, x_hat, mask, None), lam, beta, gamma), reduction)


def focal_hist(
    x: Tensor,
    x_hat: Tensor,
    bins: int = 100,
    lam: float = 100.0,
    gamma: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """Focal loss whose modulation is the histogram penalty of each pixel's input bin.

    Unlike ``l_wqt`` it still averages over all pixels, so a few rare pixels stay diluted.
    """
    return _reduce(_focal_hist(_prepare(x, x_hat, mask, bins), lam, gamma), reduction)


def reconstruction_loss(
    name: str,
    x: Tensor,
    x_hat: Tensor,
    *,
    bins: int = 100,
    lam: float = 100.0,
    beta: float = 0.2,
    gamma: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """Per-sample reconstruction objective ``name`` (one of RECONSTRUCTION_LOSSES).

    ``bins`` is validated for every name (a config typo fails early, not only for binned
    losses); the histogram is built once even for the sums.
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(
            f"unknown reconstruction loss {name!r}; allowed: {', '.join(sorted(LOSSES))}"
        )
    _check_bins(bins)
    b = _prepare(x, x_hat, mask, bins if spec.binned else None)
    loss = spec.fn(b, FocalParams(lam, beta, gamma))
    return _reduce(loss, reduction)


# --------------------------------------------------------------------------------------------
# Latent regularisers
# --------------------------------------------------------------------------------------------


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    # Direct differences (not the |a|^2 + |b|^2 - 2ab expansion): exact zeros on the diagonal
    # and no negative distances from cancellation; batches are small (32 x 30).
    return (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(dim=-1)


def _mmd_from_kernels(kxx: Tensor, kyy: Tensor, kxy: Tensor, unbiased: bool) -> Tensor:
    n, m = kxx.shape[0], kyy.shape[0]
    if not unbiased:
        return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
    if n < 2 or m < 2:
        raise ValueError("the unbiased MMD estimate needs at least 2 samples on each side")
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2.0 * kxy.mean()


def _check_pair(z: Tensor, prior: Tensor) -> None:
    if z.dim() != 2 or prior.dim() != 2 or z.shape[1] != prior.shape[1]:
        raise ValueError(
            f"z {tuple(z.shape)} and prior samples {tuple(prior.shape)} must be (n, d) and (m, d)"
        )


def mmd_rbf(
    z: Tensor, prior_samples: Tensor, bandwidth: float | None = None, unbiased: bool = False
) -> Tensor:
    """MMD^2 with the Gaussian kernel k(a, b) = exp(-|a - b|^2 / bandwidth), as in InfoVAE.

    Default bandwidth d^2 (d = latent size) reproduces the InfoVAE reference code
    (``exp(-mean_d (a - b)^2 / d)``), which the quantized-loss study follows.
    ``unbiased=False`` gives the biased V-statistic of InfoVAE (diagonals included, always
    >= 0, exactly 0 for identical sets); ``unbiased=True`` drops the within-set diagonals
    (U-statistic; can be < 0).
    """
    _check_pair(z, prior_samples)
    prior_samples = prior_samples.to(z.dtype)
    scale = float(z.shape[1] ** 2) if bandwidth is None else float(bandwidth)
    if scale <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")

    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-_sq_dists(a, b) / scale)

    return _mmd_from_kernels(
        k(z, z), k(prior_samples, prior_samples), k(z, prior_samples), unbiased
    )


def mmd_imq(
    z: Tensor,
    prior_samples: Tensor,
    scales: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
    unbiased: bool = False,
) -> Tensor:
    """MMD^2 with the inverse multiquadric kernel sum_s C_s / (C_s + |a - b|^2), C_s = 2 d s.

    The WAE choice (Tolstikhin et al.): heavier tails than the RBF, so gradients do not vanish
    for far-away codes. C = 2 d is the expected |a - b|^2 between two N(0, I) draws; several
    scales avoid tuning it. Bias convention as in :func:`mmd_rbf` (WAE itself used unbiased).
    """
    _check_pair(z, prior_samples)
    prior_samples = prior_samples.to(z.dtype)
    d = z.shape[1]
    cs = [2.0 * d * float(s) for s in scales]
    if not cs or min(cs) <= 0:
        raise ValueError(f"scales must be positive, got {tuple(scales)}")

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = _sq_dists(a, b)
        return sum(c / (c + d2) for c in cs)  # type: ignore[return-value]

    return _mmd_from_kernels(
        k(z, z), k(prior_samples, prior_samples), k(z, prior_samples), unbiased
    )


def mmd(
    z: Tensor,
    prior_samples: Tensor | None = None,
    kernel: Literal["rbf", "imq"] = "rbf",
    unbiased: bool = False,
) -> Tensor:
    """Scalar MMD^2 between codes z (n, d) and prior draws (m, d); default N(0, I) draws.

    Default: RBF kernel with the InfoVAE bandwidth and the biased estimate, because the
    quantized-loss study regularises "following InfoVAE" and the InfoVAE reference
    implementation is exactly that.
    """
    if prior_samples is None:
        prior_samples = torch.randn_like(z)
    if kernel == "rbf":
        return mmd_rbf(z, prior_samples, unbiased=unbiased)
    if kernel == "imq":
        return mmd_imq(z, prior_samples, unbiased=unbiased)
    raise ValueError(f"unknown MMD kernel {kernel!r}; allowed: imq, rbf")


def kl_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per sample, summed over latent dims: (batch,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Number of latent dims whose encoder mean varies across samples more than ``threshold``.

    Burda et al. (2016): a unit is active if Cov_x(E_q[z_u | x]) > 0.01; a collapsed posterior
    ignores x, so its mean is constant. ``mu`` is (samples, latent) over a held-out set
    (sample variance, n - 1 denominator).
    """
    if mu.dim() != 2 or mu.shape[0] < 2:
        raise ValueError(f"mu must be (samples >= 2, latent), got {tuple(mu.shape)}")
    var = mu.detach().to(torch.float64).var(dim=0, correction=1)
    return int((var > threshold).sum().item())


# --------------------------------------------------------------------------------------------
# Evaluation: quantized MSE on a fixed histogram
# --------------------------------------------------------------------------------------------


def _check_edges(edges: Tensor) -> Tensor:
    edges = torch.as_tensor(edges).detach().to("cpu", torch.float64).flatten()
    if edges.numel() < 3:
        raise ValueError("edges must hold at least 3 values (2 bins)")
    if not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError("edges must be strictly increasing")
    return edges


def _binned_sums(
    x: Tensor, x_hat: Tensor, edges: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """float64 sum of squared errors and int64 pixel count per bin, over the whole batch."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
    nbins = edges.numel() - 1
    edges = edges.to(x.device)
    if mask is None:
        valid = torch.ones(x.numel(), dtype=torch.bool, device=x.device)
    else:
        valid = _flat_mask(x, mask).reshape(-1)
    xv = x.detach().reshape(-1).to(torch.float64)
    diff = x_hat.detach().reshape(-1).to(torch.float64) - xv
    e2 = torch.where(valid, diff * diff, torch.zeros((), dtype=torch.float64, device=x.device))
    idx = _bucket(xv, edges)
    sums = torch.zeros(nbins, dtype=torch.float64, device=x.device).index_add_(0, idx, e2)
    counts = torch.zeros(nbins, dtype=torch.int64, device=x.device).index_add_(
        0, idx, valid.to(torch.int64)
    )
    return sums, counts


def quantized_mse(
    x: Tensor, x_hat: Tensor, edges: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """MSE inside each bin of a FIXED histogram, pooled over the batch: (mse (B,), count (B,)).

    The paper's evaluation metric: ``edges`` (B + 1, increasing) are the training histogram's,
    in the same units as x (scaled or physical). Bin rule as :func:`bin_index`, values outside
    the edges clamp into the end bins (test extremes beyond the training maximum stay in the top
    bin). Bins with no pixel give NaN mse and count 0. float64, no gradient. For test sets that
    do not fit in memory use :class:`QuantizedMSE`.
    """
    sums, counts = _binned_sums(x, x_hat, _check_edges(edges), mask)
    return _finish(sums, counts)


def _finish(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    nan = torch.full_like(sums, float("nan"))
    return torch.where(counts > 0, sums / counts.clamp_min(1), nan), counts.clone()


class QuantizedMSE:
    """Streaming :func:`quantized_mse`: holds only per-bin sums and counts (float64/int64).

    ``update`` per batch, ``compute`` at the end; ``merge`` adds another accumulator's state
    (e.g. from other Ray workers), so the result is independent of how the test set was split.
    """

    def __init__(self, edges: Tensor) -> None:
        self.edges = _check_edges(edges)
        self.reset()

    @property
    def bins(self) -> int:
        return self.edges.numel() - 1

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.sums = torch.zeros(self.bins, dtype=torch.float64)
        self.counts = torch.zeros(self.bins, dtype=torch.int64)

    def update(self, x: Tensor, x_hat: Tensor, mask: Tensor | None = None) -> None:
        """Add one batch's per-bin squared errors and counts."""
        sums, counts = _binned_sums(x, x_hat, self.edges, mask)
        self.sums += sums.cpu()
        self.counts += counts.cpu()

    def merge(self, other: QuantizedMSE) -> None:
        """Add the state of an accumulator built on the same edges."""
        if not torch.equal(self.edges, other.edges):
            raise ValueError("cannot merge QuantizedMSE accumulators with different edges")
        self.sums += other.sums
        self.counts += other.counts

    def compute(self) -> tuple[Tensor, Tensor]:
        """(mse per bin (B,), count per bin (B,)); NaN mse where the count is 0."""
        return _finish(self.sums, self.counts)


# --------------------------------------------------------------------------------------------
# The table of reconstruction objectives
# --------------------------------------------------------------------------------------------


class FocalParams(NamedTuple):
    """lambda, beta, gamma of the focal losses (ignored by the others)."""

    lam: float
    beta: float
    gamma: float


@dataclass(frozen=True)
class LossSpec:
    """A reconstruction objective: ``fn(binned errors, focal params)`` -> (N,) per sample;
    ``binned``: it needs the sample's histogram; ``learning_rate``: the study's default
    (5e-5 for the quantized losses, 1e-5 for the others)."""

    fn: Callable[[_Binned, FocalParams], Tensor]
    binned: bool
    learning_rate: float


LOSSES: dict[str, LossSpec] = {
    "rec": LossSpec(lambda b, _p: _rec(b), binned=False, learning_rate=1e-5),
    "qt": LossSpec(lambda b, _p: _qt(b), binned=True, learning_rate=5e-5),
    "wqt": LossSpec(lambda b, _p: _wqt(b), binned=True, learning_rate=5e-5),
    "rec+qt": LossSpec(lambda b, _p: _rec(b) + _qt(b), binned=True, learning_rate=5e-5),
    "rec+wqt": LossSpec(lambda b, _p: _rec(b) + _wqt(b), binned=True, learning_rate=5e-5),
    "focal_mse": LossSpec(
        lambda b, p: _focal_mse(b, p.lam, p.beta, p.gamma), binned=False, learning_rate=1e-5
    ),
    "focal_hist": LossSpec(
        lambda b, p: _focal_hist(b, p.lam, p.gamma), binned=True, learning_rate=1e-5
    ),
}
RECONSTRUCTION_LOSSES: frozenset[str] = frozenset(LOSSES)


# The fields of a model config that chooses one of these losses (the VAE's and the VQ-VAE's):
# one definition of their bounds and descriptions; each config gives its own defaults.
LossName = Literal[tuple(LOSSES)]  # type: ignore[valid-type]
LossChoice = Annotated[
    LossName,
    Field(
        description="reconstruction objective: `rec` (MSE); quantized losses `qt`, `wqt`, "
        "`rec+qt`, `rec+wqt`; focal losses `focal_mse`, `focal_hist`"
    ),
]
HistogramBins = Annotated[
    int,
    Field(
        ge=2,
        description="B, equal bins on [0, 1] of each input sample's histogram for the "
        "quantized losses (`qt`, `wqt`, `rec+qt`, `rec+wqt`) and `focal_hist`",
    ),
]
FocalLambda = Annotated[
    float,
    Field(gt=0, description="lambda, the scale of the focal losses (`focal_mse`, `focal_hist`)"),
]
FocalBeta = Annotated[
    float,
    Field(
        gt=0, description="beta of `focal_mse`: its weight is sigmoid(beta * abs error) ** gamma"
    ),
]
FocalGamma = Annotated[
    float,
    Field(
        ge=0,
        description="gamma, the exponent of the focal losses' per-pixel weight (0: no weighting)",
    ),
]
