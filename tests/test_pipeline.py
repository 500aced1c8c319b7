"""The worker's pipeline (sampling overlapped with writing), batches of several blocks, the
``batch_units`` manifest column, and reproducibility of stored units."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import ldam_sweep as ls
from conftest import edit_root_attrs
from ldam_sweep.settings import REFERENCE_LDAM, parse_options
from ldam_sweep.cluster.events import SweepCallback
from ldam_sweep.cluster.worker import SweepWorker, set_determinism
from ldam_sweep.failpoints import WRITE_GATE_ENV
from ldam_sweep.planning import BlockTask, pack_batch, sweep_store_plan
from ldam_sweep.spec import parse_job
from ldam_sweep.store import commit, create_store, manifest, verify_store

STORED_ATOL = 0.5 / 255 + 2.5e-4  # 8-bit pixels (half a level) of float16 snapshots (half a float16 step < 2.5e-4)

SPEC = {
    "name": "pipeline",
    "model": {"zoo": "digits-cnn"},
    "layers": ["fc1"],
    "units": {"fc1": "0-23"},
    "sampler": {"steps": 10, "chains": 2, "seed": 5},
    "resources": {"actors": 1, "block_size": 8, "cpus_per_actor": 1, "commit_every": 1},
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, model_cache):
    """A real local-Ray sweep of 3 blocks on 1 actor with the write gate set: a block is written
    only after another block has started sampling."""
    tmp = tmp_path_factory.mktemp("pipeline")
    gate = tmp / "gate"
    gate.mkdir()
    url = str(tmp / "pipeline.zarr")
    with pytest.MonkeyPatch.context() as mp:  # Ray's processes inherit the environment at ray.init
        mp.setenv(WRITE_GATE_ENV, str(gate))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        summary = ls.run_sweep(SPEC, store=url, num_cpus=2, callbacks=[events := Recorder()])
    return summary, url, gate, events


class Recorder(SweepCallback):
    """Every event of a sweep, in order, as (name, payload)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def on_start(self, summary, todo):
        self.seen.append(("start", [t.key for t in todo]))

    def on_block_start(self, tasks, worker, attempts):
        self.seen.append(("block_start", ([t.key for t in tasks], worker, attempts)))

    def on_block_done(self, task, rows):
        self.seen.append(("block_done", (task.key, [r["unit"] for r in rows])))

    def on_block_failed(self, task, error, final):
        self.seen.append(("block_failed", (task.key, error, final)))

    def on_commit(self, rows, blocks):
        self.seen.append(("commit", (sorted(r["unit"] for r in rows), blocks)))

    def on_blocks_end(self, summary):
        self.seen.append(("blocks_end", summary.done_blocks))

    def on_end(self, summary):
        self.seen.append(("end", summary.units_done))


def test_a_sweep_reports_every_block_and_commit_as_events_in_order(swept):
    """A real Ray sweep reports every block's start, end and commit to its callbacks, in order."""
    summary, url, _, events = swept
    names = [name for name, _ in events.seen]
    assert names[0] == "start" and names[-2:] == ["blocks_end", "end"] and "block_failed" not in names
    blocks = [("fc1", b) for b in range(3)]
    assert events.seen[0][1] == blocks
    started = [key for name, (keys, _, _) in ((n, p) for n, p in events.seen if n == "block_start") for key in keys]
    done = [p for n, p in events.seen if n == "block_done"]
    assert sorted(started) == sorted(k for k, _ in done) == blocks
    for key, units in done:  # a block is done only after it was started, with its own units
        start_at = next(i for i, (n, p) in enumerate(events.seen) if n == "block_start" and key in p[0])
        assert start_at < events.seen.index(("block_done", (key, units)))
        assert units == list(range(8 * key[1], 8 * key[1] + 8))
    commits = [p for n, p in events.seen if n == "commit"]  # commit_every 1: one commit per block, after it
    assert [b for _, b in commits] == [1, 1, 1]
    assert sorted(u for units, _ in commits for u in units) == sorted(ls.open_store(url).units()["unit"].to_pylist())
    assert events.seen[-2][1] == summary.done_blocks == 3 and events.seen[-1][1] == summary.units_done == 24


