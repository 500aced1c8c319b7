"""The demo command and the benchmark scripts, run for real in quick settings."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1800)  # a whole-network sweep: on a box with CPU hogs beside it, 600 s is not enough
def test_quick_demo_sweeps_the_whole_network(demo_workdir):
    """`ldam-sweep demo --quick` sweeps all 410 digits-cnn units on local Ray: D, scores, labels, atlas and query agree."""
    work, stdout, env = demo_workdir
    store = work / "storage" / "demo.zarr"
    tmp_path = work / "storage"
    lines = stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("finished: 410 units, ")  # the summary: 3 lines
    said = (work / "demo.stderr").read_text()  # the progress the user saw in an 80-column terminal: no Ray log line
    assert said.strip() and not re.search(r"\b\w+\.(py|cc):\d+|authentication_token|Started a local Ray", said), said  # Python's and C++'s
    assert lines[1].startswith(f"store: {store}") and lines[2].startswith(f"atlas: {tmp_path / 'demo-atlas' / 'index.html'}")
    import ldam_sweep as ls

    st = ls.open_store(str(store))
    layers = {d["name"]: d for d in st.layers()}
    assert len(layers) == 9 and all(d["done"] == d["units"] and d["failed"] == 0 for d in layers.values())
    assert sum(d["done"] for d in layers.values()) == 410
    assert st.discriminator_info()["heldout_accuracy"] > 0.5
    assert np.isfinite(st.trace("fc2", 3, kind="realism")).all()
    # every unit carries its scores; exemplars come from the digits
    top = st.units(sort="pixel_diversity", limit=5)
    assert top.num_rows == 5 and all(v is not None for v in top["pixel_diversity"].to_pylist())
    fc2 = st.units("fc2")
    assert all(v is not None and v > 0 for v in fc2["activation_ratio"].to_pylist())
    assert all(v is not None for v in fc2["nearest_real"].to_pylist())
    images, acts = st.exemplars("fc2", 3)
    assert images.shape == (8, 1, 28, 28) and acts[0] == fc2["exemplar_max"][3].as_py()
    from ldam_sweep.atlas.site import slug

    img = np.asarray(Image.open(tmp_path / "demo-atlas" / "img" / slug("fc2") / "3-chains.png").convert("L"))
    assert img.shape[0] > 4 * 28 * 3 and img.std() > 30  # 4 chain rows of real pictures
    # the activation ladder: each logit's chains climb past the 1x final toward 1.5x the best real digit
    lad = st.ladder("fc2", 3)
    assert lad["factors"].tolist() == [1.5, 2.0] and lad["images"].shape == (4, 2, 1, 28, 28)
    one_x = st.trace("fc2", 3)[:, -1]
    assert (lad["activation"][:, 0] > one_x).all() and (lad["activation"][:, 1] > lad["activation"][:, 0]).all()
    assert np.isfinite(lad["realism"]).all()
    assert (lad["distance"][:, 1] > lad["distance"][:, 0]).all() and (lad["distance"] > 0.01).all()  # it moved on
    strip = Image.open(tmp_path / "demo-atlas" / "img" / slug("fc2") / "3-ladder.png")
    assert strip.height > 4 * 28 and strip.width > 4 * 28  # 4 chains x (start, 1x, 1.5x, 2x)
    assert "The activation ladder" in (tmp_path / "demo-atlas" / "units" / slug("fc2") / "3.html").read_text()
    # labels: each class logit is labelled its own class (by its exemplars and by the network's reading)
    assert fc2["label"].to_pylist() == [str(u) for u in range(10)] == fc2["sample_label"].to_pylist()
    assert all(p >= 0.5 for p in fc2["label_purity"].to_pylist())
    agree = st.label_agreement()
    assert agree["fc2"]["agree"] == 1.0 and agree["fc2"]["chance"] == pytest.approx(0.1)
    # ... and the network's reading agrees with the exemplars' class above chance in the hidden layers
    assert all(agree[name]["agree"] > agree[name]["chance"] for name in ("conv2", "fc1", "relu3"))
    # the same units for a label from the CLI's table and JSON, the Python API and the atlas's search index
    api = {(r["layer"], r["unit"]) for r in st.units(label="3").to_pylist()}
    assert len(api) > 10 and len({layer for layer, _ in api}) >= 3
    doc = json.loads(subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "query", str(store), "--label", "3", "--json"],
                                    capture_output=True, text=True, env=env, check=True).stdout)
    assert {(r["layer"], r["unit"]) for r in doc["units"]} == api and doc["count"] == len(api)
    table = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "query", str(store), "--label", "3",
                            "--columns", "layer,unit,label"], capture_output=True, text=True, env={**env, "COLUMNS": "200"},
                           check=True).stdout
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│")]
    assert {(layer, int(unit)) for layer, unit, _ in rows} == api and {label for *_, label in rows} == {"3"}
    search = json.loads((tmp_path / "demo-atlas" / "data" / "search.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    names = [name for name, _ in search["layers"]]
    everyone = {(r["layer"], r["unit"]) for r in st.units(label="3", status=None).to_pylist()}  # dead units too
    assert {(names[u[0]], u[1]) for u in search["units"] if u[2] == "3"} == everyone >= api
    # chains keep their starts: an exemplar start, and a final image that moved away from it
    starts = st.read_block("fc2", 0, ["starts"])["starts"][3].astype(np.float32)
    assert np.isfinite(starts).all() and np.abs(st.samples("fc2", 3)[:, -1] - starts).mean() > 1e-3


def run_quick(script: str, tmp_path: Path, model_cache: Path | None = None) -> dict:
    """Run a benchmark script in its quick mode for real and return the JSON record it wrote
    (``model_cache``: the session's zoo cache, for scripts that load a model)."""
    out_json = tmp_path / f"{script}.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out", str(out_json), *(
            ["--dir", str(tmp_path)] if script in ("store", "atlas") else [])],
        capture_output=True, text=True,
        env=None if model_cache is None else {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache)},
    )
    assert run.returncode == 0, run.stderr
    rec = json.loads(out_json.read_text())
    assert_measured(rec)
    return rec


