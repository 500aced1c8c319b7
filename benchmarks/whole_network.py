"""A whole network's store at natural size, through the real store path with a fake sampler.

The plan is the one `ldam-sweep run` makes for a job over every layer of a torchvision network at
224 px (real layer names, unit counts, image sizes, the default grid of 32 units). Every block then
goes through the real path a worker and driver take, minus sampling: the driver's store creation
and lease, ``BlockWriter.write`` (encoding, shards, checksums) with cheap fake chains, and a
manifest commit every ``commit_every`` (8) blocks under the lease. Measured:

  - the write and commit time per block as the manifest grows (by how many parts it holds);
  - at half: `ldam-sweep run` resuming the store (a real process, local Ray): seconds from launch to
    the first block dispatched, the driver's peak memory (VmHWM) by then; it is stopped with SIGTERM;
  - at the end: `ldam-sweep status`, `query --layer L --sort S --limit 20`, `verify` (every block's
    bytes read and checksummed) as a user runs them, and the store's size.

Chains and exemplars are fewer than a real sweep's by default (2 and 2: the write volume per unit is
``bytes_per_unit.py``'s measurement); everything that scales with units, blocks and parts is full size.

    python benchmarks/whole_network.py --model vit_b_16          # 122,344 units, 3,824 blocks (37 min on 2 cores)
    python benchmarks/whole_network.py --model resnet50          # 71,400 units
    python benchmarks/whole_network.py --model resnet18 --quick  # a few layers (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

import ldam_sweep as ls
from ldam_sweep.planning import block_tasks, sweep_store_plan
from ldam_sweep.sampling.chains import ChainResult
from ldam_sweep.spec import parse_job
from ldam_sweep.store import BlockWriter, commit, create_store
from ldam_sweep.store.lease import StoreLease
from ldam_sweep.store.layout import read_generation
from ldam_sweep.store.manifest import part_files
from record import report


def job_doc(model: str, url: str, chains: int, exemplars: int, layers: list[str] | str) -> dict:
    return {"name": f"whole-{model}", "layers": layers,
            "model": {"torchvision": model, "input": {"channels": 3, "height": 224, "width": 224,
                                                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
            "sampler": {"chains": chains, "steps": 300, "snapshot_every": 300, "seed": 0},
            "data": {"source": "photos", "count": 64}, "exemplars": exemplars,
            "resources": {"actors": 1, "cpus_per_actor": 1, "block_size": "auto", "commit_every": 8},
            "store": {"url": url}}


def fake_block(task, plan, rng: np.random.Generator) -> tuple[ChainResult, tuple[np.ndarray, np.ndarray]]:
    """Smooth fake images (a gradient plus a per-unit level) and random traces, in the shapes the
    worker produces: samples float16 (unit, chain, snapshot, C, H, W), starts, exemplars."""
    n, ch, s, shape = len(task.units), plan.chains, len(plan.snapshot_steps), tuple(plan.image_shape)
    ramp = np.linspace(0, 0.5, shape[-1], dtype=np.float32)
    level = rng.random((n, 1, 1, 1, 1, 1), dtype=np.float32) * 0.5
    samples = np.broadcast_to(level + ramp, (n, ch, s, *shape)).astype(np.float16)
    act = rng.standard_normal((n, ch, plan.steps + 1)).astype(np.float32)
    res = ChainResult(layer=task.layer, units=np.asarray(task.units), objective="channel", method="ldam", seed=0, lam=0.0,
                      steps=plan.steps, options={}, snapshot_steps=np.asarray(plan.snapshot_steps), samples=samples,
                      activation=act, starts=samples[:, :, 0])
    k = plan.exemplars_k
    ex = np.broadcast_to(level[:, :, 0] + ramp[::-1], (n, k, *shape)).astype(np.float16)
    return res, (ex, np.sort(rng.random((n, k)).astype(np.float32), axis=1)[:, ::-1].copy())


def write_and_commit(url: str, plan, tasks: list, commit_every: int, rng: np.random.Generator,
                     writes: list[float], commits: list[float]) -> None:
    """The driver's and workers' store path for ``tasks`` under the store's lease: each block through
    ``BlockWriter.write``, a commit every ``commit_every`` blocks and after the last; the seconds of
    each write and commit are appended to ``writes`` and ``commits``."""
    lease = StoreLease.acquire(url, doing="whole_network.py")
    lease.set_generation(read_generation(url) or "")
    writer = BlockWriter(url, plan=plan)
    pending: list = []
    try:
        for i, task in enumerate(tasks):
            res, ex = fake_block(task, plan, rng)
            t = time.perf_counter()
            pending += writer.write(task.layer, task.block, res, exemplars=ex)
            writes.append(time.perf_counter() - t)
            if (i + 1) % commit_every == 0 or i == len(tasks) - 1:
                t = time.perf_counter()
                lease.check(writer.generation)
                commit(url, pending)
                commits.append(time.perf_counter() - t)
                pending = []
    finally:
        lease.release()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ldam_sweep.cli", *args]


def timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, out


def resume_to_dispatch(spec: Path, env: dict, cwd: str) -> dict:
    """Launch `ldam-sweep run SPEC` on the half-done store; seconds until its first block is sent
    (the progress line after "resume: ..."), the driver's peak memory then; stop it with SIGTERM."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cli("run", str(spec), "--no-realism"), env=env, cwd=cwd, stderr=subprocess.PIPE, text=True)
    out: dict = {}
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line.rstrip())
        if "resume:" in line:
            out["resume_line_s"] = time.perf_counter() - t0
            out["resume_line"] = line.strip()
        if line.startswith("waiting for workers") or line.startswith("progress:"):
            out["dispatch_s"] = time.perf_counter() - t0  # the dispatch loop has started: blocks are being sent
            status = Path(f"/proc/{proc.pid}/status").read_text()
            out["driver_peak_rss_mb"] = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 1024
            proc.send_signal(signal.SIGTERM)
            break
    proc.wait(timeout=600)
    out["exit_code"] = proc.returncode
    if "dispatch_s" not in out:
        raise SystemExit("the resumed sweep never started dispatching:\n" + "\n".join(lines[-20:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b_16")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--exemplars", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="three layers (the suite's check of this script)")
    ap.add_argument("--dir", default=None, help="where to build the store (default: a temp dir; it is deleted)")
    ap.add_argument("--keep", default=None, help="build the store in this folder and keep it (for profiling)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_path = args.out or str(Path(__file__).parent / "results" / f"whole_network_{args.model}{'_quick' if args.quick else ''}.json")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    keep = contextlib.nullcontext(str(Path(args.keep).resolve())) if args.keep else None
    with keep or tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        url = f"{tmp}/store.zarr"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ls.RandomWeightsWarning)
            model = ls.load_model(job_doc(args.model, "", 1, 0, "all")["model"])
        layers: list[str] | str = [lyr.name for lyr in model.layers][:3] if args.quick else "all"
        doc = job_doc(args.model, url, args.chains, args.exemplars, layers)
        spec = Path(tmp) / "job.yaml"
        spec.write_text(yaml.safe_dump(doc))
        job = parse_job(doc)
        plan = sweep_store_plan(job, model, job.model_dump(mode="json", exclude_none=True))
        tasks = block_tasks(plan)
        units = sum(lp.planned_units() for lp in plan.layers)
        record: dict = {"model": args.model, "layers": len(plan.layers), "units": units, "blocks": len(tasks),
                        "chains": plan.chains, "snapshots": len(plan.snapshot_steps), "exemplars": plan.exemplars_k,
                        "image_shape": list(plan.image_shape), "store_format": plan.pixels}
        del model
        t0 = time.perf_counter()
        create_store(url, plan)
        record["create_s"] = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        half = len(tasks) // 2
        writes: list[float] = []
        commits: list[float] = []
        write_and_commit(url, plan, tasks[:half], job.resources.commit_every, rng, writes, commits)
        record["write_block_s_median"] = float(np.median(writes))
        record["commit_s_first_50_median"] = float(np.median(commits[:50]))
        record["commit_s_last_50_median"] = float(np.median(commits[-50:]))
        record["parts_at_half"] = len(part_files(ls.open_store(url).loc))

        # -- resume the half-done store with the real driver ---------------------------------------
        record |= {f"resume_{k}": v for k, v in resume_to_dispatch(spec, env, tmp).items()}

        # -- the second half, then what a user runs on the finished store --------------------------
        st = ls.open_store(url)
        done = {(r["layer"], r["block"]) for r in st.units(status=None).select(["layer", "block"]).to_pylist()}
        rest = [t for t in tasks if (t.layer, t.block) not in done]
        write_and_commit(url, plan, rest, job.resources.commit_every, rng, writes, commits)
        record["write_block_s_median_all"] = float(np.median(writes))
        record["commit_s_final_50_median"] = float(np.median(commits[-50:]))
        record["parts"] = len(part_files(ls.open_store(url).loc))
        biggest = max(plan.layers, key=lambda lp: lp.units).name
        for name, cmd in (("status", cli("status", url, "--json")),
                          ("query", cli("query", url, "--layer", biggest, "--sort", "act_final_mean", "--limit", "20", "--json")),
                          ("verify", cli("verify", url, "--json"))):
            seconds, out = timed(cmd, env)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed ({out.returncode}): {out.stderr[-2000:]}")
            record[f"{name}_s"] = seconds
            if name == "status":
                doc_status = json.loads(out.stdout)
                record["status_done"] = doc_status["totals"]["done"]
                record["store_bytes"] = doc_status["storage"]["bytes"]
                record["bytes_per_unit"] = doc_status["storage"]["bytes_per_unit"]
            if name == "query":
                record["query_rows"] = json.loads(out.stdout)["count"]
        seconds, _ = timed([sys.executable, "-c", "pass"], env)
        record["python_start_s"] = seconds  # each command's share that is the interpreter itself
    report(f"whole network ({args.model}, {units:,} units, {len(tasks):,} blocks)", record,
           ["units", "blocks", "parts", "write_block_s_median_all", "commit_s_first_50_median", "commit_s_final_50_median",
            "resume_dispatch_s", "resume_driver_peak_rss_mb", "status_s", "query_s", "verify_s"], out_path)


if __name__ == "__main__":
    main()