def test_sampling_and_writing_overlap_and_every_block_commits(swept):
    """On real Ray a block is written only after the next one started sampling (overlap), and every block commits."""
    summary, url, gate, _ = swept
    assert (summary.done_blocks, summary.failed_blocks, summary.units_done) == (3, 0, 24)
    assert summary.worker_niceness == [0]  # not Ray's nice 15: the sweep is the work (run_sweep sets it)
    start = summary.startup  # where the time before the first batch went
    assert set(start) == {"driver_s", "ray_init_s", "first_worker_s", "worker"}
    assert set(start["worker"]) == {"imports_s", "model_s", "store_and_data_s", "batch_probe_s"}
    assert start["first_worker_s"] >= start["worker"]["imports_s"] > 0 and start["ray_init_s"] > 0
    # block 0 could be written only once block 1 had started sampling (else it fails after 300 s)
    assert sorted(p.name for p in gate.iterdir()) == [f"sampling-fc1-{b}" for b in range(3)]
    st = ls.open_store(url)
    assert verify_store(st) == (3, [])
    units = st.units()
    assert units["unit"].to_pylist() == list(range(24))
    # an explicit block size: one block per batch (no dead units here; a dead one is not counted: test_dead_units)
    assert set(units["batch_units"].to_pylist()) == {8}
    assert set(units["attempt"].to_pylist()) == {1}


def test_a_unit_resampled_alone_gives_the_stored_samples(swept, digits_model):
    """A unit re-sampled alone in-process gives the samples a real Ray sweep stored."""
    _, url, _, _ = swept
    st = ls.open_store(url)
    s = SPEC["sampler"]
    for unit in (3, 13, 23):
        res = ls.sample(digits_model, "fc1", [unit], chains=s["chains"], steps=s["steps"], seed=s["seed"])
        # the store keeps 8-bit pixels of the float16 snapshots: equal within half a level plus a float16 rounding
        np.testing.assert_allclose(st.samples("fc1", unit), res.samples[0], rtol=0, atol=STORED_ATOL)
        np.testing.assert_allclose(st.trace("fc1", unit), res.activation[0], rtol=1e-5, atol=1e-5)