# hardware_limit splits a call into fixed cost + steps x per-step cost from t(S) and t(2S); on a busy
# box in quick mode (3 steps) t(2S) <= t(S) happens, and the script reports NaN rather than a lie
NOISE_SPLIT = {"ratio_lam0_steady", "sampler_fixed_seconds_per_call", "sampler_seconds_per_step"}


def assert_measured(value, key: str = "record") -> None:
    """Every number in a record is finite, and every rate (``*_per_s``) and FLOP count is > 0: a
    benchmark that timed nothing or divided by zero fails here."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert_measured(v, k)
    elif isinstance(value, list):
        for v in value:
            assert_measured(v, key)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOISE_SPLIT:
        assert math.isfinite(value), (key, value)
        if key.endswith(("_per_s", "tflops", "gflop_per_image_step")):
            assert value > 0, (key, value)


# benchmarks/gpu.sh is the one command for a GPU session: its quick mode on CPU runs every GPU benchmark
# with the GPU run's own argument lists (16 processes, 5 of them Ray sweeps), once for the tests below
GPU_SH_TIMEOUT = pytest.mark.timeout(1800)  # ~150 s quiet, 3x that beside two CPU hogs


class GpuRun(NamedTuple):
    """What one `DEVICE=cpu QUICK=--quick bash benchmarks/gpu.sh` left: its records by file name, the
    benchmarks it reported as failed (gpu.sh goes on past a failure) with their output tails, its exit status."""
    records: dict[str, dict]
    failed: dict[str, str]
    returncode: int


@pytest.fixture(scope="module")
def gpu_quick(tmp_path_factory) -> GpuRun:
    """gpu.sh's quick mode on CPU, once for the tests below: each checks its own records, so a broken
    benchmark fails its own test, with its own output."""
    pytest.importorskip("lucent", reason="torch-lucent comes with the bench extra (make install has it)")
    out = tmp_path_factory.mktemp("gpu-quick")
    # CUDA hidden: lucent puts its images on cuda:0 whenever one is visible
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "--quick", "OUT": str(out), "PY": sys.executable,
           "CUDA_VISIBLE_DEVICES": "", "RAY_AUTH_MODE": "disabled"}
    log = out / "gpu.sh.log"
    with log.open("w") as f:  # its own process group: a timeout stops the benchmark and its Ray workers too
        proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "gpu.sh")], stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            proc.wait(timeout=1700)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    text = log.read_text()
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    failed = {}
    for part in ("\n" + text).split("\n== ")[1:]:  # "NAME (time)" ... output ... "!! NAME failed"
        name = part.split(" ", 1)[0]
        if f"!! {name} failed" in part:
            failed[name] = part[-3000:]
    return GpuRun(records, failed, proc.returncode)


def record(gpu_quick: GpuRun, bench: str, name: str) -> dict:
    """One record of the gpu.sh run; its benchmark's output tail when that benchmark failed."""
    assert bench not in gpu_quick.failed, gpu_quick.failed[bench]
    return gpu_quick.records[name]


