"""A 3D U-Net over (time, y, x) conditioned on the log signal-to-noise ratio lambda.

Levels of residual blocks (GroupNorm, SiLU, 3x3x3 convolutions, the lambda embedding added
between the two convolutions); down- and upsampling halve and double y and x only (time, 10
hours in the study, stays whole); skip connections concatenate. Width and depth come from the
config (``widths`` per level, ``blocks`` per level). lambda enters through a sinusoidal
embedding of lambda / lambda_max and a small MLP.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["UNet3D", "lambda_embedding"]


def lambda_embedding(lam: Tensor, dim: int, scale: float = 30.0) -> Tensor:
    """Sinusoidal features (n, dim) of lambda / scale at geometric frequencies 1 .. 1000."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=lam.device))
    arg = (lam.float() / scale)[:, None] * freqs[None, :] * math.pi
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None, None]
        h = self.conv2(torch.nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet3D(nn.Module):
    """``forward(z (n, 1, t, y, x), lambda (n,)) -> v^`` of the same shape as ``z``."""

    def __init__(
        self,
        window: tuple[int, int, int],
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: int = 1,
        emb: int = 64,
        lambda_scale: float = 30.0,
    ) -> None:
        super().__init__()
        _, y, x = window
        levels = len(widths)
        if y % 2 ** (levels - 1) or x % 2 ** (levels - 1):
            raise ValueError(
                f"a {levels}-level U-Net halves y and x {levels - 1} times: the window's y and "
                f"x ({y}, {x}) must be multiples of {2 ** (levels - 1)}; change the window size "
                "or the number of widths"
            )
        self.window = tuple(window)
        self.emb_dim, self.lambda_scale = emb, lambda_scale
        self.embed = nn.Sequential(nn.Linear(emb, emb * 2), nn.SiLU(), nn.Linear(emb * 2, emb * 2))
        e = emb * 2
        self.inp = nn.Conv3d(1, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        chans = [widths[0]]
        c = widths[0]
        for i, w in enumerate(widths):
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(ResBlock(c, w, e))
                c = w
                chans.append(c)
            self.down.append(level)
            if i < levels - 1:
                self.pool.append(nn.Conv3d(c, c, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
                chans.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, e), ResBlock(c, c, e)])
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            level = nn.ModuleList()
            for _ in range(blocks + 1):
                level.append(ResBlock(c + chans.pop(), w, e))
                c = w
            self.up.append(level)
            if i > 0:
                self.unpool.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=(1, 2, 2), mode="nearest"),
                        nn.Conv3d(c, c, 3, padding=1),
                    )
                )
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv3d(c, 1, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z: Tensor, lam: Tensor) -> Tensor:
        e = self.embed(lambda_embedding(lam.reshape(-1), self.emb_dim, self.lambda_scale))
        e = e.to(z.dtype)
        h = self.inp(z)
        skips = [h]
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, e)
                skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
                skips.append(h)
        for block in self.mid:
            h = block(h, e)
        for j, level in enumerate(self.up):
            for block in level:
                h = block(torch.cat([h, skips.pop()], dim=1), e)
            if j < len(self.unpool):
                h = self.unpool[j](h)
        return self.out(h)
