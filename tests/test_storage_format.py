"""How a store keeps images (the spec's ``store:`` section): 8-bit pixels, thumbnail snapshots and
starts beside full-size finals, zstd with a row delta; and a store written by the previous release
(float16, full size, zarr's default codecs) keeps opening, verifying and resuming in its own format."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import ldam_sweep as ls
from ldam_sweep.sampling.chains import ChainResult
from ldam_sweep.spec import parse_job
from ldam_sweep.store import BlockWriter, commit, create_store, verify_store
from ldam_sweep.store.schema import LayerPlan, StorePlan, shrink

LEGACY = Path(__file__).parent / "data" / "legacy"
SHAPE, CHAINS, SNAPS, STEPS, K = (3, 96, 96), 3, (5, 10), 10, 2


def smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3, 96, 96) images in [0, 1] with photo-like smoothness (noise blurred by upsampling)."""
    coarse = rng.random((n, 3, 12, 12), dtype=np.float32)
    return np.repeat(np.repeat(coarse, 8, axis=-2), 8, axis=-1) * 0.9 + 0.1 * rng.random((n, *SHAPE), dtype=np.float32)


def plan_of(**storage) -> StorePlan:
    layer = LayerPlan("conv", "conv", "Conv2d", 6, (6, 4, 4), 4, "channel")
    return StorePlan(layers=(layer,), chains=CHAINS, steps=STEPS, snapshot_steps=SNAPS, image_shape=SHAPE,
                     value_range=(0.0, 1.0), exemplars_k=K, model_name="synthetic", model_fingerprint="0" * 64,
                     spec={"test": True}, starts=True, **storage)


def block(rng: np.random.Generator, units: list[int]) -> tuple[ChainResult, tuple[np.ndarray, np.ndarray]]:
    n = len(units)
    samples = smooth_images(rng, n * CHAINS * len(SNAPS)).reshape(n, CHAINS, len(SNAPS), *SHAPE)
    activation = rng.standard_normal((n, CHAINS, STEPS + 1)).astype(np.float32)
    activation[0, 1, -1] = np.nan  # the block's first unit's chain 1 diverged at the end: NaN trace and image
    samples[0, 1, -1] = np.nan
    ex_act = rng.random((n, K)).astype(np.float32)
    ex_act[1, 1] = np.nan  # unit 1 had a single real image
    result = ChainResult(layer="conv", units=np.asarray(units), objective="channel", method="ldam", seed=0, lam=0.0,
                         steps=STEPS, options={}, snapshot_steps=np.asarray(SNAPS), samples=samples, activation=activation,
                         starts=smooth_images(rng, n * CHAINS).reshape(n, CHAINS, *SHAPE))
    return result, (smooth_images(rng, n * K).reshape(n, K, *SHAPE), ex_act)