@GPU_SH_TIMEOUT
def test_gpu_script_runs_every_benchmark_in_quick_mode_on_cpu(gpu_quick):
    """benchmarks/gpu.sh runs every GPU benchmark on CPU in quick mode without a failure.

    Its argument lists stay valid: every benchmark ran and measured something."""
    assert gpu_quick.failed == {} and gpu_quick.returncode == 0, gpu_quick.failed
    records = gpu_quick.records
    assert sorted({r["benchmark"] for r in records.values()}) == [
        "batching", "end_to_end", "hardware_limit", "peers", "pipeline", "reproducibility", "scaling", "variants", "vit"]
    assert len(records) == 17
    assert records["end_to_end_resnet18_224_layer3_auto"]["model"] == "torchvision:resnet18"
    assert records["end_to_end_resnet18_224_layer3_auto_nondeterministic"]["deterministic"] is False
    assert records["end_to_end_resnet18_224_layer3_32"]["deterministic"] is True
    for rec in records.values():
        assert_measured(rec)


@GPU_SH_TIMEOUT
def test_batching_benchmark_quick_mode(gpu_quick):
    """benchmarks/batching.py (via gpu.sh) runs every unit's chains for every step both ways: a fair comparison."""
    for bench, name in (("batching_digits", "batching_digits_conv2"), ("batching_r18", "batching_resnet18_64_layer2")):
        rec = record(gpu_quick, bench, name)
        assert rec["units"] == 4 and rec["steps"] == 3
        # both ways of batching really ran every unit's chains for every step: the comparison is fair
        assert rec["block_chain_steps"] == rec["one_at_a_time_chain_steps"] == 4 * rec["chains"] * 3


def test_store_benchmark_quick_mode(tmp_path):
    """benchmarks/store.py --quick writes, commits and reads back all 2,000 units and times each part."""
    rec = run_quick("store", tmp_path)
    assert rec["units"] == 2000 and rec["manifest_files"] == 4 and rec["write_blocks"] == 4
    assert rec["manifest_rows"] == 2000  # every committed row is readable back from the store
    assert rec["write_block_ms"] > 0 and rec["units_sort_topk_s"] > 0 and rec["read_unit_samples_ms"] > 0


