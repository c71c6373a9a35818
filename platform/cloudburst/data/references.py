"""kerchunk references: read NetCDF4/HDF5 and NetCDF3 archives as if they were Zarr.

A reference set maps Zarr keys to byte ranges inside the original files, so an archive of
NetCDF files on object storage can be opened lazily and read chunk by chunk without a copy.
Many files are combined along time into one reference set.
"""

from __future__ import annotations

import glob as _glob
import json
from typing import Any

import fsspec
import xarray as xr

from cloudburst import storage

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NETCDF3_MAGIC = b"CDF"


class ReferenceError(ValueError):
    """References could not be built or opened; the message names the file and the cause."""


def expand(urls: str | list[str], options: dict[str, Any] | None = None) -> list[str]:
    """A sorted list of file URLs from a URL, a glob pattern or a list of either."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        if any(c in item for c in "*?["):
            if storage.is_remote(item):
                fs, path = storage.filesystem(item, options)
                proto = storage.protocol_of(item)
                out.extend(f"{proto}://{p}" for p in sorted(fs.glob(path)))
            else:
                out.extend(sorted(_glob.glob(storage.local_path(item))))
        else:
            out.append(item)
    if not out:
        raise ReferenceError(f"no files match {urls!r}")
    return out


def file_kind(url: str, options: dict[str, Any] | None = None) -> str:
    """``"hdf5"`` (NetCDF4 is HDF5) or ``"netcdf3"``, from the file's magic bytes."""
    fs, path = storage.filesystem(url, options)
    try:
        with fs.open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ReferenceError(f"no such file: {url}") from None
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(NETCDF3_MAGIC):
        return "netcdf3"
    raise ReferenceError(
        f"{url} is neither NetCDF4/HDF5 nor NetCDF3 (starts with {head!r}); "
        "references can only be built for those formats"
    )


def _full_url(url: str) -> str:
    return url if storage.is_remote(url) else "file://" + storage.filesystem(url)[1]


def single_file_references(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """kerchunk references (version 1 dict) for one NetCDF/HDF5 file."""
    kind = file_kind(url, options)
    full = _full_url(url)
    opts = options if storage.is_remote(url) else {}
    if kind == "hdf5":
        from kerchunk.hdf import SingleHdf5ToZarr

        with fsspec.open(full, "rb", **(opts or {})) as f:
            return SingleHdf5ToZarr(f, full, inline_threshold=300).translate()
    from kerchunk.netCDF3 import NetCDF3ToZarr

    return NetCDF3ToZarr(full, storage_options=opts or None, inline_threshold=300).translate()


def build_references(
    urls: str | list[str], options: dict[str, Any] | None = None, concat_dim: str = "time"
) -> dict[str, Any]:
    """References for one file or many files combined along ``concat_dim``."""
    files = expand(urls, options)
    refs = [single_file_references(u, options) for u in files]
    if len(refs) == 1:
        return refs[0]
    from kerchunk.combine import MultiZarrToZarr
    from kerchunk.utils import inline_array

    remote = files[0]
    remote_options = dict(options or {}) if storage.is_remote(remote) else {}
    if storage.is_remote(remote):
        # the combiner reads each file's coordinate through its own loop; inline it first so
        # the combination itself needs no remote reads
        refs = [
            inline_array(r, threshold=0, names=[concat_dim], remote_options=dict(remote_options))
            for r in refs
        ]
    combined = MultiZarrToZarr(
        refs,
        concat_dims=[concat_dim],
        coo_map={concat_dim: f"cf:{concat_dim}"},
        remote_protocol=storage.protocol_of(remote),
        remote_options=remote_options,
    )
    return combined.translate()


def write_references(refs: dict[str, Any], url: str, options: dict[str, Any] | None = None) -> None:
    storage.write_bytes_atomic(url, json.dumps(refs).encode(), options)


def load_references(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    url = url[len("reference://") :] if url.startswith("reference://") else url
    try:
        return json.loads(storage.read_bytes(url, options))
    except FileNotFoundError:
        raise ReferenceError(f"no such reference file: {url}") from None
    except json.JSONDecodeError as exc:
        raise ReferenceError(f"{url} is not a kerchunk reference JSON: {exc}") from None


def _remote_protocol(refs: dict[str, Any]) -> str | None:
    for value in refs.get("refs", refs).values():
        if isinstance(value, list) and value and isinstance(value[0], str):
            return storage.protocol_of(value[0])
    return None


def open_references(
    refs: dict[str, Any] | str,
    options: dict[str, Any] | None = None,
    *,
    chunks: dict[str, int] | None = None,
) -> xr.Dataset:
    """Open a reference set (dict or URL of its JSON) as a lazy xarray Dataset.

    ``options`` are the storage options of the files the references point into.
    """
    if isinstance(refs, str):
        refs = load_references(refs, options)
    proto = _remote_protocol(refs) or "file"
    so: dict[str, Any] = {"remote_protocol": proto}
    if proto in ("s3", "gs"):
        so["remote_options"] = dict(options or {})  # kerchunk adds keys to what it gets
    return xr.open_dataset(refs, engine="kerchunk", storage_options=so, chunks=chunks)
