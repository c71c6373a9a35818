"""Evaluation of image-to-image translation (near-infrared to visible satellite imagery).

The translation model maps the SEVIRI 1.6 micron near-infrared channel, regridded bicubically
onto the ~1 km HRV grid, to the HRV visible channel. This module scores translations and
provides the two baselines a translation model has to beat, independently of storage: every
function takes numpy arrays or torch tensors whose last two axes are (y, x); leading axes
(frames, or the models' (batch, 1, time)) are folded into frames.

* :func:`image_scores`: SSIM, PSNR and MAE of predictions against targets (scikit-image's
  ``structural_similarity`` and ``peak_signal_noise_ratio``), with a validity mask.
* :class:`LinearMapBaseline`: target = gain * input + offset, fitted by least squares.
* :class:`ConvRegression`: a small fully convolutional network trained with MSE on patches,
  sized to a parameter budget (e.g. that of the translation model).
* :func:`translation_table`: a Markdown table of scores per method.
* :func:`translation_figure`: a PNG of input, target and outputs side by side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from cloudburst.evaluation.figures import figure, wrapped_title

log = logging.getLogger(__name__)

__all__ = [
    "SSIM_WINDOW",
    "ConvRegression",
    "LinearMapBaseline",
    "image_scores",
    "translation_figure",
    "translation_table",
]

SSIM_WINDOW = 7  # side of the square uniform SSIM window (scikit-image's default)


# ------------------------------------------------------------------------------ inputs


def _numpy(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(
            f"{name}: expected an array whose last two axes are (y, x), got {arr.shape}"
        )
    return arr


def _frames(a: Any, name: str) -> np.ndarray:
    """float64 (frames, y, x): all axes before the last two folded into frames."""
    arr = _numpy(a, name)
    return arr.reshape((-1,) + arr.shape[-2:])


def _data_range(data_range: Any) -> float:
    try:
        value = float(data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}")
    return value


# ------------------------------------------------------------------------------ scores


def image_scores(
    pred: Any,
    target: Any,
    *,
    data_range: float,
    mask: Any | None = None,
    win_size: int = SSIM_WINDOW,
) -> dict[str, float]:
    """SSIM, PSNR and MAE of ``pred`` against ``target`` over frames.

    ``pred``, ``target``: arrays or tensors of one shape whose last two axes are (y, x) (e.g.
    (frames, y, x) or (batch, 1, time, y, x)), in the same normalised units. ``data_range``:
    the span of those units (1.0 for data normalised to [0, 1]); it sets SSIM's constants
    C1 = (0.01 data_range)^2, C2 = (0.03 data_range)^2 and PSNR's peak. ``mask``: True where a
    pixel counts, of the frames' shape or (y, x) (the same for every frame); pixels where
    ``pred`` or ``target`` is not finite never count.

    * ``mae``: mean |pred - target| over all valid pixels of all frames.
    * ``psnr``: 10 log10(data_range^2 / MSE) in dB, MSE over all valid pixels of all frames
      (``peak_signal_noise_ratio``); ``inf`` when the MSE is 0 (identical images).
    * ``ssim``: per frame, scikit-image's SSIM map (``structural_similarity``, a
      ``win_size`` x ``win_size`` uniform window, 7 by default, sample covariances) averaged
      over the valid pixels whose whole window is valid and inside the frame (so the frame's
      border of (win_size - 1) / 2 pixels is left out, as scikit-image does, and masked or
      non-finite pixels influence nothing); then averaged over frames. Invalid pixels are
      filled with one constant in both images before the map is computed. A frame with no
      such pixel is left out of the average; NaN if every frame is.

    Also returned: ``mse``, ``pixels`` (valid pixels) and ``frames`` (frames in the SSIM mean).
    """
    dr = _data_range(data_range)
    p, t = _numpy(pred, "pred"), _numpy(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ in shape")
    p, t = p.reshape((-1,) + p.shape[-2:]), t.reshape((-1,) + t.shape[-2:])
    valid = np.isfinite(p) & np.isfinite(t)
    if mask is not None:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.dtype != bool:
            raise ValueError(f"mask must be boolean (True where a pixel counts), got {m.dtype}")
        if m.shape == p.shape[-2:]:
            m = np.broadcast_to(m, p.shape)
        elif m.size == p.size and m.shape[-2:] == p.shape[-2:]:
            m = m.reshape(p.shape)
        else:
            raise ValueError(f"mask {m.shape} matches neither the frames {p.shape} nor (y, x)")
        valid &= m
    if not valid.any():
        raise ValueError("no valid pixel: the mask and the finite values leave nothing to score")
    w = int(win_size)
    if w < 3 or w % 2 == 0:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    if min(p.shape[-2:]) < w:
        raise ValueError(f"frames {p.shape[-2:]} are smaller than the SSIM window {w} x {w}")

    diff = p[valid] - t[valid]
    mse = float(np.mean(diff**2))
    mae = float(np.mean(np.abs(diff)))
    if mse == 0.0:
        psnr = math.inf
    else:
        psnr = float(peak_signal_noise_ratio(t[valid], p[valid], data_range=dr))

    # pixels whose whole window is valid and inside the frame
    core = ndimage.minimum_filter(valid, size=(1, w, w), mode="constant", cval=False)
    per_frame = []
    for k in range(p.shape[0]):
        if not core[k].any():
            continue
        fill = float(np.mean(t[k][valid[k]])) if valid[k].any() else 0.0
        pk = np.where(valid[k], p[k], fill)
        tk = np.where(valid[k], t[k], fill)
        _, smap = structural_similarity(tk, pk, win_size=w, data_range=dr, full=True)
        per_frame.append(float(np.mean(smap[core[k]])))
    if not per_frame:
        log.warning("no frame has a pixel whose %d x %d window is valid: SSIM is NaN", w, w)
    ssim = float(np.mean(per_frame)) if per_frame else math.nan
    return {
        "ssim": ssim,
        "psnr": psnr,
        "mae": mae,
        "mse": mse,
        "pixels": float(valid.sum()),
        "frames": float(len(per_frame)),
    }


# --------------------------------------------------------------------------- baselines


class LinearMapBaseline:
    """target ~ gain * input + offset, fitted by least squares on the frames given to ``fit``.

    The input is the near-infrared channel already upsampled (bicubically) to the target grid;
    this is what translation gains over a global linear recalibration of that input.
    """

    parameter_count = 2

    def __init__(self) -> None:
        self.gain: float | None = None
        self.offset: float | None = None

    def fit(self, inputs: Any, targets: Any, mask: Any | None = None) -> LinearMapBaseline:
        """Fit gain and offset on the pixels finite in both (and True in ``mask``, if given).

        Pass training frames only: nothing else is seen.
        """
        x, y = _numpy(inputs, "inputs"), _numpy(targets, "targets")
        if x.shape != y.shape:
            raise ValueError(f"inputs {x.shape} and targets {y.shape} differ in shape")
        ok = np.isfinite(x) & np.isfinite(y)
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            if m.shape != x.shape and m.shape != x.shape[-2:]:
                raise ValueError(f"mask {m.shape} matches neither the frames {x.shape} nor (y, x)")
            ok &= np.broadcast_to(m, x.shape)
        if ok.sum() < 2:
            raise ValueError("fewer than 2 valid pixels: cannot fit a gain and an offset")
        xv, yv = x[ok], y[ok]
        xm, ym = xv.mean(), yv.mean()
        var = np.mean((xv - xm) ** 2)
        if var == 0:
            raise ValueError("the inputs are constant: the gain is undetermined")
        self.gain = float(np.mean((xv - xm) * (yv - ym)) / var)
        self.offset = float(ym - self.gain * xm)
        log.info("linear map fitted on %d pixels: gain %.6g, offset %.6g", ok.sum(), *self.coef)
        return self

    @property
    def coef(self) -> tuple[float, float]:
        """(gain, offset); RuntimeError before ``fit``."""
        if self.gain is None or self.offset is None:
            raise RuntimeError("LinearMapBaseline is not fitted: call fit(inputs, targets) first")
        return self.gain, self.offset

    def predict(self, inputs: Any) -> np.ndarray:
        """gain * inputs + offset, float64, in the inputs' shape (NaN stays NaN)."""
        gain, offset = self.coef
        return gain * _numpy(inputs, "inputs") + offset


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, padding_mode="replicate")