def test_atlas_benchmark_quick_mode(tmp_path):
    """benchmarks/atlas.py --quick builds, rebuilds and searches a 200-unit atlas in Chromium and times each part."""
    rec = run_quick("atlas", tmp_path)
    assert rec["units"] == 200 and rec["pages"] == 200 + 2 + 1  # unit pages, layer pages, index
    assert rec["units_rendered"] == 200 and rec["rebuild_units_rendered"] == 0  # the rebuild re-rendered nothing
    # Chromium searched the index and filtered the largest layer page by a label, and timed both
    assert rec["search_found"].endswith("units match") and rec["search_rows_shown"] > 0 and rec["search_ms"] > 0
    assert rec["layer_filter_count"].endswith("of 100 units") and rec["layer_filter_ms"] > 0


def test_labels_benchmark_quick_mode(tmp_path, model_cache):
    """benchmarks/labels.py --quick times the exemplar pass before and after labels and the sample reading per layer."""
    rec = run_quick("labels", tmp_path, model_cache)
    for layer, units in (("conv2", 32), ("fc1", 128)):
        r = rec[layer]
        assert r["units"] == units and min(r["exemplar_pass_before_s"], r["exemplar_pass_now_s"], r["sample_reading_s"],
                                           r["sampling_s"]) > 0
        assert rec[f"{layer}_added_share"] == r["added_share_of_batch"]


@GPU_SH_TIMEOUT
def test_hardware_limit_benchmark_quick_mode(gpu_quick):
    """benchmarks/hardware_limit.py (via gpu.sh) does the same image-steps bare and in the sampler, and times each part."""
    for bench, name in (("hwlimit_digits", "hardware_limit_digits_conv2"), ("hwlimit_r18", "hardware_limit_resnet18_224_layer3")):
        rec = record(gpu_quick, bench, name)
        assert rec["units"] == 4 and rec["chains"] == 4 and rec["steps"] == 3
        work = 4 * 4 * 3  # the bare forward+backward and both sampler runs did the same image-steps
        assert rec["bare_image_steps"] == rec["sampler_lam0_chain_steps"] == rec["sampler_lam05_chain_steps"] == [work]
        assert NOISE_SPLIT <= set(rec)
        # the step breakdown timed each part (which part costs more is the benchmark's finding, not a test:
        # at 3 steps on a busy box the repulsion's extra work is below the timing noise)
        assert rec["step_noise_ms"] > 0 and rec["step_update_ms_repulsion_off"] > 0 and rec["step_update_ms_repulsion_on"] > 0
        assert 0 < rec["step_noise_update_share"] < 1
    # with real data (exemplar starts, preconditioner, target) beside revision 2's defaults, one repeat each
    rec = record(gpu_quick, "hwlimit_r18_realism", "hardware_limit_resnet18_224_layer3_realism")
    assert rec["lam05_with_data"] is True and rec["baseline_options"]["precondition"] == "none"
    assert rec["sampler_lam05_chain_steps"] == [4 * 4 * 3] and rec["cost_per_step_vs_baseline_lam05"] > 0


@GPU_SH_TIMEOUT
def test_peers_benchmark_quick_mode(gpu_quick):
    """benchmarks/peers.py (via gpu.sh) renders the same image-steps with ours and torch-lucent, in both layouts."""
    rec = record(gpu_quick, "peers", "peers")
    assert rec["units"] == 4 and rec["images_per_unit"] == 2 and rec["peer"].startswith("torch-lucent")
    # ours and lucent (b) rendered the same images for the same steps, in both layouts; lucent (a) its units
    work = 4 * 2 * rec["steps"]
    assert rec["ours_image_steps"] == work
    assert rec["lucent_fastest_image_steps_by_layout"] == {"contiguous_format": work, "channels_last": work}
    assert rec["lucent_defaults_image_steps"] == rec["a_units"] * 2 * rec["steps"]


