"""Nearest-neighbour vector quantisation against a learnt codebook (van den Oord et al., "Neural
discrete representation learning"), the bottleneck of the VQ-VAE (:mod:`cloudburst.models.vqvae`).

Every encoder output vector (channel dimension D of an (n, D, ...) tensor) is replaced by the
nearest of K codes. The argmin has no gradient, so the decoder's gradient is copied to the
encoder output unchanged (straight-through estimator). The codebook learns either

- by gradient: codebook loss ||sg[z] - e||^2 moves the codes to the encoder outputs, and the
  commitment loss ||z - sg[e]||^2 (weighted by beta = 0.25 in the VQ-VAE's objective) keeps
  the encoder close to its codes; or
- by exponential moving averages (``ema=True``): each code becomes the running mean of the
  encoder outputs assigned to it (counts and sums decayed by ``decay``, counts Laplace-smoothed
  by ``epsilon`` so that no count is 0); there is no codebook loss then, only the commitment.

The EMA buffers start as if each code had been chosen once at its initial position, so a code
nobody picks keeps its place instead of shrinking to 0. Codes that nobody picks for
``dead_code_steps`` training steps are restarted at random encoder outputs of the current
batch (a collapsed codebook otherwise stays collapsed). Both updates happen only in training
mode; with torch.distributed running, counts and sums are summed over ranks and the restarted
codes are rank 0's, so every rank keeps the same codebook.

Distances are computed in float32 with autocast disabled: in bf16 the expansion
|z|^2 - 2 z.e + |e|^2 loses the small differences between near codes, and the chosen code would
depend on the precision setting.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Quantised", "VectorQuantiser", "code_statistics"]

log = logging.getLogger(__name__)


class Quantised(NamedTuple):
    """What :meth:`VectorQuantiser.forward` returns.

    ``quantised``: (n, D, ...) the nearest codes, with the straight-through gradient to the
    input, in the input's dtype; ``indices``: int64 (n, ...) the chosen codes;
    ``codebook_loss`` / ``commitment_loss``: float32 scalars (the codebook loss is 0 with EMA
    updates); ``perplexity``: exp of the entropy of the batch's code frequencies (1: one code
    for everything, K: all codes equally often); ``usage``: the fraction of the K codes chosen
    at least once in the batch.
    """

    quantised: Tensor
    indices: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    perplexity: Tensor
    usage: Tensor


def code_statistics(indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """(perplexity, fraction of codes used) of integer codes ``indices`` (any shape), float32."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return torch.exp(entropy), (counts > 0).float().mean()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantiser(nn.Module):
    """K codes of dimension D; ``forward(z)`` quantises (n, D, ...) encoder outputs.

    ``ema``: learn the codebook by moving averages (decay ``decay``, Laplace smoothing
    ``epsilon``) instead of the codebook loss; ``dead_code_steps``: restart a code after this
    many training steps in which fewer than ``dead_code_threshold`` vectors chose it (0: never).
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        *,
        ema: bool = False,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_code_steps: int = 100,
        dead_code_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        if codebook_size < 1 or code_dim < 1:
            raise ValueError(
                f"a codebook needs >= 1 code of dimension >= 1, got {codebook_size} x {code_dim}"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if epsilon < 0.0 or dead_code_steps < 0 or not dead_code_threshold > 0.0:
            raise ValueError(
                "epsilon and dead_code_steps must be >= 0 and dead_code_threshold > 0, got "
                f"{epsilon}, {dead_code_steps}, {dead_code_threshold}"
            )
        self.codebook_size = int(codebook_size)
        self.code_dim = int(code_dim)
        self.ema = bool(ema)
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        self.dead_code_steps = int(dead_code_steps)
        self.dead_code_threshold = float(dead_code_threshold)
        bound = 1.0 / self.codebook_size
        init = torch.empty(self.codebook_size, self.code_dim).uniform_(-bound, bound)
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.ones(self.codebook_size))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        # training steps since each code was last chosen (by enough vectors)
        self.register_buffer("steps_unused", torch.zeros(self.codebook_size, dtype=torch.int64))

    def extra_repr(self) -> str:
        return (
            f"codes={self.codebook_size}, dim={self.code_dim}, ema={self.ema}, "
            f"dead_code_steps={self.dead_code_steps}"
        )

    # ------------------------------------------------------------------ quantisation

    def flatten(self, z: Tensor) -> Tensor:
        """(n, D, ...) -> (m, D): one row per vector, the channel dimension last."""
        if z.ndim < 2 or z.shape[1] != self.code_dim:
            raise ValueError(
                f"expected encoder outputs (n, {self.code_dim}, ...), got {tuple(z.shape)}"
            )
        return z.movedim(1, -1).reshape(-1, self.code_dim)

    def distances(self, flat: Tensor) -> Tensor:
        """Squared Euclidean distances (m, K) of rows ``flat`` (m, D) to the codes, float32
        whatever the autocast setting."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            f = flat.float()
            codes = self.codebook.float()
            d = (
                f.pow(2).sum(dim=1, keepdim=True)
                - 2.0 * (f @ codes.t())
                + codes.pow(2).sum(dim=1)[None, :]
            )
        return d

    def nearest(self, z: Tensor) -> Tensor:
        """int64 (n, ...) index of the nearest code of every vector of ``z`` (n, D, ...)."""
        flat = self.flatten(z.detach())
        idx = self.distances(flat).argmin(dim=1)
        return idx.view(z.shape[0], *z.shape[2:])

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes of int64 ``indices`` (n, ...) as (n, D, ...) float32."""
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"code indices must be integers, got {indices.dtype}")
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.codebook_size:
                raise ValueError(
                    f"code indices must lie in [0, {self.codebook_size}), got [{low}, {high}]"
                )
        vectors = F.embedding(indices.long(), self.codebook.float())
        return vectors.movedim(-1, 1)

    def forward(self, z: Tensor) -> Quantised:
        """Quantise ``z`` (n, D, ...); in training mode also update the codebook (EMA) and
        restart dead codes, after the quantisation of this batch."""
        flat = self.flatten(z)
        with torch.no_grad():
            idx_flat = self.distances(flat.detach()).argmin(dim=1)
        indices = idx_flat.view(z.shape[0], *z.shape[2:])
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            zq = self.lookup(indices)
            commitment = F.mse_loss(z32, zq.detach())
            if self.ema:
                codebook_loss = torch.zeros((), device=z.device)
            else:
                codebook_loss = F.mse_loss(zq, z32.detach())
        # straight-through: the forward value is the code, the gradient is the identity
        quantised = z + (zq.to(z.dtype) - z).detach()
        perplexity, usage = code_statistics(idx_flat.detach(), self.codebook_size)
        if self.training:
            self.update(flat.detach(), idx_flat)
        return Quantised(quantised, indices, codebook_loss, commitment, perplexity, usage)

    # ------------------------------------------------------------------ learning the codebook

    @torch.no_grad()
    def update(self, flat: Tensor, idx: Tensor) -> None:
        """One training step's codebook update from rows ``flat`` (m, D) and their codes
        ``idx`` (m,): EMA counts and sums (with ``ema``), then the dead-code restart."""
        flat = flat.float()
        onehot = F.one_hot(idx, self.codebook_size).float()
        counts = onehot.sum(dim=0)
        sums = onehot.t() @ flat
        if _distributed():
            dist.all_reduce(counts)
            if self.ema:
                dist.all_reduce(sums)
        if self.ema:
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (
                (self.cluster_size + self.epsilon)
                / (total + self.codebook_size * self.epsilon)
                * total
            )
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_steps > 0:
            used = counts >= self.dead_code_threshold
            self.steps_unused.add_(1).masked_fill_(used, 0)
            dead = self.steps_unused >= self.dead_code_steps
            if bool(dead.any()):
                self.restart(dead, flat)

    @torch.no_grad()
    def restart(self, dead: Tensor, flat: Tensor) -> None:
        """Move the codes where ``dead`` (bool (K,)) to random rows of ``flat`` (m, D)."""
        n_dead = int(dead.sum())
        if flat.shape[0] >= n_dead:
            pick = torch.randperm(flat.shape[0], device=flat.device)[:n_dead]
        else:
            pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device)
        fresh = flat[pick].to(self.codebook.dtype)
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.codebook.data[dead] = fresh
        if self.ema:
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = fresh
        self.steps_unused[dead] = 0
        log.debug("restarted %d unused codes of %d", n_dead, self.codebook_size)