class ConvRegression(nn.Module):
    """A small fully convolutional regression network: input frame -> target frame.

    ``depth`` convolutions of ``kernel`` x ``kernel`` (``width`` channels between them, ReLU
    after all but the last, replicate padding), added to a learned linear map of the input (a
    1 x 1 convolution: the network contains :class:`LinearMapBaseline`, and :meth:`fit` starts
    from it). Frames are translated one by one: a (batch, 1, time, y, x) tensor is treated as
    batch * time frames, so these are 2D convolutions over (y, x), equivalently 3D ones of
    extent 1 in time. Fully convolutional: trained on patches, applied to whole frames of any
    size.

    Parameters: (depth - 2) (k^2 w^2 + w) + 2 k^2 w + w + 3 (:meth:`count`).
    """

    def __init__(self, width: int = 16, depth: int = 3, kernel: int = 3) -> None:
        super().__init__()
        if width < 1 or depth < 2 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(
                f"need width >= 1, depth >= 2 and an odd kernel, got {width}, {depth}, {kernel}"
            )
        self.width, self.depth, self.kernel = int(width), int(depth), int(kernel)
        layers: list[nn.Module] = [_conv(1, width, kernel), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [_conv(width, width, kernel), nn.ReLU()]
        layers.append(_conv(width, 1, kernel))
        self.body = nn.Sequential(*layers)
        self.linear = nn.Conv2d(1, 1, 1)
        self.losses: list[float] = []

    @staticmethod
    def count(width: int, depth: int = 3, kernel: int = 3) -> int:
        """Parameters of a network of this width, depth and kernel (without building it)."""
        k2 = kernel * kernel
        return (depth - 2) * (k2 * width * width + width) + 2 * k2 * width + width + 3

    @classmethod
    def for_parameter_count(cls, n: int, depth: int = 3, kernel: int = 3) -> ConvRegression:
        """The network of ``depth`` and ``kernel`` whose parameter count is nearest ``n``."""
        if n < cls.count(1, depth, kernel):
            raise ValueError(
                f"{n} parameters is below the smallest network of depth {depth} "
                f"({cls.count(1, depth, kernel)})"
            )
        width = 1
        while cls.count(width + 1, depth, kernel) <= n:
            width += 1
        if abs(cls.count(width + 1, depth, kernel) - n) < abs(cls.count(width, depth, kernel) - n):
            width += 1
        return cls(width=width, depth=depth, kernel=kernel)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(frames, 1, y, x) -> (frames, 1, y, x)."""
        return self.linear(x) + self.body(x)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()

    @torch.no_grad()
    def start_from_linear_map(self, inputs: Any, targets: Any) -> None:
        """Make the network the least-squares linear map of ``inputs`` to ``targets``.

        The 1 x 1 map takes :class:`LinearMapBaseline`'s gain and offset and the last
        convolution is zeroed, so training starts from that baseline and refines it.
        """
        gain, offset = LinearMapBaseline().fit(inputs, targets).coef
        self.linear.weight.fill_(gain)
        self.linear.bias.fill_(offset)
        last = self.body[-1]
        last.weight.zero_()
        last.bias.zero_()

    def fit(
        self,
        patches_in: Any,
        patches_target: Any,
        steps: int = 300,
        lr: float = 1e-3,
        seed: int = 0,
        batch_size: int = 16,
        device: str | torch.device | None = None,
    ) -> ConvRegression:
        """Train with Adam on the MSE, ``steps`` minibatches of patches.

        Training starts from fresh random weights, the linear part and the last convolution
        set by :meth:`start_from_linear_map` (the linear baseline of these patches).

        ``patches_in``, ``patches_target``: one shape, last two axes (y, x), finite. The
        weights are initialised and the minibatches drawn from ``seed``: on CPU two fits with
        one seed and one thread count give identical weights (CUDA convolutions may differ in
        the last bits). ``device``: where to train (default: CUDA when available, else CPU);
        the network stays there. ``losses`` holds the minibatch losses.
        """
        x = torch.as_tensor(_frames(patches_in, "patches_in"), dtype=torch.float32)[:, None]
        y = torch.as_tensor(_frames(patches_target, "patches_target"), dtype=torch.float32)
        y = y[:, None]
        if x.shape != y.shape:
            raise ValueError(
                f"patches_in {tuple(x.shape)} and patches_target {tuple(y.shape)} differ in shape"
            )
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("patches must be finite: draw them away from missing pixels")
        if steps < 1 or batch_size < 1 or not lr > 0:
            raise ValueError(
                f"need steps >= 1, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}"
            )
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.reset_parameters()
        self.start_from_linear_map(patches_in, patches_target)
        self.to(dev).train()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        self.losses = []
        with torch.enable_grad():  # also when called from code that turned gradients off
            for step in range(int(steps)):
                idx = torch.randint(x.shape[0], (batch_size,), generator=gen)
                xb, yb = x[idx].to(dev), y[idx].to(dev)
                loss = torch.mean((self(xb) - yb) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.losses.append(float(loss.detach()))
                if (step + 1) % 100 == 0 or step + 1 == steps:
                    log.info("conv regression step %d/%d: mse %.6g", step + 1, steps, loss.item())
        self.eval()
        return self

    @torch.no_grad()
    def predict(self, inputs: Any, chunk: int = 1) -> np.ndarray:
        """Translate whole frames, ``chunk`` frames at a time: float32, the inputs' shape.

        Non-finite input pixels spread to the outputs within the network's receptive field.
        """
        arr = _numpy(inputs, "inputs")
        frames = arr.reshape((-1,) + arr.shape[-2:])
        self.eval()
        dev = next(self.parameters()).device
        out = np.empty(frames.shape, dtype=np.float32)
        for start in range(0, frames.shape[0], max(1, int(chunk))):
            xb = torch.as_tensor(frames[start : start + chunk], dtype=torch.float32)[:, None]
            out[start : start + chunk] = self(xb.to(dev))[:, 0].cpu().numpy()
        return out.reshape(arr.shape)


# ---------------------------------------------------------------------- table and figure


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    v = float(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def translation_table(rows: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: one row per method, columns SSIM, PSNR (dB) and MAE.

    ``rows``: method -> scores (as from :func:`image_scores`), or a sequence of score dicts
    each with a ``"method"`` key. Optional keys add columns when any row has them:
    ``"parameters"`` (trained parameters) and ``"codebook_usage"`` (share of the codebook's
    codes used, in [0, 1], shown in %); rows without them show ``-``.
    """
    if isinstance(rows, Mapping):
        items = [(str(k), v) for k, v in rows.items()]
    else:
        items = []
        for row in rows:
            if "method" not in row:
                raise ValueError(f"a row has no 'method' key: {dict(row)}")
            items.append((str(row["method"]), row))
    if not items:
        raise ValueError("no rows: there is no method to tabulate")
    for name, scores in items:
        missing = [k for k in ("ssim", "psnr", "mae") if k not in scores]
        if missing:
            raise ValueError(f"{name}: missing scores {missing}")
    params = any("parameters" in s for _, s in items)
    usage = any("codebook_usage" in s for _, s in items)
    head = ["method", "SSIM", "PSNR (dB)", "MAE"]
    head += ["parameters"] * params + ["codebook usage"] * usage
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for name, s in items:
        cells = [name, _fmt(s["ssim"], 4), _fmt(s["psnr"], 2), _fmt(s["mae"], 4)]
        if params:
            cells.append(f"{int(s['parameters']):,}" if s.get("parameters") is not None else "-")
        if usage:
            u = s.get("codebook_usage")
            cells.append("-" if u is None else f"{100.0 * float(u):.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PANEL = 2.0  # inches: the height of one image panel in translation_figure
COLORBAR = 1.0  # inches added to the width for the colourbar
TITLE = 0.5  # inches added to the height for the title


def translation_figure(
    input: Any,
    target: Any,
    outputs: Mapping[str, Any],
    path: str | Path,
    *,
    frames: int | Sequence[int] = 3,
    title: str = "near-infrared to visible translation",
    units: str = "normalised",
    dpi: int = 100,
) -> Path:
    """Write a PNG of input, target and each output side by side, one row per frame.

    All arrays share the shape of ``target`` (last two axes (y, x), leading ones folded into
    frames). ``frames``: how many frames, evenly spread, or their indices. One grey colour
    scale for every panel, from the smallest to the largest finite value shown, with one
    colourbar labelled ``units``; non-finite pixels are red. The PNG is
    (PANEL * x / y * (2 + len(outputs)) + COLORBAR) by (PANEL * rows + TITLE) inches at
    ``dpi``. Returns the path.
    """
    from matplotlib import colormaps

    t = _frames(target, "target")
    panels = {"input": _frames(input, "input"), "target": t}
    for name, out in outputs.items():
        if str(name) in panels:
            raise ValueError(f"output name {name!r} clashes with a panel already shown")
        panels[str(name)] = _frames(out, str(name))
    for name, arr in panels.items():
        if arr.shape != t.shape:
            raise ValueError(f"{name} {arr.shape} and target {t.shape} differ in shape")
    if isinstance(frames, int):
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        idx = np.unique(np.linspace(0, t.shape[0] - 1, min(frames, t.shape[0])).round().astype(int))
    else:
        idx = np.asarray(list(frames), dtype=int)
        if idx.size == 0 or (idx < -t.shape[0]).any() or (idx >= t.shape[0]).any():
            raise ValueError(f"frames {list(frames)} out of range for {t.shape[0]} frames")
    shown = [arr[idx] for arr in panels.values()]
    finite = np.concatenate([a[np.isfinite(a)] for a in shown])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    vmax = vmax if vmax > vmin else vmin + 1e-6
    cmap = colormaps["gray"].with_extremes(bad="red")

    aspect = t.shape[-1] / t.shape[-2]
    ncols, nrows = len(panels), idx.size
    size = (PANEL * aspect * ncols + COLORBAR, PANEL * nrows + TITLE)
    fig = figure(figsize=size, dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for i, k in enumerate(idx):
        for j, (name, arr) in enumerate(panels.items()):
            ax = axes[i, j]
            image = ax.imshow(
                arr[k], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", origin="lower"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
        axes[i, 0].set_ylabel(f"frame {int(k)}", fontsize=8)
    cbar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, pad=0.01)
    cbar.set_label(units, fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    wrapped_title(fig, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    log.info("translation figure written to %s", out)
    return out