@GPU_SH_TIMEOUT
def test_end_to_end_benchmark_quick_mode(gpu_quick):
    """benchmarks/end_to_end.py (via gpu.sh) sweeps on Ray the units it runs in-process; re-sampling matches the store."""
    for bench, name in (("e2e_digits_32", "end_to_end_digits_32"), ("e2e_digits_auto", "end_to_end_digits_auto"),
                        ("e2e_r18_auto", "end_to_end_resnet18_224_layer3_auto")):
        rec = record(gpu_quick, bench, name)
        assert rec["units"] == 4 and rec["actors"] == 1
        assert rec["sweep_units_done"] == 4  # the sweep ran the same units as the in-process loop
        assert 0 < rec["sweep_dispatch_seconds"] < rec["sweep_wall_seconds"]  # dispatch is part of the process's life
        assert rec["in_process_seconds"] > 0 and rec["worker_busy_seconds"] > 0
        assert {"driver_s", "ray_init_s", "first_worker_s"} <= set(rec["sweep_startup_parts"])
        # a unit re-sampled at its stored batch size gives its stored samples (same machine, CPU)
        assert rec["resample_at_batch_size_samples_max_abs_diff"] <= 1 / 255
        assert rec["resample_at_batch_size_pixels_over_1_255"] == 0
    # blocks of 2 are what the sweep sampled at once; auto batched the layer's 4 units together
    assert gpu_quick.records["end_to_end_digits_32"]["batch_units"] == [2]
    assert gpu_quick.records["end_to_end_digits_auto"]["block"] == "auto"
    assert gpu_quick.records["end_to_end_digits_auto"]["batch_units"] == [4]


@GPU_SH_TIMEOUT
def test_pipeline_benchmark_quick_mode(gpu_quick):
    """benchmarks/pipeline.py (via gpu.sh) runs its 3 blocks with a delayed write and records the delay."""
    rec = record(gpu_quick, "pipeline", "pipeline_resnet18_224_layer3")
    assert rec["blocks"] == 3 and rec["write_delay_s"] > 0


@GPU_SH_TIMEOUT
def test_variants_benchmark_quick_mode(gpu_quick):
    """benchmarks/variants.py (via gpu.sh) runs the same work in fp32, fp32 channels_last and bf16 channels_last."""
    rows = record(gpu_quick, "variants", "variants")["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "fp32_channels_last", "bf16_channels_last"]
    # the variants really differ in layout / precision, and really ran the same work
    assert [(r["memory_format"], r["precision"]) for r in rows] == [
        ("contiguous", "float32"), ("channels_last", "float32"), ("channels_last", "bf16")]
    work = 2 * 2 * 2  # units x chains x steps of the quick mode
    assert all(r["sampler_chain_steps"] == r["bare_image_steps"] == work for r in rows)
    assert len({r["gflop_per_image_step"] for r in rows}) == 1  # the same network at the same size


@GPU_SH_TIMEOUT
def test_scaling_benchmark_quick_mode(gpu_quick):
    """benchmarks/scaling.py (via gpu.sh) measures every axis: units, chains, layer depth, input size, ViT depth."""
    rec = record(gpu_quick, "scaling", "scaling")
    assert [r["units"] for r in rec["units_per_block"]] == [1, 4, 1, 4]
    assert [r["chains"] for r in rec["chains_per_unit"]] == [1, 8]
    depth = {r["layer"]: r for r in rec["layer_depth"]}
    assert set(depth) == {"layer1", "layer2"}
    for r in depth.values():
        assert r["truncated_ms_per_image_step"] > 0 and r["whole_network_ms_per_image_step"] > 0
    assert [r["size"] for r in rec["input_size"]] == [32, 48]
    vit = {r["block"]: r for r in rec["vit_depth"]}
    assert set(vit) == {"block 0", "block 11"}
    assert all(r["truncated_ms_per_image_step"] > 0 and r["truncation_gain"] > 0 for r in vit.values())
    assert rec["vit_sampler"]["chain_steps_per_s"] > 0 and rec["vit_sampler"]["bare_image_steps_per_s"] > 0
