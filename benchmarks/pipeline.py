"""The worker's pipeline: sampling batch k+1 while batch k is written. One ``SweepWorker`` (the
actor's code, without Ray) on a real store; a benchmark-only hook adds ``--write-delay`` seconds to
every block write (a slow or remote store), by default as long as sampling one block takes, the
case where overlap matters most.

  sample only   the device phase of every block, one after the other (nothing written)
  write only    the host phase of every block (encode, checksum, Zarr write + delay), results precomputed
  pipelined     ``run_batch`` from two threads with two blocks in flight, as the threaded actor runs them
  serial        ``run_batch`` one block after the other (what the worker did before the pipeline)

Pipelined ~ max(sample, write), serial ~ sample + write. Interleaved repeats, medians.

    python benchmarks/pipeline.py                   # digits-cnn conv2, 8 blocks of 4 units, 8 chains x 300 steps
    python benchmarks/pipeline.py --quick           # seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from ldam_sweep.cluster.worker import SweepWorker
from ldam_sweep.planning import sweep_store_plan
from ldam_sweep.spec import parse_job
from ldam_sweep.store import create_store
from end_to_end import model_doc
from record import report, sync


def make_worker(doc: dict, workdir: Path, threads: int) -> SweepWorker:
    job = parse_job(doc)
    url = str(workdir / "store.zarr")
    shutil.rmtree(url, ignore_errors=True)
    from ldam_sweep.model import load_model

    create_store(url, sweep_store_plan(job, load_model(job.model, device="cpu"), doc))
    return SweepWorker(doc, url, num_threads=threads)


def delay_writes(worker: SweepWorker, seconds: float) -> None:
    """The benchmark's write-delay hook: every block write takes ``seconds`` longer."""
    write = worker.writer.write

    def slow_write(*args, **kwargs):
        time.sleep(seconds)
        return write(*args, **kwargs)

    worker.writer.write = slow_write  # type: ignore[method-assign]


def pipelined(worker: SweepWorker, layer: str, blocks: list[tuple[int, list[int]]], in_flight: int) -> float:
    """The threaded actor with ``in_flight`` tasks: a new block is sent when one comes back."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        todo, running = list(blocks), set()
        while todo or running:
            while todo and len(running) < in_flight:
                running.add(pool.submit(worker.run_batch, layer, [todo.pop(0)], [1]))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--input", type=int, default=None)
    ap.add_argument("--layer", default="conv2")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block", type=int, default=4, help="units per block (= batch)")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--write-delay", type=float, default=None, help="s added to each block write (default: the "
                    "measured sampling time of one block)")
    ap.add_argument("--threads", type=int, default=1, help="torch / zarr threads of the worker (cpus_per_actor)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline.json"))
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.block, args.chains, args.steps, args.repeats = 3, 2, 2, 5, 1
        args.input = min(args.input, 32) if args.input else None
    n = args.blocks * args.block
    doc = {"name": "bench-pipeline", "model": model_doc(args.model, args.input), "layers": [args.layer],
           "units": {args.layer: f"0-{n - 1}"}, "exemplars": 0,
           "sampler": {"steps": args.steps, "chains": args.chains},
           "resources": {"actors": 1, "block_size": args.block}}
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="ldam-pipeline-"))
    try:
        worker = make_worker(doc, workdir, args.threads)
        blocks = [(b, list(range(b * args.block, (b + 1) * args.block))) for b in range(args.blocks)]
        worker._device_phase(args.layer, blocks[0][1][:1])  # warm-up
        runs = []
        delay = args.write_delay
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            phases = [worker._device_phase(args.layer, units) for _, units in blocks]
            sync(worker.device)
            sample_s = time.perf_counter() - t0
            if delay is None:
                delay = sample_s / args.blocks
                delay_writes(worker, delay)
            t0 = time.perf_counter()
            for (block, _), (result, exemplars, scores, _) in zip(blocks, phases):
                worker.writer.write(args.layer, block, result, exemplars=exemplars, unit_columns=scores)
            write_s = time.perf_counter() - t0
            piped_s = pipelined(worker, args.layer, blocks, in_flight=2)
            t0 = time.perf_counter()
            for block in blocks:
                worker.run_batch(args.layer, [block], [1])
            serial_s = time.perf_counter() - t0
            runs.append((sample_s, write_s, piped_s, serial_s))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sample_s, write_s, piped_s, serial_s = (statistics.median(col) for col in zip(*runs))
    record = {
        "benchmark": "pipeline", "model": args.model, "layer": args.layer, "blocks": args.blocks, "units": n,
        "chains": args.chains, "steps": args.steps, "threads": args.threads, "repeats": args.repeats,
        "write_delay_s": delay, "device": str(worker.device), "machine": platform.machine(),
        "sample_only_seconds": sample_s, "write_only_seconds": write_s, "pipelined_seconds": piped_s,
        "serial_seconds": serial_s, "max_of_sample_write": max(sample_s, write_s), "sum_of_sample_write": sample_s + write_s,
        "pipelined_over_max": piped_s / max(sample_s, write_s), "serial_over_pipelined": serial_s / piped_s,
        "runs": [dict(zip(("sample", "write", "pipelined", "serial"), r)) for r in runs],
    }
    report(f"{args.model} {args.layer}: {args.blocks} blocks x {args.block} units x {args.chains} chains x {args.steps} "
           f"steps, write delay {delay:.3f}s/block on {record['device']}", record,
           ("sample_only_seconds", "write_only_seconds", "pipelined_seconds", "serial_seconds", "max_of_sample_write",
            "sum_of_sample_write", "pipelined_over_max", "serial_over_pipelined"), args.out)


if __name__ == "__main__":
    main()
