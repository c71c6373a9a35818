"""A field as the integer codes of a discrete coder (a VQ-VAE): a lossy compressor.

:func:`encode_store` reads an ingested store's variable in blocks of the model's window
length over the whole grid (the coder is convolutional) and writes one Zarr v3 store:

- ``codes`` uint16 (time, code_y, code_x) (int32 past 65,536 codes), chunked one block of
  time steps per chunk: code k of the codebook at each code cell;
- ``codebook`` float32 (code, code_dim): the coder's codebook, row k code k's vector;
- ``valid`` bool (time, y, x), only when the source has missing values: where it had values
  (decoding puts NaN elsewhere);
- attributes: the model (URI, family, window, transform), the source store and variable, its
  fingerprint, the grid's shape and units.

:func:`decode_store` gives the field back in physical units. :func:`compression_ratio` is the
ratio of float32 bits to code bits for one window; :func:`stored_bytes` measures what the
stores take on disk (after Zarr's own compression), for a ratio of stores.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cloudburst import storage
from cloudburst.data.ingest import variable_stats
from cloudburst.markers import read_marker
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.roles import DiscreteCoder
from cloudburst.products.derived import open_derived, source_field, write_derived

__all__ = [
    "KIND",
    "code_bits",
    "compression_ratio",
    "decode_store",
    "encode_store",
    "stored_bytes",
]

log = logging.getLogger(__name__)

KIND = "codes"


def code_bits(codebook_size: int) -> int:
    """Bits one code needs: ceil(log2 K), at least 1."""
    if int(codebook_size) < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    return max(1, math.ceil(math.log2(int(codebook_size))))


def compression_ratio(
    window: tuple[int, ...], code_shape: tuple[int, ...], codebook_size: int
) -> float:
    """float32 bits of a ``window`` (time, y, x) over the bits of its codes ``code_shape``
    (time', y', x') at :func:`code_bits` each: what the codes save before any entropy coding,
    the codebook (shared by every window) left out."""
    values = math.prod(int(n) for n in window)
    codes = math.prod(int(n) for n in code_shape)
    if values < 1 or codes < 1:
        raise ValueError(f"empty window {window} or codes {code_shape}")
    return 32.0 * values / (code_bits(codebook_size) * codes)


def stored_bytes(url: str, options: dict[str, Any] | None = None, prefix: str = "") -> int:
    """Bytes of the objects under ``url`` (only those under ``url/prefix`` when given)."""
    fs, path = storage.filesystem(url, options)
    root = f"{path.rstrip('/')}/{prefix}" if prefix else path
    return int(sum(fs.du(root, total=False).values())) if fs.exists(root) else 0


def encode_store(
    model: PrecipitationModel,
    source: str,
    output: str,
    *,
    model_uri: str = "",
    variable: str | None = None,
    source_options: dict[str, Any] | None = None,
    output_options: dict[str, Any] | None = None,
    progress: bool = True,
    on_block: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Encode ``variable`` of the ingested store ``source`` into a codes store at ``output``;
    returns its marker (with ``codes``, ``code_shape``, ``ratio`` of code bits). A complete
    store of the same request is kept as it is. ``on_block(done, total)`` is called after
    each block with the time steps encoded so far; what it raises stops the run (nothing is
    left written)."""
    coder = model.network(DiscreteCoder)
    _, name, field = source_field(source, variable or model.input_variable, source_options)
    stats = variable_stats(source, source_options)[name]
    nt, ny, nx = (int(n) for n in field.shape)
    block = int(model.window[0])
    source_marker = read_marker(source, source_options) or {}
    identity = {
        "product": KIND,
        "model": model_uri or model.name,
        "model_config": model.config,
        "window": list(model.window),
        "transform": model.transform.state(),
        "source": source,
        "source_fingerprint": source_marker.get("fingerprint"),
        "variable": name,
    }
    size = int(coder.codebook_size)
    dtype = np.uint16 if size <= 2**16 else np.int32
    device = model.device

    def fill(group: Any) -> dict[str, Any]:
        first = field.isel(time=slice(0, min(block, nt))).values.astype(np.float32)
        with torch.no_grad():
            probe = coder.encode_codes(to_tensor(model, first, device))
        _, _, cy, cx = (int(n) for n in probe.shape)
        codes = group.create_array(
            "codes",
            shape=(nt, cy, cx),
            chunks=(block, cy, cx),
            dtype=dtype,
            fill_value=0,
            dimension_names=["time", "code_y", "code_x"],
        )
        book = coder.codebook_vectors().cpu().numpy().astype(np.float32)
        vectors = group.create_array(
            "codebook", shape=book.shape, dtype=np.float32, dimension_names=["code", "code_dim"]
        )
        vectors[...] = book
        valid = None
        if stats.nan_fraction > 0:
            valid = group.create_array(
                "valid",
                shape=(nt, ny, nx),
                chunks=(block, ny, nx),
                dtype=bool,
                fill_value=True,
                dimension_names=["time", "y", "x"],
            )
        group.attrs.update(
            {
                "model": model_uri or model.name,
                "family": model.name,
                "window": list(model.window),
                "transform": model.transform.state(),
                "units": model.units,
                "source": source,
                "variable": name,
                "shape": [nt, ny, nx],
                "codebook_size": size,
                "code_bits": code_bits(size),
            }
        )
        counts = np.zeros(size, dtype=np.int64)
        bar = tqdm(total=nt, desc=f"encode {output}", unit="step", disable=not progress)
        for a in range(0, nt, block):
            b = min(nt, a + block)
            values = field.isel(time=slice(a, b)).values.astype(np.float32)
            with torch.no_grad():
                got = coder.encode_codes(to_tensor(model, values, device))[0].cpu().numpy()
            codes[a:b] = got.astype(dtype)
            counts += np.bincount(got.ravel(), minlength=size)
            if valid is not None:
                valid[a:b] = np.isfinite(values)
            bar.update(b - a)
            if on_block is not None:
                on_block(b, nt)
        bar.close()
        used = counts > 0
        freq = counts[used] / counts.sum()
        return {
            "codes": int(counts.sum()),
            "code_shape": [nt, cy, cx],
            "codebook_usage": float(used.mean()),
            "perplexity": float(np.exp(-(freq * np.log(freq)).sum())),
            "ratio": compression_ratio((block, ny, nx), (block, cy, cx), size),
        }

    return write_derived(output, output_options, identity, fill, kind=KIND)


def decode_store(
    model: PrecipitationModel,
    url: str,
    *,
    options: dict[str, Any] | None = None,
    time: slice | None = None,
) -> np.ndarray:
    """The field of the codes store at ``url`` (time steps ``time``, default all) in physical
    units, float32 (time, y, x); NaN where the source had no value."""
    coder = model.network(DiscreteCoder)
    group = open_derived(url, options, KIND)
    nt, ny, nx = (int(n) for n in group.attrs["shape"])
    window = tuple(int(n) for n in group.attrs["window"])
    if window != tuple(model.window) or int(group.attrs["codebook_size"]) != coder.codebook_size:
        raise ValueError(
            f"{url} was encoded by a model of window {window} and "
            f"{group.attrs['codebook_size']} codes; this model has window {model.window} and "
            f"{coder.codebook_size}: decode with the model it names ({group.attrs['model']})"
        )
    span = time or slice(0, nt)
    a, b, _ = span.indices(nt)
    block = window[0]
    out = []
    for start in range(a, b, block):
        stop = min(b, start + block)
        codes = torch.from_numpy(np.asarray(group["codes"][start:stop], dtype=np.int64))
        with torch.no_grad():
            y = coder.decode_codes(codes[None].to(model.device))[:, :, :, :ny, :nx]
        out.append(model.to_physical(y)[0])
    field = np.concatenate(out) if out else np.zeros((0, ny, nx), np.float32)
    if "valid" in group:
        field = np.where(np.asarray(group["valid"][a:b]), field, np.float32(np.nan))
    return field.astype(np.float32)


def to_tensor(model: PrecipitationModel, values: np.ndarray, device: torch.device) -> torch.Tensor:
    """Physical (time, y, x) -> model space (1, 1, time, y, x) on ``device``."""
    return torch.from_numpy(model.to_model_space(values[None]))[:, None].to(device)
