"""End-to-end efficiency: ``ldam-sweep run`` (Ray actors, store, manifest, scores) vs the bare
in-process sampler on the same units, same blocks, same settings, measured one after the other.

  in-process   ``ls.sample`` over every block of the job, one process, all cores, model loaded
               beforehand (not timed): the sampler's own speed, nothing written
  sweep        the command a user runs, timed from launch to exit: interpreter start, Ray start,
               workers loading the model, sampling, scores, the Zarr writes, manifest commits

Efficiency = in-process seconds / sweep seconds (1.0 = the sweep costs nothing beyond sampling).
Both run under the sweep's determinism setting (``--nondeterministic`` turns it off for both).
Reproducibility: after the sweep, the first, middle and last unit are re-sampled in this process
(not the worker's), alone and at the batch size the manifest recorded, and compared with what the
sweep stored (``resample_*`` keys). On a GPU only the second is expected to match: a kernel's
rounding can depend on the batch's size (``reproducibility.py``).
The sweep's printed summary splits its time into start-up (before the first block is sent) and the
dispatch loop; the manifest's per-block ``seconds`` give the workers' device time. ``--repeats``
interleaves the two (this box is shared and noisy) and reports medians.

    python benchmarks/end_to_end.py                 # digits-cnn, all 410 units, 8 chains x 150 steps (~2 x 90 s)
    python benchmarks/end_to_end.py --model torchvision:resnet18 --input 224 --layers layer3 --units 0-127 \\
        --steps 100 --chains 8 --actors 1 --device cuda     # the GPU issue's configuration
    python benchmarks/end_to_end.py --quick         # seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import ldam_sweep as ls
from ldam_sweep.cluster.worker import set_determinism
from ldam_sweep.planning import block_tasks, sweep_store_plan
from ldam_sweep.spec import parse_job
from record import load_bench_model, report, sync


def model_doc(model: str, size: int | None) -> dict:
    """A job spec's model section for a zoo name or ``torchvision:NAME`` (random weights; ``size`` px)."""
    if not model.startswith("torchvision:"):
        return {"zoo": model}
    doc: dict = {"torchvision": model.split(":", 1)[1]}
    if size:
        doc["input"] = {"channels": 3, "height": size, "width": size,
                        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return doc


def job_doc(args) -> dict:
    block = args.block if args.block == "auto" else int(args.block)
    doc = {
        "name": "bench-e2e",
        "model": model_doc(args.model, args.input),
        "layers": args.layers.split(",") if args.layers != "all" else "all",
        "sampler": {"method": "ldam", "steps": args.steps, "chains": args.chains, "lam": 0.0, "seed": 0},
        "exemplars": 0,
        "resources": {"actors": args.actors, "cpus_per_actor": args.cpus_per_actor, "block_size": block,
                      "deterministic": not args.nondeterministic, "gpus_per_actor": 0 if args.device == "cpu" else "auto"},
    }
    if args.units and doc["layers"] != "all":
        doc["units"] = {name: args.units for name in doc["layers"]}
    return doc


def in_process_seconds(doc: dict, args) -> tuple[float, int, tuple]:
    job = parse_job(doc)
    set_determinism(not args.nondeterministic)  # the sweep's workers run under the same setting
    model = load_bench_model(args.model, args.input, args.device)
    plan = sweep_store_plan(job, model, doc)
    tasks = block_tasks(plan)
    s = job.sampler
    ls.sample(model, tasks[0].layer, list(tasks[0].units[:2]), chains=s.chains, steps=2)  # warm-up
    sync(model.device)
    t0 = time.perf_counter()
    for task in tasks:
        ls.sample(model, task.layer, list(task.units), chains=s.chains, steps=s.steps, method=s.method, seed=s.seed,
                  lam=s.lam, objective=plan.layer(task.layer).objective)
    sync(model.device)
    return time.perf_counter() - t0, sum(len(t.units) for t in tasks), (model, plan, tasks, s)


def resample_differences(store: Path, model, plan, tasks, s) -> dict:
    """Re-sample the job's first, middle and last live unit here, alone and with the batch size the
    manifest recorded (``batch_units``), and compare with the stored ones: the largest |difference|
    of samples and traces, and the share of final-snapshot pixels off by more than 1/255."""
    st = ls.open_store(str(store))
    batch = {(r["layer"], r["unit"]): r["batch_units"] for r in st.units(status="ok").to_pylist()}
    units = [(t.layer, u) for t in tasks for u in t.units if (t.layer, u) in batch]  # dead units: nothing stored
    if not units:
        raise SystemExit("every unit of the sweep is dead: nothing to re-sample")
    picked = sorted({units[0], units[len(units) // 2], units[-1]}, key=units.index)
    out: dict = {"resample_units": [f"{layer}:{unit}" for layer, unit in picked]}
    for how in ("alone", "at_batch_size"):
        samples, traces, visible = [], [], []
        for layer, unit in picked:
            res = ls.sample(model, layer, [unit], chains=s.chains, steps=s.steps, method=s.method, seed=s.seed,
                            lam=s.lam, objective=plan.layer(layer).objective,
                            batch_units=batch[layer, unit] if how == "at_batch_size" else None)
            d = abs(st.finals(layer, unit) - res.samples[0][:, -1])  # full size (snapshots may be thumbnails)
            samples.append(float(d.max()))
            visible.append(float((d > 1 / 255).mean()))
            traces.append(float(abs(st.trace(layer, unit) - res.activation[0]).max()))
        out |= {f"resample_{how}_samples_max_abs_diff": max(samples), f"resample_{how}_trace_max_abs_diff": max(traces),
                f"resample_{how}_pixels_over_1_255": max(visible)}
    return out


def cli_command() -> list[str]:
    """The console script beside this interpreter, else ``python -m ldam_sweep.cli`` (a GPU machine
    where the package runs from a folder on PYTHONPATH, not an installed venv)."""
    script = Path(sys.executable).with_name("ldam-sweep")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ldam_sweep.cli"]


def sweep_seconds(doc: dict, workdir: Path) -> tuple[float, dict, float, list]:
    spec = workdir / "job.yaml"
    spec.write_text(yaml.safe_dump(doc))
    store = workdir / "store.zarr"
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*cli_command(), "run", str(spec), "--store", str(store), "--json"], capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    units = ls.open_store(str(store)).units(status="ok")
    busy = float(units.column("seconds").to_numpy().sum())
    return wall, summary, busy, sorted(set(units.column("batch_units").to_pylist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-cnn", help="a zoo name or torchvision:NAME (random weights)")
    ap.add_argument("--input", type=int, default=None, help="torchvision models: input size in px")
    ap.add_argument("--layers", default="all", help="all, or a comma-separated list")
    ap.add_argument("--units", default="", help="units of each listed layer, e.g. 0-127 (default: all)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--block", default="32", help="resources.block_size: an integer or auto")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=1)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present); the sweep's actors "
                    "get a GPU unless cpu")
    ap.add_argument("--nondeterministic", action="store_true", help="resources.deterministic: false")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; medians reported")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "end_to_end.json"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.chains, args.repeats = 3, 2, 1
        args.input = min(args.input, 32) if args.input else None
        if args.model == "digits-cnn":
            args.layers, args.units = "conv1", "0-3"
            args.block = "auto" if args.block == "auto" else "2"
        else:
            args.units = "0-3"
    doc = job_doc(args)
    workdir = Path(tempfile.mkdtemp(prefix="ldam-e2e-"))
    runs, resampled = [], {}
    try:
        for _ in range(args.repeats):
            inproc, n_units, loaded = in_process_seconds(doc, args)
            wall, summary, busy, batches = sweep_seconds(doc, workdir)
            if summary["units_done"] != n_units:
                raise SystemExit(f"sweep did {summary['units_done']} units, the in-process run {n_units}")
            runs.append((inproc, wall, summary["seconds"], busy))
            resampled = resampled or resample_differences(workdir / "store.zarr", *loaded)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    inproc, wall, dispatch, busy = (statistics.median(col) for col in zip(*runs))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    record = {
        "benchmark": "end_to_end", "model": args.model, "input": args.input, "layers": args.layers, "units": n_units,
        "sweep_units_done": summary["units_done"],
        "steps": args.steps, "chains": args.chains, "block": args.block, "batch_units": batches, "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor, "device": device, "deterministic": not args.nondeterministic,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""),
        "in_process_seconds": inproc, "sweep_wall_seconds": wall, "sweep_dispatch_seconds": dispatch,
        "sweep_startup_seconds": wall - dispatch, "worker_busy_seconds": busy,
        "in_process_units_per_s": n_units / inproc, "sweep_units_per_s": n_units / wall,
        "efficiency": inproc / wall, "efficiency_dispatch_only": inproc / dispatch,
        "sweep_startup_parts": summary.get("startup", {}),
        **resampled,
        "runs": [dict(zip(("in_process", "sweep_wall", "sweep_dispatch", "worker_busy"), r)) for r in runs],
    }
    report(f"{args.model} {args.layers}: {n_units} units x {args.chains} chains x {args.steps} steps, "
           f"{args.actors} actors x {args.cpus_per_actor} CPU, block {args.block} (batches {batches}) on {device}", record,
           ("in_process_seconds", "sweep_wall_seconds", "sweep_startup_seconds", "sweep_dispatch_seconds",
            "worker_busy_seconds", "efficiency", "efficiency_dispatch_only", "resample_alone_samples_max_abs_diff",
            "resample_alone_pixels_over_1_255", "resample_at_batch_size_samples_max_abs_diff",
            "resample_at_batch_size_pixels_over_1_255"), args.out)


if __name__ == "__main__":
    main()
