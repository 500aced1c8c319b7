"""The Zarr store + Parquet manifest: layout, atomic commits, concurrency, torn writes, queries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import zarr
from typer.testing import CliRunner

import ldam_sweep as ls
from ldam_sweep.cli import app
from ldam_sweep.sampling.chains import default_snapshot_steps
from ldam_sweep.store import BlockWriter, StoreError, commit, create_store, failed_rows, verify_store
from ldam_sweep.store import manifest
from ldam_sweep.planning import plan_store
from ldam_sweep.failpoints import KILL_AFTER_ENV

CHAINS, STEPS, BLOCK = 2, 12, 4


def make_plan(model, spec=None, realism=False):
    return plan_store(
        model, {"conv2": list(range(16)), "fc2": None}, chains=CHAINS, steps=STEPS,
        snapshot_steps=default_snapshot_steps(STEPS, 6), block_size=BLOCK, realism=realism,
        spec=spec or {"job": "test", "layers": ["conv2", "fc2"]},
    )


def sample_block(model, lp, block, seed=0):
    return ls.sample(model, lp.name, lp.block_units(block), chains=CHAINS, steps=STEPS, seed=seed, snapshot_every=6)


def write_and_commit(url, model, plan, layer, blocks, seed=0):
    w = BlockWriter(url)
    lp = plan.layer(layer)
    rows = []
    results = {}
    for b in blocks:
        results[b] = sample_block(model, lp, b, seed)
        rows += w.write(layer, b, results[b], seconds=0.5)
    commit(url, rows)
    return results


@pytest.fixture
def store(tmp_path, digits_model):
    url = str(tmp_path / "sweep.zarr")
    plan = make_plan(digits_model)
    create_store(url, plan)
    return url, plan


@pytest.mark.fast
def test_layout_grid_equals_block_size(store):
    url, plan = store
    root = zarr.open_group(url, mode="r")
    samples = root["layers/conv2/samples"]
    assert samples.shape == (32, CHAINS, 2, 1, 28, 28) and samples.dtype == np.float16
    assert samples.shards == (BLOCK, CHAINS, 2, 1, 28, 28)  # one shard per block: never shared by two writers
    assert samples.chunks == (1, CHAINS, 2, 1, 28, 28)  # one unit per inner chunk: cheap single-unit reads
    assert root["layers/conv2/activation"].chunks == (BLOCK, CHAINS, STEPS + 1)
    assert root["layers/fc2/samples"].shards[0] == BLOCK
    attrs = dict(root.attrs)
    assert attrs["spec"] == {"job": "test", "layers": ["conv2", "fc2"]}
    assert len(attrs["spec_hash"]) == 64 and attrs["model"]["fingerprint"] == plan.model_fingerprint
    assert {"torch", "zarr", "pyarrow"} <= set(attrs["versions"])
    assert "realism" not in root["layers/conv2"]


@pytest.mark.fast
def test_write_commit_query_roundtrip(store, digits_model):
    url, plan = store
    results = write_and_commit(url, digits_model, plan, "conv2", [0, 2])
    st = ls.open_store(url)
    units = st.units()
    assert units.num_rows == 8 and sorted(units["unit"].to_pylist()) == [0, 1, 2, 3, 8, 9, 10, 11]
    np.testing.assert_allclose(st.samples("conv2", 9), results[2].samples[1], atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(st.trace("conv2", 9), results[2].activation[1])
    row = st.units("conv2", unit=9).to_pylist()[0]
    assert row["act_final_mean"] == pytest.approx(results[2].final_activation[1].mean(), rel=1e-6)
    assert row["block"] == 2 and row["status"] == "ok" and row["checksum"]
    # sort + top-k + filter by any column
    top = st.units(sort="act_final_mean", limit=3)
    vals = units["act_final_mean"].to_numpy()
    assert top["act_final_mean"].to_pylist() == pytest.approx(sorted(vals, reverse=True)[:3])
    low = st.units(where=pc.field("act_final_mean") < float(np.median(vals)))
    assert 0 < low.num_rows < 8
    assert st.units(sort="unit", descending=False)["unit"].to_pylist()[0] == 0
    with pytest.raises(StoreError, match="cannot sort by 'nope'"):
        st.units(sort="nope")
    sql = st.sql("SELECT count(*) AS n, max(act_final_mean) AS m FROM units WHERE layer = 'conv2'").to_pylist()[0]
    assert sql["n"] == 8 and sql["m"] == pytest.approx(vals.max())
    layers = {d["name"]: d for d in st.layers()}
    assert layers["conv2"]["done"] == 8 and layers["conv2"]["pending"] == 8 and layers["fc2"]["pending"] == 10
    assert verify_store(st) == (2, [])


@pytest.mark.fast
def test_duplicate_commits_are_deduplicated_newest_wins(store, digits_model):
    url, plan = store
    lp = plan.layer("fc2")
    res = sample_block(digits_model, lp, 0)
    w = BlockWriter(url)
    commit(url, w.write("fc2", 0, res, attempt=1))
    commit(url, w.write("fc2", 0, res, attempt=2))  # Ray ran the block twice: harmless
    st = ls.open_store(url)
    assert st.manifest("fc2").num_rows == 8
    units = st.units("fc2")
    assert units.num_rows == 4 and set(units["attempt"].to_pylist()) == {2}
    assert verify_store(st) == (1, [])


@pytest.mark.fast
def test_part_files_written_before_the_new_score_columns_still_read(store, digits_model):
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ldam_sweep.sampling.scoring import score_result
    from ldam_sweep.store import manifest

    url, plan = store
    new = ("lowpass_diversity", "lowpass_diversity_ratio", "feature_diversity_ratio", "facets")
    lp = plan.layer("fc2")
    res = sample_block(digits_model, lp, 0)
    scores = score_result(digits_model, res)
    rows = BlockWriter(url).write("fc2", 0, res, unit_columns=scores)
    old_schema = pa.schema([f for f in manifest.FILE_SCHEMA if f.name not in new])
    old = [{k: v for k, v in r.items() if k in old_schema.names} | {"committed_at": dt.datetime.now(dt.timezone.utc)}
           for r in rows]
    folder = Path(url) / manifest.parts_dir(ls.open_store(url).loc) / "layer=fc2"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(old, schema=old_schema), folder / "part-0-old.parquet")
    commit(url, BlockWriter(url).write("fc2", 1, sample_block(digits_model, lp, 1), unit_columns=score_result(
        digits_model, sample_block(digits_model, lp, 1))))
    st = ls.open_store(url)
    units = {r["unit"]: r for r in st.units("fc2").to_pylist()}
    assert sorted(units) == list(range(8))
    assert all(units[u][c] is None for u in range(4) for c in new)  # old file: the new columns read as null
    assert all(units[u]["lowpass_diversity"] > 0 and units[u]["facets"] >= 1 for u in range(4, 8))
    assert units[0]["pixel_diversity"] == pytest.approx(scores[0]["pixel_diversity"])
    assert st.units("fc2", sort="facets", limit=4)["unit"].to_pylist() != []
    assert verify_store(st) == (2, [])


@pytest.mark.fast
def test_failed_block_is_recorded_and_not_readable(store, digits_model):
    url, plan = store
    lp = plan.layer("fc2")
    commit(url, failed_rows(lp, 2, "RuntimeError: boom", attempt=3, spec_hash=plan.spec_hash()))
    st = ls.open_store(url)
    failed = st.units(status="failed")
    assert failed["unit"].to_pylist() == [8, 9] and failed["error"][0].as_py() == "RuntimeError: boom"
    assert st.units().num_rows == 0
    with pytest.raises(StoreError, match="unit 9 of layer 'fc2' failed: RuntimeError: boom"):
        st.samples("fc2", 9)
    assert {d["name"]: d["failed"] for d in st.layers()}["fc2"] == 2


@pytest.mark.fast
def test_store_opens_with_plain_zarr_pyarrow_and_duckdb(store, digits_model):
    url, plan = store
    results = write_and_commit(url, digits_model, plan, "fc2", [0, 1])
    # verify --repair's tombstones: one part at the top of the manifest with the layer as a column
    manifest.publish(ls.open_store(url).loc, [{"layer": "fc2", "unit": 0, "block": 0, "status": "corrupt"}], one_part=True)
    manifest.publish(ls.open_store(url).loc, [{"layer": "fc2", "unit": 1, "block": 0, "status": "ok"}])  # a newer row
    from ldam_sweep.store.verify import record_verification

    record_verification(ls.open_store(url), [], [])  # a record the store gets (verify's): a group of its own
    # every warning is an error: the store opens, lists and reads cleanly with zarr, xarray, pyarrow, DuckDB
    code = textwrap.dedent(f"""
        import json, sys, warnings
        warnings.simplefilter("error")
        import numpy as np, zarr, xarray as xr, pyarrow.dataset as pds, duckdb
        root = zarr.open_group({url!r}, mode="r")
        members = sorted(root.keys())
        s = root["layers/fc2/samples"][5]
        layer = xr.open_zarr({url!r} + "/layers/fc2")
        final = layer.samples.sel(unit=5).isel(snapshot=-1)
        manifest = pds.dataset({url!r} + "/manifest/parts", format="parquet", partitioning="hive")
        t = manifest.to_table()
        d = duckdb.sql("SELECT layer, status, count(*) FROM (SELECT * FROM manifest QUALIFY row_number() OVER "
                       "(PARTITION BY layer, unit ORDER BY committed_at DESC) = 1) GROUP BY ALL ORDER BY ALL").fetchall()
        print(json.dumps({{"shape": list(s.shape), "mean": float(np.asarray(s, dtype=np.float64).mean()),
                          "members": members, "coords": {{k: layer[k].values.tolist() for k in ("unit", "chain", "snapshot")}},
                          "final": float(final.astype("float64").mean()), "dims": list(final.dims),
                          "rows": t.num_rows, "layers": sorted(set(t["layer"].to_pylist())), "duck": d,
                          "imported": any(m.startswith("ldam_sweep") for m in sys.modules)}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["imported"] is False
    assert got["members"] == ["layers", "manifest", "root-copy", "verify"]  # every top-level entry a Zarr group
    assert got["shape"] == [CHAINS, 2, 1, 28, 28]
    mean = float(results[1].samples[1].astype(np.float16).astype(np.float64).mean())
    assert got["mean"] == pytest.approx(mean, rel=1e-4)
    assert got["coords"] == {"unit": list(range(10)), "chain": list(range(CHAINS)), "snapshot": list(plan.snapshot_steps)}
    assert got["dims"] == ["chain", "c", "y", "x"]
    assert got["final"] == pytest.approx(float(results[1].samples[1][:, -1].astype(np.float16).astype(np.float64).mean()),
                                         rel=1e-4)
    # 8 rows committed, then 2 more; the newest per unit: unit 0's tombstone, unit 1's newer row
    assert got["rows"] == 10 and got["layers"] == ["fc2"] and got["duck"] == [["fc2", "corrupt", 1], ["fc2", "ok", 7]]


# argv: store, blocks, and optionally a folder: the writer then puts <folder>/ready-<pid> there once
# its blocks are sampled and waits (at most 10 min) for <folder>/start before it writes them.
WRITER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import ldam_sweep as ls
    from ldam_sweep.store import BlockWriter, commit
    url, blocks = sys.argv[1], [int(b) for b in sys.argv[2].split(",")]
    model = ls.load_model("digits-cnn", device="cpu")
    w = BlockWriter(url)
    lp = w.plan.layer("conv2")
    results = [(b, ls.sample(model, "conv2", lp.block_units(b), chains=%d, steps=%d, snapshot_every=6)) for b in blocks]
    if len(sys.argv) > 3:
        folder = Path(sys.argv[3])
        (folder / f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 600
        while not (folder / "start").exists():
            assert time.monotonic() < deadline, "no start file after 600 s"
            time.sleep(0.005)
    rows = []
    for b, r in results:
        rows += w.write("conv2", b, r)
    commit(url, rows)
""" % (CHAINS, STEPS))


def test_processes_writing_blocks_of_one_layer_at_once_lose_nothing(store, digits_model, model_cache, tmp_path):
    """Two processes writing blocks of one layer at the same moment lose nothing: every unit as sampled, verify clean."""
    import time

    url, plan = store
    env = {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache)}
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, url, blocks, str(gate)], env=env,
                         stderr=subprocess.PIPE, text=True)
        for blocks in ("0,2", "1,3")
    ]
    t0 = time.time()  # both sampled and waiting, then both released at once: the writes overlap
    while len(list(gate.glob("ready-*"))) < 2:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.time() - t0 < 600, "the writers did not get ready in 600 s"  # a bound for failing, not a wait
        time.sleep(0.05)
    (gate / "start").touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    st = ls.open_store(url)
    assert st.units("conv2").num_rows == 16
    lp = plan.layer("conv2")
    for b in range(4):
        expected = sample_block(digits_model, lp, b)
        for i, u in enumerate(lp.block_units(b)):
            np.testing.assert_allclose(st.samples("conv2", u), expected.samples[i], atol=2e-3)
            np.testing.assert_array_equal(st.trace("conv2", u), expected.activation[i])
    assert verify_store(st) == (4, [])


@pytest.mark.fast
def test_killed_writer_leaves_nothing_visible_and_the_rewrite_is_correct(store, digits_model, model_cache):
    url, plan = store
    env = {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), KILL_AFTER_ENV: "samples"}
    proc = subprocess.run([sys.executable, "-c", WRITER_SCRIPT, url, "1"], env=env, capture_output=True, text=True)
    assert proc.returncode == -9  # SIGKILL after the samples shard, before traces and commit
    assert (Path(url) / "layers/conv2/samples/c/1/0/0/0/0/0").exists()
    st = ls.open_store(url)
    assert st.units().num_rows == 0
    with pytest.raises(StoreError, match="unit 5 of layer 'conv2' is not committed yet"):
        st.samples("conv2", 5)
    reader = st
    # a torn shard from the kill must not break the retry (zarr 3.1 reads the old shard first)
    shard = Path(url) / "layers/conv2/samples/c/1/0/0/0/0/0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    results = write_and_commit(url, digits_model, plan, "conv2", [1])
    assert reader.units().num_rows == 0 and reader.refresh().units().num_rows == 4  # cached until refresh()
    st = ls.open_store(url)
    np.testing.assert_allclose(st.samples("conv2", 5), results[1].samples[1], atol=2e-3)
    assert verify_store(st) == (1, [])


@pytest.mark.fast
def test_verify_names_the_corrupted_block(store, digits_model):
    url, plan = store
    write_and_commit(url, digits_model, plan, "fc2", [0, 1])
    root = zarr.open_group(url, mode="r+")
    act = root["layers/fc2/activation"]
    act[5, 0, 3] = act[5, 0, 3] + 1.0  # silent bit rot in block 1
    cli = CliRunner().invoke(app, ["verify", url], env={"COLUMNS": "200"})
    assert cli.exit_code == 1
    assert "layer 'fc2' block 1: checksum mismatch" in cli.stderr and "block 0" not in cli.stderr
    shard = Path(url) / "layers/fc2/samples/c/0/0/0/0/0/0"
    shard.write_bytes(b"garbage")
    checked, problems = verify_store(ls.open_store(url))
    assert checked == 2 and [(p.block, p.problem.split(":")[0]) for p in problems] == [(0, "unreadable"), (1, "checksum mismatch")]


@pytest.mark.fast
def test_a_whole_block_is_written_as_sampled_and_the_callers_arrays_stay_untouched(store, digits_model):
    """A whole block is written from the result's own arrays (no NaN-filled copy); a NaN with another
    bit pattern (a diverged chain) is stored as the canonical NaN, in a copy, and the block's checksum
    holds (verify's one complaint: the test did not flag those chains as diverged, as scoring would)."""
    url, plan = store
    lp = plan.layer("conv2")
    res = ls.sample(digits_model, "conv2", lp.block_units(1), chains=CHAINS, steps=STEPS, snapshot_every=6,
                    snapshot_dtype=torch.float16)  # as the worker samples: already the store's type
    odd = np.array([0x7E01], dtype=np.uint16).view(np.float16)[0]  # a quiet NaN, not numpy's 0x7E00
    res.samples[2, 1, 0, 0, 5, 5] = odd
    res.activation[3, 0, -1] = np.array([0x7FC00001], dtype=np.uint32).view(np.float32)[0]
    before = {k: getattr(res, k).copy() for k in ("samples", "activation")}
    commit(url, BlockWriter(url).write("conv2", 1, res, seconds=0.1))
    for k, v in before.items():  # bit for bit: the writer changed nothing of the caller's
        assert getattr(res, k).tobytes() == v.tobytes()
    raw = zarr.open_group(url, mode="r")["layers/conv2/samples"][6]  # unit 6 = the block's third unit
    assert raw.dtype == np.float16 and raw[1, 0, 0, 5, 5:6].view(np.uint16)[0] == np.float16(np.nan).view(np.uint16)
    expected = res.samples[2].copy()
    expected[1, 0, 0, 5, 5] = np.nan
    np.testing.assert_array_equal(raw, expected)  # everything else exactly as sampled
    st = ls.open_store(url)
    np.testing.assert_array_equal(st.samples("conv2", 5), res.samples[1])
    assert np.isnan(st.trace("conv2", 7)[0, -1])
    checked, problems = verify_store(st)  # the checksum of what was written holds
    assert checked == 1 and [p.problem.split(" have ")[1][:12] for p in problems] == ["non-finite c"]  # unflagged here


@pytest.mark.fast
def test_resources_and_store_path_do_not_change_the_sweep_identity(digits_model):
    base = {"job": "x", "resources": {"actors": 1, "block_size": 4, "max_attempts": 3}, "store": "a.zarr"}
    same = {"job": "x", "resources": {"actors": 8, "block_size": 4, "max_attempts": 5}, "store": "s3://b/a.zarr"}
    other = {"job": "x", "resources": {"actors": 1, "block_size": 8}, "store": "a.zarr"}
    h = lambda spec: make_plan(digits_model, spec=spec).plan_hash()  # noqa: E731
    assert h(base) == h(same) and h(base) != h(other)
    assert make_plan(digits_model, spec=same).spec == same  # the store keeps the spec exactly as submitted
    # the memory layout is rounding-level (like hardware) and float32 is the old default: specs written
    # before these fields existed keep their identity; bf16 changes the numerics and a new identity
    old = {"job": "x", "model": {"zoo": "digits-cnn"}}
    new = {"job": "x", "model": {"zoo": "digits-cnn", "memory_format": "auto", "precision": "float32"}}
    flat = {"job": "x", "model": {"zoo": "digits-cnn", "memory_format": "contiguous", "precision": "float32"}}
    bf16 = {"job": "x", "model": {"zoo": "digits-cnn", "memory_format": "auto", "precision": "bf16"}}
    assert h(old) == h(new) == h(flat) != h(bf16)


@pytest.mark.fast
def test_other_spec_is_refused_and_nothing_is_deleted(store, digits_model):
    url, plan = store
    write_and_commit(url, digits_model, plan, "fc2", [0])
    create_store(url, plan)  # the same plan again: idempotent, data kept
    assert ls.open_store(url).units().num_rows == 4
    other = make_plan(digits_model, spec={"job": "other"})
    with pytest.raises(StoreError, match="different spec.*Nothing was changed.*--fresh"):
        create_store(url, other)
    assert ls.open_store(url).units().num_rows == 4
    create_store(url, other, fresh=True)
    st = ls.open_store(url)
    assert st.units().num_rows == 0 and st.spec() == {"job": "other"}


@pytest.mark.fast
def test_clear_errors_for_wrong_paths_layers_and_units(store, tmp_path, digits_model):
    url, plan = store
    with pytest.raises(StoreError, match="is not an ldam-sweep store: it does not exist"):
        ls.open_store(str(tmp_path / "nothing"))
    (tmp_path / "notes").mkdir()
    with pytest.raises(StoreError, match="has no zarr.json"):
        ls.open_store(str(tmp_path / "notes"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not an ldam-sweep store"):
        ls.open_store(str(tmp_path / "plain.zarr"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    with pytest.raises(StoreError, match="exists and is not empty"):
        create_store(str(tmp_path / "busy"), plan)
    with pytest.raises(StoreError, match="--fresh only ever deletes ldam-sweep stores"):
        create_store(str(tmp_path / "busy"), plan, fresh=True)
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "x"  # never deleted
    with pytest.raises(StoreError, match="not an ldam-sweep store; nothing was changed"):
        create_store(str(tmp_path / "plain.zarr"), plan, fresh=True)
    with pytest.raises(StoreError, match="mistyped URL"):
        create_store("s3:/bucket/x.zarr", plan)
    with pytest.raises(StoreError, match="cannot reach store 'nosuchproto://b/x'"):
        ls.open_store("nosuchproto://b/x")
    st = ls.open_store(url)
    with pytest.raises(StoreError, match="layer 'fc3' is not in store.*Did you mean 'fc2'"):
        st.samples("fc3", 0)
    with pytest.raises(StoreError, match="unit 40 is out of range for layer 'conv2': valid units are 0..31"):
        st.samples("conv2", 40)
    with pytest.raises(StoreError, match="no realism traces"):
        write_and_commit(url, digits_model, plan, "fc2", [0])
        st.trace("fc2", 0, kind="realism")
    lp = plan.layer("conv2")
    wrong = sample_block(digits_model, lp, 1)
    with pytest.raises(StoreError, match="does not match block 0"):
        BlockWriter(url).write("conv2", 0, wrong)


@pytest.mark.fast
def test_cli_status_query_show(store, digits_model, tmp_path):
    url, plan = store
    write_and_commit(url, digits_model, plan, "fc2", [0, 1])
    run = lambda *a: CliRunner().invoke(app, list(a), env={"COLUMNS": "200"})  # noqa: E731
    out = run("status", url)
    assert out.exit_code == 0 and "fc2" in out.stdout and "total" in out.stdout
    line = [l for l in out.stdout.splitlines() if "fc2" in l][0]
    cells = [c.strip() for c in line.split("│")]
    assert cells[3:7] == ["10", "8", "0", "0"] and cells[7] == "2"  # planned, done, failed, corrupt, pending
    out = run("query", url, "--layer", "fc2", "--sort", "act_final_mean", "--limit", "2", "--json")
    rows = json.loads(out.stdout)["units"]
    assert len(rows) == 2 and rows[0]["act_final_mean"] >= rows[1]["act_final_mean"]
    out = run("query", url, "--sort", "bogus")
    assert out.exit_code == 2 and "cannot sort by 'bogus'" in out.stderr and "Traceback" not in out.stderr
    png = tmp_path / "u.png"
    out = run("show", url, "fc2", "3", "-o", str(png))
    assert out.exit_code == 0, out.stderr
    from PIL import Image

    assert Image.open(png).size[1] > CHAINS * 28


def test_a_store_of_layout_1_resumes_verifies_measures_and_builds_its_atlas_in_its_own_layout(tmp_path, digits_model, model_cache):
    """A store laid out as before layout 2 (no ``layout`` attribute, ``root-copy.json``, manifest parts
    directly in ``manifest/``, no coordinate arrays) with one block committed: `ldam-sweep run` resumes
    it (a real process, local Ray), `verify` passes, `realism` writes ``realism.json``, the atlas builds,
    and the store never gains a layout-2 file."""
    import yaml

    from ldam_sweep.atlas.site import build_atlas
    from ldam_sweep.cluster.worker import SweepWorker
    from ldam_sweep.planning import sweep_store_plan
    from ldam_sweep.spec import parse_job
    from ldam_sweep.store.integrity import store_layout
    from ldam_sweep.store.location import StoreLocation

    doc = {"name": "layout1", "model": {"zoo": "digits-cnn"}, "layers": ["fc2"], "units": {"fc2": "0-7"},
           "sampler": {"steps": 4, "chains": 2, "seed": 0}, "data": {"source": "digits", "limit": 64}, "exemplars": 2,
           "resources": {"actors": 1, "block_size": 4}}
    job = parse_job(doc)
    spec_doc = job.model_dump(mode="json", exclude_none=True)
    url = str(tmp_path / "old.zarr")
    create_store(url, sweep_store_plan(job, digits_model, spec_doc), layout=1)
    commit(url, SweepWorker(spec_doc, url, num_threads=1).run_batch("fc2", [(0, [0, 1, 2, 3])], [1])[0])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "run", str(tmp_path / "job.yaml"), "--store", url],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resume: 1 of 2 blocks already committed" in out.stderr
    verify = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "verify", url], env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    st = ls.open_store(url)
    assert st.units("fc2").num_rows == 8 and store_layout(StoreLocation.parse(url)) == 1 and "layout" not in st.attrs
    assert st.realism() is not None
    files = {str(p.relative_to(url)) for p in Path(url).rglob("*") if p.is_file()}
    assert {"root-copy.json", "realism.json", "verify.json"} <= files
    assert not any(f.startswith(("root-copy/", "realism/", "verify/", "manifest/parts/")) or f == "manifest/zarr.json"
                   or "/unit/" in f for f in files), sorted(files)
    assert sum(f.startswith("manifest/layer=fc2/part-") for f in files) >= 2
    report = build_atlas(st, tmp_path / "site")
    assert report.units_rendered == 8
