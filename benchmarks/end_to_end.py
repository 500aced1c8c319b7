"""End-to-end efficiency: ``ldam-sweep run`` (Ray actors, store, manifest, scores) vs the bare
in-process sampler on the same units, same blocks, same settings, measured one after the other.

  in-process   ``ls.sample`` over every block of the job, one process, all cores, model loaded
               beforehand (not timed): the sampler's own speed, nothing written
  sweep        the command a user runs, timed from launch to exit: interpreter start, Ray start,
               workers loading the model, sampling, scores, the Zarr writes, manifest commits

Efficiency = in-process seconds / sweep seconds (1.0 = the sweep costs nothing beyond sampling).
The sweep's printed summary splits its time into start-up (before the first block is sent) and the
dispatch loop; the manifest's per-block ``seconds`` give the workers' busy time.

    python benchmarks/end_to_end.py                 # digits-cnn, all 410 units, 8 chains x 150 steps (~2 x 90 s)
    python benchmarks/end_to_end.py --quick         # seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import ldam_sweep as ls
from ldam_sweep.planning import block_tasks, sweep_store_plan
from ldam_sweep.spec import parse_job
from record import report


def job_doc(args) -> dict:
    doc = {
        "name": "bench-e2e",
        "model": {"zoo": args.model},
        "layers": args.layers.split(",") if args.layers != "all" else "all",
        "sampler": {"method": "ldam", "steps": args.steps, "chains": args.chains, "lam": 0.0, "seed": 0},
        "exemplars": 0,
        "resources": {"actors": args.actors, "cpus_per_actor": args.cpus_per_actor, "block_size": args.block},
    }
    if args.max_units:
        doc["units"] = {name: f"0-{args.max_units - 1}" for name in doc["layers"]} if doc["layers"] != "all" else {}
    return doc


def in_process_seconds(doc: dict) -> tuple[float, int]:
    job = parse_job(doc)
    model = ls.load_model(job.model)
    plan = sweep_store_plan(job, model, doc)
    tasks = block_tasks(plan)
    s = job.sampler
    ls.sample(model, tasks[0].layer, list(tasks[0].units[:2]), chains=s.chains, steps=2)  # warm-up
    t0 = time.perf_counter()
    for task in tasks:
        ls.sample(model, task.layer, list(task.units), chains=s.chains, steps=s.steps, method=s.method, seed=s.seed,
                  lam=s.lam, objective=plan.layer(task.layer).objective)
    return time.perf_counter() - t0, sum(len(t.units) for t in tasks)


def sweep_seconds(doc: dict, workdir: Path) -> tuple[float, dict, float]:
    spec = workdir / "job.yaml"
    spec.write_text(yaml.safe_dump(doc))
    store = workdir / "store.zarr"
    cli = Path(sys.executable).with_name("ldam-sweep")
    t0 = time.perf_counter()
    proc = subprocess.run([str(cli), "run", str(spec), "--store", str(store)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("summary "))
    summary = json.loads(line[len("summary "):])
    busy = float(ls.open_store(str(store)).units(status="ok").column("seconds").to_numpy().sum())
    return wall, summary, busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--layers", default="all", help="all, or a comma-separated list")
    ap.add_argument("--max-units", type=int, default=0, help="first N units of each listed layer (0: all)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "end_to_end.json"))
    args = ap.parse_args()
    if args.quick:
        args.layers, args.max_units, args.steps, args.chains, args.block = "conv1", 4, 3, 2, 2
    doc = job_doc(args)
    workdir = Path(tempfile.mkdtemp(prefix="ldam-e2e-"))
    try:
        inproc, n_units = in_process_seconds(doc)
        wall, summary, busy = sweep_seconds(doc, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if summary["units_done"] != n_units:
        raise SystemExit(f"sweep did {summary['units_done']} units, the in-process run {n_units}")
    record = {
        "benchmark": "end_to_end", "model": args.model, "layers": args.layers, "units": n_units, "sweep_units_done": summary["units_done"],
        "steps": args.steps,
        "chains": args.chains, "block": args.block, "actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "in_process_seconds": inproc, "sweep_wall_seconds": wall, "sweep_dispatch_seconds": summary["seconds"],
        "sweep_startup_seconds": wall - summary["seconds"], "worker_busy_seconds": busy,
        "in_process_units_per_s": n_units / inproc, "sweep_units_per_s": n_units / wall,
        "efficiency": inproc / wall, "efficiency_dispatch_only": inproc / summary["seconds"],
    }
    report(f"{args.model} {args.layers}: {n_units} units x {args.chains} chains x {args.steps} steps, "
           f"{args.actors} actors x {args.cpus_per_actor} CPU", record,
           ("in_process_seconds", "sweep_wall_seconds", "sweep_startup_seconds", "sweep_dispatch_seconds",
            "worker_busy_seconds", "efficiency", "efficiency_dispatch_only"), args.out)


if __name__ == "__main__":
    main()