@pytest.mark.fast
def test_eight_bit_thumbnail_store_reads_back_within_half_a_level_and_is_smaller_than_the_old_format(tmp_path):
    """The same blocks written in today's default format and in the previous release's: finals read back
    within half a level (1/510) of the float32 values, snapshots and starts are the block means of the
    originals, a diverged chain and a missing exemplar read as NaN as in float stores, verify passes, and
    the 8-bit store takes under a quarter of the bytes per unit."""
    new_plan = plan_of(pixels="uint8", thumbnail=4, zstd_level=9)
    old_plan = new_plan.legacy_formats()[0]
    assert old_plan.plan_hash() == plan_of().plan_hash()  # the old format is the plan without any storage fields
    rng = np.random.default_rng(0)
    blocks = [block(rng, [0, 1, 2, 3]), block(rng, [4, 5])]
    stores = {}
    for name, plan in (("new", new_plan), ("old", old_plan)):
        url = str(tmp_path / f"{name}.zarr")
        create_store(url, plan)
        writer = BlockWriter(url)
        diverged = {u: {"diverged_fraction": 1 / CHAINS} for u in (0, 4)}  # as the worker flags chain 1 of each first unit
        commit(url, [row for b, (res, ex) in enumerate(blocks)
                     for row in writer.write("conv", b, res, exemplars=ex, unit_columns=diverged)])
        stores[name] = ls.open_store(url)
        assert verify_store(url)[1] == [], name
    new, old = stores["new"], stores["old"]
    raw = zarr.open_group(new.loc.url, mode="r")["layers/conv"]
    assert raw["samples"].dtype == np.uint8 and raw["samples"].shape == (6, CHAINS, len(SNAPS), 3, 24, 24)
    assert raw["finals"].shape == (6, CHAINS, *SHAPE) and raw["starts"].shape == (6, CHAINS, 3, 24, 24)

    res, (ex, ex_act) = blocks[0]
    final = new.finals("conv", 2)
    err = np.abs(final - res.samples[2, :, -1])
    assert err.max() <= 0.5 / 255 + 1e-6 and err.max() > 0  # 8-bit: within half a level, not lossless
    np.testing.assert_allclose(old.finals("conv", 2), res.samples[2, :, -1], atol=5e-4)  # float16
    np.testing.assert_allclose(new.samples("conv", 2), shrink(res.samples[2], 4), atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(new.starts("conv", 2), shrink(res.starts[2], 4), atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(new.read_block("conv", 0)["finals"], old.read_block("conv", 0)["finals"], atol=0.5 / 255 + 5e-4)
    for st in (new, old):
        f0 = st.finals("conv", 0)
        assert np.isnan(f0[1]).all() and np.isfinite(f0[0]).all()  # the diverged chain, in both formats
        assert np.isnan(st.samples("conv", 0)[1, -1]).all() and np.isfinite(st.samples("conv", 0)[1, 0]).all()
        images, acts = st.exemplars("conv", 1)
        assert np.isnan(acts[1]) and np.isfinite(images[0]).all()
    assert np.isnan(new.exemplars("conv", 1)[0][1]).all()  # a missing exemplar: NaN, not a black image
    sizes = {name: st.storage() for name, st in stores.items()}
    assert sizes["new"]["format"] == {"pixels": "uint8", "snapshot_shape": [3, 24, 24], "image_shape": list(SHAPE),
                                      "thumbnail_factor": 4, "zstd_level": 9}
    assert sizes["old"]["format"]["pixels"] == "float16" and sizes["old"]["format"]["zstd_level"] is None
    per_unit = {name: s["bytes_per_unit"] for name, s in sizes.items()}
    assert per_unit["new"] < per_unit["old"] / 4, per_unit
    assert set(sizes["new"]["layers"]["conv"]["per_unit"]) == set(new_plan.arrays("conv"))
    # plain xarray opens a layer whose snapshots are thumbnails: they have their own dimensions
    import xarray as xr

    layer = xr.open_zarr(f"{new.loc.url}/layers/conv")
    assert layer.samples.dims[-2:] == ("thumb_y", "thumb_x") and layer.finals.dims[-2:] == ("y", "x")
    assert layer.sizes["thumb_y"] == 24 and layer.sizes["y"] == 96 and layer.finals.dtype == np.uint8
    ds = new.unit("conv", 2).to_xarray()
    assert ds.samples.dims[-2:] == ("thumb_y", "thumb_x") and ds.exemplars.dims[-2:] == ("y", "x")


@pytest.mark.fast
def test_the_store_section_takes_a_url_or_a_mapping_and_names_a_bad_field():
    job = parse_job({"model": {"zoo": "digits-cnn"}, "store": "s3://bucket/run.zarr"})
    assert job.store.url == "s3://bucket/run.zarr" and job.store.pixels == "uint8" and job.store.snapshot_size == 64
    job = parse_job({"model": {"zoo": "digits-cnn"}, "store": {"pixels": "float16", "snapshot_size": "full", "zstd_level": None}})
    assert job.store.url is None and job.store.snapshot_px is None and job.store.zstd_level is None
    with pytest.raises(ls.SpecError, match=r"store\.pixels: .*'uint8', 'float16' or 'float32' \(got 'int8'\)"):
        parse_job({"model": {"zoo": "digits-cnn"}, "store": {"pixels": "int8"}})
    with pytest.raises(ls.SpecError, match=r"store\.zstd_level: .*less than or equal to 22"):
        parse_job({"model": {"zoo": "digits-cnn"}, "store": {"zstd_level": 30}})


def test_a_store_written_by_the_previous_release_opens_verifies_and_resumes_in_its_own_format(tmp_path, model_cache):
    """tests/data/legacy/store-0.x.zarr was written by the code of commit d5bdbe2 (float16 images at full
    size, zarr's default codecs) with its last block's commit removed, as a crash leaves it. Today's code
    reads it (samples, finals, starts, exemplars), verifies it, and `ldam-sweep run` (a real process,
    local Ray) finishes it in its own format: no array changes type or shape. On a CPU whose float
    rounding trains the zoo's digits-cnn to other weights, the run must refuse instead (the store names
    its model by the weights' fingerprint) and change nothing."""
    url = str(tmp_path / "store.zarr")
    shutil.copytree(LEGACY / "store-0.x.zarr", url)
    st = ls.open_store(url)
    assert st.plan.pixels == "float16" and st.plan.thumbnail == 1 and st.plan.zstd_level is None
    assert st.units("fc2").num_rows == 8 and verify_store(url)[1] == []
    samples, finals = st.samples("fc2", 5), st.finals("fc2", 5)
    assert samples.shape == (2, 4, 1, 28, 28) and np.isfinite(samples).all()
    np.testing.assert_array_equal(finals, samples[:, -1])
    assert st.starts("fc2", 5).shape == (2, 1, 28, 28) and st.exemplars("fc2", 5)[0].shape == (2, 1, 28, 28)
    assert st.storage()["format"]["pixels"] == "float16"
    before = {name: (a.dtype, a.shape) for name, a in zarr.open_group(url, mode="r")["layers/fc2"].arrays()}
    env = {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "run", str(LEGACY / "spec.yaml"), "--store", url],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if ls.load_model("digits-cnn", device="cpu").fingerprint != st.plan.model_fingerprint:
        # this CPU trains the zoo's digits-cnn to other weights than the machine that wrote the store did
        # (float rounding differs between CPU models): the resume must refuse, name the weights and
        # change nothing; the resume itself is checked where the weights are reproduced
        assert out.returncode == 2 and "model weights (fingerprint) 8dca0768a88a ->" in out.stderr, out.stderr
        assert "Nothing was changed" in out.stderr
        st = ls.open_store(url)
        assert st.units("fc2").num_rows == 8 and verify_store(url)[1] == []
        assert {name: (a.dtype, a.shape) for name, a in zarr.open_group(url, mode="r")["layers/fc2"].arrays()} == before
        return
    assert out.returncode == 0, out.stderr
    assert "resume: 2 of 3 blocks already committed" in out.stderr
    st = ls.open_store(url)
    assert st.units("fc2").num_rows == 10 and verify_store(url)[1] == []
    assert {name: (a.dtype, a.shape) for name, a in zarr.open_group(url, mode="r")["layers/fc2"].arrays()} == before
    assert np.isfinite(st.finals("fc2", 9)).all() and st.plan.pixels == "float16"


@pytest.mark.fast
def test_a_store_refuses_another_image_format_and_names_the_field(tmp_path):
    """The format is fixed when a store is made: a plan with another zstd level or pixel type is refused
    with the field, the values and the way out (--fresh); nothing in the store changes."""
    from ldam_sweep.errors import LdamError
    from ldam_sweep.store.layout import check_store

    url = str(tmp_path / "s.zarr")
    plan = plan_of(pixels="uint8", thumbnail=4, zstd_level=9)
    create_store(url, plan)
    before = (tmp_path / "s.zarr" / "zarr.json").read_bytes()
    assert check_store(url, plan) == "same"
    with pytest.raises(LdamError, match=r"store\.zstd_level: 9 -> 3 .*--fresh"):
        check_store(url, plan_of(pixels="uint8", thumbnail=4, zstd_level=3))
    with pytest.raises(LdamError, match=r"store\.pixels: uint8 -> float32"):
        check_store(url, plan_of(pixels="float32", thumbnail=4, zstd_level=9))
    assert (tmp_path / "s.zarr" / "zarr.json").read_bytes() == before
