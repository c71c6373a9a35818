"""The learnt monotone input transformation of the diffusion model (Herbert, "Diffusion Models
for Time-Evolving Precipitation Fields": a monotone MLP with positive weights and a minimum
gradient, trained jointly with the network).

g(u) = MLP(u) + c u on u in [0, 1] (precipitation divided by its scale), the MLP 1 -> 16 ->
16 -> 1 with tanh everywhere and every weight (not bias) kept positive (softplus of a free
parameter), so g is strictly increasing with g' >= c. h(u) = 2 (g(u) - g(0)) / (g(1) - g(0))
- 1 maps [0, 1] onto [-1, 1]. Trained jointly with the diffusion model on

    loss = L_diffusion(h(u)) - mean_i m(h(u_i)) log h'(u_i),

m the indicator of the masking set M (default [-0.99975, 1]: near-dry values, mapped next to
-1, do not shape the transformation). The inverse is found by bisection to ``tol``.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

__all__ = ["MonotoneTransform"]


def _full(u: Tensor) -> Tensor:
    return u.float() if u.dtype in (torch.float16, torch.bfloat16) else u


class MonotoneTransform(nn.Module):
    """h: [0, 1] -> [-1, 1], strictly increasing, learnt; see the module docstring."""

    def __init__(self, hidden: int = 16, min_gradient: float = 0.1) -> None:
        super().__init__()
        if min_gradient <= 0:
            raise ValueError("the minimum-gradient coefficient c must be positive")
        self.c = float(min_gradient)
        sizes = [1, hidden, hidden, 1]
        self.raw = nn.ParameterList(
            [nn.Parameter(torch.randn(o, i) * 0.5 - 1.0) for i, o in itertools.pairwise(sizes)]
        )
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(o)) for o in sizes[1:]])

    def _g(self, u: Tensor) -> Tensor:
        # full precision under mixed-precision autocast: h' and its log are the loss's
        # change-of-variables term, and bf16 would round them to 2-3 digits
        with torch.autocast(u.device.type, enabled=False):
            u = _full(u)
            h = u.reshape(-1, 1)
            for w, b in zip(self.raw, self.bias, strict=True):
                h = torch.tanh(h @ softplus(w).to(u.dtype).T + b.to(u.dtype))
            return h.reshape(u.shape) + self.c * u

    def _ends(self, like: Tensor) -> tuple[Tensor, Tensor]:
        ends = self._g(torch.tensor([0.0, 1.0], dtype=like.dtype, device=like.device))
        return ends[0], ends[1]

    def forward(self, u: Tensor) -> Tensor:
        """h(u) in [-1, 1] for u in [0, 1] (values outside are extrapolated monotonically)."""
        g0, g1 = self._ends(u)
        return 2.0 * (self._g(u) - g0) / (g1 - g0) - 1.0

    def log_derivative(self, u: Tensor) -> Tensor:
        """log h'(u), elementwise, differentiable in the parameters."""
        with torch.enable_grad(), torch.autocast(u.device.type, enabled=False):
            uu = _full(u).detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._g(uu).sum(), uu, create_graph=True)
        g0, g1 = self._ends(u)
        return torch.log(grad) + torch.log(2.0 / (g1 - g0))

    def penalty(self, u: Tensor, masking: tuple[float, float] = (-0.99975, 1.0)) -> Tensor:
        """- mean over pixels of m(h(u)) log h'(u): the change-of-variables term."""
        y = self.forward(u)
        m = ((y >= masking[0]) & (y <= masking[1])).to(u.dtype)
        return -(m * self.log_derivative(u)).sum() / u.numel()

    @torch.no_grad()
    def inverse(self, y: Tensor, tol: float = 1e-6, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        """u with h(u) = y by bisection on [lo, hi] to ``tol`` in u (y clamped to h's range)."""
        y64 = y.double()
        a = torch.full_like(y64, lo)
        b = torch.full_like(y64, hi)
        lo_y = self.forward(torch.tensor(lo, dtype=torch.float64, device=y.device))
        hi_y = self.forward(torch.tensor(hi, dtype=torch.float64, device=y.device))
        target = y64.clamp(float(lo_y), float(hi_y))
        steps = max(1, math.ceil(math.log2((hi - lo) / tol)) + 1)
        for _ in range(steps):
            mid = 0.5 * (a + b)
            above = self.forward(mid) > target
            b = torch.where(above, mid, b)
            a = torch.where(above, a, mid)
        return (0.5 * (a + b)).to(y.dtype)
