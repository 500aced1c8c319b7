"""Batching gain: chain-steps per second for a block of units in one batch vs one unit at a time.

Same layer, same chains per unit, same steps, same seeds; both measured in this run, so the
ratio is what matters. `--quick` runs a few steps (used by the test suite so this cannot rot).

    python benchmarks/batching.py                 # digits-cnn conv2, 32 units x 8 chains
    python benchmarks/batching.py --model torchvision:resnet18 --size 64 --layer layer2
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import ldam_sweep as ls
from record import chain_steps_done, load_bench_model, report


def measure(model: ls.ModelHandle, layer: str, units: list[int], chains: int, steps: int, repeats: int) -> dict:
    ls.sample(model, layer, units[:2], chains=chains, steps=2)  # warm-up (allocator, kernels)
    best_block = best_single = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        block = ls.sample(model, layer, units, chains=chains, steps=steps)
        best_block = min(best_block, time.perf_counter() - t0)
        t0 = time.perf_counter()
        singles = [ls.sample(model, layer, [u], chains=chains, steps=steps) for u in units]
        best_single = min(best_single, time.perf_counter() - t0)
    block_work, single_work = chain_steps_done(block), sum(chain_steps_done(r) for r in singles)
    return {
        "block_chain_steps": block_work,
        "one_at_a_time_chain_steps": single_work,
        "block_chain_steps_per_s": block_work / best_block,
        "one_at_a_time_chain_steps_per_s": single_work / best_single,
        "batching_gain": best_single / best_block,
        "block_seconds": best_block,
        "one_at_a_time_seconds": best_single,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--size", type=int, default=None, help="input size for torchvision models")
    ap.add_argument("--layer", default="conv2")
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="a few seconds: 4 units, 3 steps, 1 repeat")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batching.json"))
    args = ap.parse_args()
    if args.quick:
        args.units, args.steps, args.repeats = 4, 3, 1
    model = load_bench_model(args.model, args.size, args.device)
    units = list(range(min(args.units, model.layer(args.layer).units)))
    res = measure(model, args.layer, units, args.chains, args.steps, args.repeats)
    record = {
        "benchmark": "batching", "model": model.name, "layer": args.layer, "units": len(units),
        "chains": args.chains, "steps": args.steps, "device": str(model.device),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name(0)}" if model.device.type == "cuda" else ""),
        "torch": torch.__version__, **res,
    }
    report(f"{model.name} {args.layer}: {len(units)} units x {args.chains} chains x {args.steps} steps on {record['device']}",
           record, ("block_chain_steps_per_s", "one_at_a_time_chain_steps_per_s", "batching_gain"), args.out, fmt="10.2f")


if __name__ == "__main__":
    main()