def test_resampling_with_the_stored_batch_size_runs_a_batch_of_that_size(swept, digits_model):
    """A unit re-sampled at its stored batch_units runs a batch of that size and gives the Ray sweep's samples.

    On a GPU a kernel's rounding depends on the batch's size (benchmarks/reproducibility.py): a
    unit re-sampled with its manifest's ``batch_units`` runs on a batch of exactly that many live
    units, padded with repeats of its own chains, and gives the stored samples."""
    _, url, _, _ = swept
    st = ls.open_store(url)
    s = SPEC["sampler"]
    rows = {r["unit"]: r for r in st.units(status="ok").to_pylist()}
    unit = max(rows, key=lambda u: rows[u]["batch_units"])
    seen = []
    hook = digits_model.net.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape[0]))
    try:
        res = ls.sample(digits_model, "fc1", [unit], chains=s["chains"], steps=s["steps"], seed=s["seed"],
                        batch_units=rows[unit]["batch_units"])
    finally:
        hook.remove()
    assert rows[unit]["batch_units"] > 1 and set(seen[1:]) == {rows[unit]["batch_units"] * s["chains"]}
    assert res.samples.shape[0] == 1
    np.testing.assert_allclose(st.samples("fc1", unit), res.samples[0], rtol=0, atol=STORED_ATOL)
    np.testing.assert_allclose(st.trace("fc1", unit), res.activation[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ls.SamplerError, match="batch_units=1 is smaller than the 2 live units"):
        ls.sample(digits_model, "fc1", [unit, unit + 1 if unit + 1 in rows else unit - 1], chains=2, steps=2,
                  batch_units=1)


@pytest.mark.fast
def test_batch_size_never_changes_a_units_samples(digits_model):
    """Noise and starts are per chain; what may differ is float rounding where the batch changes a
    kernel's blocking (a linear layer's GEMM: activations by 1 ulp on this CPU, samples exact)."""
    kw = dict(chains=3, steps=30, seed=2)
    for layer in ("conv2", "fc1"):
        alone = ls.sample(digits_model, layer, [5], **kw)
        for n in (8, 32):
            batch = ls.sample(digits_model, layer, list(range(n)), **kw)
            np.testing.assert_allclose(batch.samples[5], alone.samples[0], rtol=0, atol=1e-6)
            np.testing.assert_allclose(batch.activation[5], alone.activation[0], rtol=1e-6, atol=1e-6)


@pytest.mark.fast
def test_snapshots_can_leave_the_device_as_float16(digits_model):
    a = ls.sample(digits_model, "conv2", [1, 2], chains=2, steps=10)
    b = ls.sample(digits_model, "conv2", [1, 2], chains=2, steps=10, snapshot_dtype=torch.float16)
    assert a.samples.dtype == np.float32 and b.samples.dtype == np.float16 and b.samples.flags.c_contiguous
    np.testing.assert_array_equal(b.samples, a.samples.astype(np.float16))
    np.testing.assert_array_equal(b.activation, a.activation)


def _store(tmp_path, name, doc, model):
    job = parse_job(doc)
    url = str(tmp_path / f"{name}.zarr")
    create_store(url, sweep_store_plan(job, model, job.model_dump(mode="json", exclude_none=True)))
    return url


@pytest.mark.fast
def test_a_batch_of_several_blocks_stores_what_one_block_tasks_store(tmp_path, digits_model):
    doc = {**SPEC, "data": {"source": "digits", "limit": 64}, "exemplars": 3}
    batched, single = _store(tmp_path, "batched", doc, digits_model), _store(tmp_path, "single", doc, digits_model)
    blocks = [(b, list(range(8 * b, 8 * b + 8))) for b in range(3)]
    rows_batched = SweepWorker(doc, batched, num_threads=1).run_batch("fc1", blocks, [1, 1, 1])
    worker = SweepWorker(doc, single, num_threads=1)
    rows_single = [worker.run_batch("fc1", [block], [1])[0] for block in blocks]
    live = [sum(r["status"] == "ok" for r in rows) for rows in rows_single]  # live units per block
    assert {r["batch_units"] for rows in rows_batched for r in rows} == {sum(live)}
    assert [{r["batch_units"] for r in rows} for rows in rows_single] == [{n} for n in live]
    for a, b in zip(rows_batched, rows_single):
        assert [r["unit"] for r in a] == [r["unit"] for r in b]
        for ra, rb in zip(a, b):
            # rounding only: fc1's GEMM rounds by batch size, and the activation target's update is continuous in
            # the activation (measured: samples <= 4e-7 apart per pixel, nearest_real 1.1e-6 on a value of 0.0075)
            for key in ("act_final_mean", "pixel_diversity", "feature_diversity", "nearest_real", "exemplar_max"):
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-5), key
    for rows in (rows_batched, rows_single):
        commit(batched if rows is rows_batched else single, [r for block in rows for r in block])
    a, b = ls.open_store(batched), ls.open_store(single)
    assert verify_store(a) == verify_store(b) == (3, [])
    for unit in (0, 9, 23):
        np.testing.assert_array_equal(a.samples("fc1", unit), b.samples("fc1", unit))  # float16: equal here
        np.testing.assert_allclose(a.trace("fc1", unit), b.trace("fc1", unit), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a.exemplars("fc1", unit)[0], b.exemplars("fc1", unit)[0])


