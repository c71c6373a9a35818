"""A field as a VQ-VAE's codes: the codes store, its decoding, its compression ratio."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from cloudburst.data.ingest import ingest, open_store
from cloudburst.data.synthetic import SyntheticConfig, write_synthetic
from cloudburst.data.transforms import Scale
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.roles import Reconstructor
from cloudburst.products.codes import (
    code_bits,
    compression_ratio,
    decode_store,
    encode_store,
    stored_bytes,
)
from cloudburst.products.derived import DerivedStoreError

WINDOW = (4, 8, 8)


def coder(seed: int = 0, window: tuple[int, int, int] = WINDOW) -> PrecipitationModel:
    torch.manual_seed(seed)
    entry = registry.family("vqvae")
    cfg = entry.config.model_validate({"kind": "vqvae", **entry.small})
    net = registry.build("vqvae", cfg, window)
    return PrecipitationModel(
        net, "vqvae", cfg, window, Scale(0.0, 40.0, "unit"), {"units": "mm/h"}
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("codes") / "precip.zarr")
    write_synthetic(SyntheticConfig(nt=10, ny=12, nx=10), url, progress=False)
    return url


def test_code_bits_and_the_ratio_of_one_window():
    assert [code_bits(k) for k in (1, 2, 64, 65, 2048, 4096)] == [1, 1, 6, 7, 11, 12]
    # 4 x 8 x 8 float32 values (8,192 bits) against 4 x 2 x 2 codes of 6 bits (96 bits)
    assert compression_ratio((4, 8, 8), (4, 2, 2), 64) == pytest.approx(8192 / 96)
    with pytest.raises(ValueError, match="codebook_size"):
        code_bits(0)


def test_codes_decode_to_the_models_own_reconstruction_of_each_block(store, tmp_path):
    model = coder()
    out = str(tmp_path / "codes.zarr")
    marker = encode_store(model, store, out, model_uri="models:/vq/1", progress=False)
    ds, _ = open_store(store)
    field = ds["precip"].values.astype(np.float32)
    group = zarr.open_group(out, mode="r")
    codes = np.asarray(group["codes"][:])
    # time is not downsampled; space by the small config's factor 2, rounded up
    assert codes.shape == (10, 6, 5)
    assert codes.dtype == np.uint16
    assert int(codes.max()) < 64
    book = model.network(Reconstructor).quantiser.codebook.detach().numpy()
    np.testing.assert_array_equal(np.asarray(group["codebook"][:]), book)
    decoded = decode_store(model, out)
    # block by block (time steps 0-3, 4-7, 8-9) through the model's own reconstruction
    net = model.network(Reconstructor)
    expected = []
    for a in range(0, 10, 4):
        x = torch.from_numpy(model.to_model_space(field[None, a : a + 4]))[:, None]
        with torch.no_grad():
            expected.append(model.to_physical(net.reconstruct(x))[0])
    np.testing.assert_allclose(decoded, np.concatenate(expected), rtol=0, atol=1e-5)
    assert decoded.shape == field.shape
    assert marker["code_shape"] == [10, 6, 5]
    assert marker["ratio"] == pytest.approx(32 * 4 * 12 * 10 / (6 * 4 * 6 * 5))
    assert 0 < marker["codebook_usage"] <= 1
    # a part of the record decodes as the same steps of the whole
    np.testing.assert_array_equal(decode_store(model, out, time=slice(4, 8)), decoded[4:8])


def test_the_same_request_keeps_the_store_and_another_is_refused(store, tmp_path):
    out = str(tmp_path / "codes.zarr")
    first = encode_store(coder(), store, out, model_uri="models:/vq/1", progress=False)
    codes_file = next(Path(out, "codes").rglob("c/*/*/*"))
    before = codes_file.stat().st_mtime_ns
    again = encode_store(coder(), store, out, model_uri="models:/vq/1", progress=False)
    assert again["fingerprint"] == first["fingerprint"]
    assert codes_file.stat().st_mtime_ns == before
    with pytest.raises(DerivedStoreError, match="another complete store"):
        encode_store(coder(), store, out, model_uri="models:/vq/2", progress=False)
    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DerivedStoreError, match="is not a complete codes store"):
        encode_store(coder(), store, str(other), progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_store_with_missing_values_keeps_them_missing(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.gamma(0.5, 2.0, size=(4, 8, 8)).astype(np.float32)
    values[:, :2, :3] = np.nan
    source = tmp_path / "source.nc"
    xr.Dataset(
        {"precip": (("time", "y", "x"), values, {"units": "mm/h"})},
        coords={
            "time": np.datetime64("2020-01-01T00", "h") + np.arange(4).astype("timedelta64[h]"),
            "y": np.arange(8.0),
            "x": np.arange(8.0),
        },
    ).to_netcdf(source)
    url = str(tmp_path / "nan.zarr")
    ingest(str(source), url, progress=False)
    out = str(tmp_path / "codes.zarr")
    encode_store(coder(), url, out, progress=False)
    decoded = decode_store(coder(), out)
    assert np.isnan(decoded[:, :2, :3]).all()
    assert np.isfinite(decoded[:, 2:, :]).all() and np.isfinite(decoded[:, :, 3:]).all()


def test_decoding_with_another_model_is_refused(store, tmp_path):
    out = str(tmp_path / "codes.zarr")
    encode_store(coder(), store, out, model_uri="models:/vq/1", progress=False)
    with pytest.raises(ValueError, match="models:/vq/1"):
        decode_store(coder(window=(2, 8, 8)), out)


def test_codes_take_less_room_than_the_float32_store(tmp_path):
    url = str(tmp_path / "big.zarr")
    write_synthetic(SyntheticConfig(nt=16, ny=32, nx=32), url, progress=False)
    out = str(tmp_path / "codes.zarr")
    encode_store(coder(), url, out, progress=False)
    source_bytes = stored_bytes(url, prefix="precip")
    codes_bytes = stored_bytes(out, prefix="codes")
    assert source_bytes > 0 and codes_bytes > 0
    # 16 x 16 x 16 uint16 codes at most: a quarter of the cells, half the width of float32
    assert codes_bytes < source_bytes
    assert codes_bytes <= math.prod((16, 16, 16)) * 2 + 1024