@pytest.mark.fast
def test_auto_block_size_is_a_grid_of_32_batched_per_actor(tmp_path, digits_model):
    doc = {**SPEC, "layers": ["fc1", "fc2"], "units": {}, "resources": {"actors": 1}}
    job = parse_job(doc)
    assert job.resources.block_size == "auto" and job.resources.grid_units == 32
    url = _store(tmp_path, "auto", doc, digits_model)
    plan = ls.open_store(url).plan
    assert [(lp.name, lp.block_size, lp.n_blocks) for lp in plan.layers] == [("fc1", 32, 4), ("fc2", 10, 1)]
    worker = SweepWorker(doc, url, num_threads=1)
    assert worker.identity()["batch_units"] == {"fc1": 32, "fc2": 10}  # on a CPU: 32 units (whole blocks)
    explicit = SweepWorker({**doc, "resources": {"block_size": 4}}, _store(tmp_path, "four", {**doc, "resources": {"block_size": 4}}, digits_model))
    assert explicit.identity()["batch_units"] == {"fc1": 4, "fc2": 4}  # an explicit size: one block per batch


@pytest.mark.fast
def test_auto_batches_hold_at_most_batch_sample_bytes_of_samples(tmp_path, digits_model, monkeypatch):
    """The cap that keeps a layer's last write short: with room for 128 units per batch, a limit of
    64 units' float16 samples (2 chains x 5 snapshots x 28 x 28) gives batches of 64 (two grid blocks)."""
    import ldam_sweep.cluster.worker as worker_mod

    doc = {**SPEC, "layers": ["fc1"], "units": {}, "resources": {"actors": 1}}
    url = _store(tmp_path, "cap", doc, digits_model)
    monkeypatch.setattr(worker_mod, "CPU_BATCH_UNITS", 128)
    assert SweepWorker(doc, url, num_threads=1).identity()["batch_units"] == {"fc1": 128}
    unit_bytes = 2 * 2 * 5 * 28 * 28
    monkeypatch.setattr(worker_mod, "BATCH_SAMPLE_BYTES", 64 * unit_bytes + unit_bytes // 2)
    assert SweepWorker(doc, url, num_threads=1).identity()["batch_units"] == {"fc1": 64}
    monkeypatch.setattr(worker_mod, "BATCH_SAMPLE_BYTES", unit_bytes)  # never below one grid block
    assert SweepWorker(doc, url, num_threads=1).identity()["batch_units"] == {"fc1": 32}


@pytest.mark.fast
def test_auto_has_the_identity_of_32_and_deterministic_is_not_identity(digits_model):
    def spec_hash(resources):
        job = parse_job({**SPEC, "resources": resources})
        return sweep_store_plan(job, digits_model, job.model_dump(mode="json", exclude_none=True)).spec_hash()

    assert spec_hash({"block_size": "auto"}) == spec_hash({"block_size": 32}) == spec_hash({"block_size": 32, "deterministic": False})
    assert spec_hash({"block_size": 32}) != spec_hash({"block_size": 16})


@pytest.mark.fast
def test_pack_batch_takes_whole_blocks_of_one_layer():
    queue = collections.deque([BlockTask("a", 0, tuple(range(8))), BlockTask("a", 1, tuple(range(8, 16))),
                               BlockTask("a", 2, (16, 17)), BlockTask("b", 0, (0, 1)), BlockTask("b", 1, (2,))])
    assert [t.key for t in pack_batch(queue, 16)] == [("a", 0), ("a", 1)]
    assert [t.key for t in pack_batch(queue, 16)] == [("a", 2)]  # never across layers
    assert [t.key for t in pack_batch(queue, 1)] == [("b", 0)]  # at least one block, even if larger
    assert [t.key for t in pack_batch(queue, 64)] == [("b", 1)] and not queue


@pytest.mark.fast
def test_manifest_files_written_before_batch_units_read_back_as_null(tmp_path, digits_model):
    url = _store(tmp_path, "old", SPEC, digits_model)
    loc = ls.open_store(url).loc
    old_schema = pa.schema([f for f in manifest.FILE_SCHEMA if f.name != "batch_units"])
    folder = tmp_path / "old.zarr" / manifest.parts_dir(loc) / "layer=fc1"
    folder.mkdir(parents=True)
    old_row = {"unit": 0, "block": 0, "status": "failed", "attempt": 1, "error": "old", "spec_hash": "x",
               "committed_at": pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py()}
    pq.write_table(pa.Table.from_pylist([old_row], schema=old_schema), folder / "part-0-old.parquet")
    manifest.publish(loc, [{"layer": "fc1", "unit": 1, "block": 0, "status": "failed", "attempt": 1, "error": "new",
                            "spec_hash": "x", "batch_units": 8}])
    table = manifest.read(loc).sort_by("unit")
    assert table["batch_units"].to_pylist() == [None, 8] and table["error"].to_pylist() == ["old", "new"]


@pytest.mark.fast
def test_determinism_settings():
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled())
    try:
        set_determinism(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.are_deterministic_algorithms_enabled()
        set_determinism(False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[:4]
        torch.use_deterministic_algorithms(saved[4])


@pytest.mark.fast
def test_a_store_made_before_the_new_sampler_defaults_resumes_with_its_own(tmp_path, digits_model):
    """A store without the ``sampler_defaults`` attribute was made when ldam's defaults were the
    reference form (no repulsion, eps 1e-8, uniform starts): its remaining blocks are sampled that
    way, so one store never mixes two samplers; a new store samples with today's defaults."""
    doc = {**SPEC, "data": {"source": "digits", "limit": 64}, "exemplars": 3}
    old, new = _store(tmp_path, "old", doc, digits_model), _store(tmp_path, "new", doc, digits_model)
    edit_root_attrs(old, lambda attrs: attrs.pop("sampler_defaults"))  # as every store written before the attribute existed
    s = SPEC["sampler"]
    reference = ls.sample(digits_model, "fc1", list(range(8)), chains=s["chains"], steps=s["steps"], seed=s["seed"],
                          init="uniform", **REFERENCE_LDAM)
    for url, expect_reference in ((old, True), (new, False)):
        commit(url, SweepWorker(doc, url, num_threads=1).run_batch("fc1", [(0, list(range(8)))], [1])[0])
        stored = ls.open_store(url).samples("fc1", 3)
        same = np.allclose(stored, reference.samples[3], rtol=0, atol=STORED_ATOL)
        assert same == expect_reference


@pytest.mark.fast
def test_one_plan_is_resolved_once_and_a_store_of_another_plan_is_refused(tmp_path, digits_model):
    """resolve() makes the SweepPlan the driver hands to every worker: its targets, objectives,
    store plan and sampler agree with what the spec says; a store's older sampler revision is
    applied to it; a writer given a plan refuses a store made from another."""
    from ldam_sweep.errors import StoreError
    from ldam_sweep.planning import resolve
    from ldam_sweep.settings import SAMPLER_DEFAULTS
    from ldam_sweep.store import BlockWriter

    job = parse_job({**SPEC, "layers": ["conv2", "fc1"], "units": {"conv2": [1, 5]}})
    plan = resolve(job, digits_model)
    assert [(name, units.tolist()) for name, units in plan.targets] == [("conv2", [1, 5]), ("fc1", list(range(128)))]
    assert plan.objectives == {"conv2": "channel", "fc1": "unit"}
    assert [lp.objective for lp in plan.store.layers] == ["channel", "unit"]
    assert [t.key for t in plan.tasks] == [("conv2", 0)] + [("fc1", b) for b in range(16)]
    assert plan.store.plan_hash() == sweep_store_plan(job, digits_model, plan.doc).plan_hash()
    assert plan.sampler.revision == SAMPLER_DEFAULTS and plan.sampler.options.precondition == "auto"
    old = plan.with_revision(1)  # a store made with the reference sampler resumes with it
    assert (old.sampler.init, old.sampler.options.precondition, old.sampler.starts_from_exemplars) == ("uniform", "none", False)
    assert old.sampler.options == parse_options("ldam", REFERENCE_LDAM) and old.store is plan.store
    url = str(tmp_path / "s.zarr")
    create_store(url, plan.store)
    assert BlockWriter(url, plan=plan.store).plan == plan.store
    other = resolve(parse_job({**SPEC, "sampler": {**SPEC["sampler"], "chains": 3}}), digits_model)
    with pytest.raises(StoreError, match="made from another plan"):
        BlockWriter(url, plan=other.store)
