"""Reproducibility of a unit's samples on one machine, and what determinism costs.

One batch of ``--units`` units is sampled, then the middle unit is sampled again in other ways and
compared with what the batch gave it:

  same batch again      the same batch, same process (deterministic kernels, no TF32)
  alone                 the unit alone (a batch of one unit)
  other batch, same size  the unit at another position of a batch of the same size, other units beside it
  nondeterministic      the same batch twice with ``deterministic: false`` (cuDNN autotuning, TF32)

Each comparison gives the largest |difference| of the final samples (pixels in [0, 1]), the share
of pixels that differ by more than 1/255 (a difference a person could see), and the largest
|difference| of the activation trace relative to the trace's range. The batch's seconds with and
without determinism give its cost. On a CPU every row is expected at 0 (the kernels do not depend
on the batch); on a GPU the kernels a convolution or matrix product uses can depend on the batch's
size, which is what the "other batch, same size" row isolates.

    python benchmarks/reproducibility.py --device cuda                      # digits-cnn fc1
    python benchmarks/reproducibility.py --device cuda --model torchvision:resnet18 --size 224 --layer layer3
    python benchmarks/reproducibility.py --quick                            # seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

import ldam_sweep as ls
from ldam_sweep.cluster.worker import set_determinism
from record import load_bench_model, report, sync


def timed(model, layer, units, kw):
    sync(model.device)
    t0 = time.perf_counter()
    res = ls.sample(model, layer, units, **kw)
    sync(model.device)
    return res, time.perf_counter() - t0


def compare(a, ia: int, b, ib: int) -> dict:
    """Unit row ``ia`` of result ``a`` against row ``ib`` of ``b``: final samples and activation trace."""
    xa, xb = a.samples[ia, :, -1].astype(np.float64), b.samples[ib, :, -1].astype(np.float64)
    ta, tb = a.activation[ia].astype(np.float64), b.activation[ib].astype(np.float64)
    span = max(float(np.ptp(ta)), 1e-12)
    d = np.abs(xa - xb)
    return {"samples_max_abs_diff": float(d.max()), "pixels_over_1_255": float((d > 1 / 255).mean()),
            "trace_max_rel_diff": float(np.abs(ta - tb).max() / span)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--layer", default="fc1")
    ap.add_argument("--units", type=int, default=32, help="units of the batch (the layer needs 2x this)")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reproducibility.json"))
    args = ap.parse_args()
    if args.quick:
        args.units, args.chains, args.steps = 3, 2, 4
        args.size = min(args.size, 32) if args.size else None
    set_determinism(True)  # before CUDA starts, as the sweep's workers do
    model = load_bench_model(args.model, args.size, args.device)
    n, layer = args.units, args.layer
    batch = list(range(n))
    u = batch[n // 2]
    other = [u] + list(range(n, 2 * n - 1))  # the same size, u first, other units beside it
    kw = dict(chains=args.chains, steps=args.steps, seed=0)
    ls.sample(model, layer, batch[:2], chains=args.chains, steps=2)  # warm-up
    a, det_s = timed(model, layer, batch, kw)
    again, _ = timed(model, layer, batch, kw)
    alone, _ = timed(model, layer, [u], kw)
    beside, _ = timed(model, layer, other, kw)
    set_determinism(False)
    ls.sample(model, layer, batch[:2], chains=args.chains, steps=2)  # autotuning's first pass
    na, nondet_s = timed(model, layer, batch, kw)
    nb, _ = timed(model, layer, batch, kw)
    set_determinism(True)
    extra = {}
    if compare(a, n // 2, again, n // 2)["samples_max_abs_diff"] > 0:  # not even the same batch: is it the repulsion?
        r1, _ = timed(model, layer, batch, {**kw, "repel": 0.0})
        r2, _ = timed(model, layer, batch, {**kw, "repel": 0.0})
        extra["same_batch_again_without_repulsion"] = compare(r1, n // 2, r2, n // 2)
    rows = {"same_batch_again": compare(a, n // 2, again, n // 2), "alone": compare(a, n // 2, alone, 0),
            "other_batch_same_size": compare(a, n // 2, beside, 0),
            "nondeterministic_same_batch_again": compare(na, n // 2, nb, n // 2),
            "nondeterministic_vs_deterministic": compare(a, n // 2, na, n // 2), **extra}
    device = str(model.device)
    record = {"benchmark": "reproducibility", "model": args.model, "size": args.size, "layer": layer, "units": n,
              "unit": u, "chains": args.chains, "steps": args.steps, "device": device,
              "machine": f"{platform.machine()}, torch {torch.__version__}"
              + (f", {torch.cuda.get_device_name(0)}" if model.device.type == "cuda" else ""),
              "deterministic_batch_seconds": det_s, "nondeterministic_batch_seconds": nondet_s,
              "determinism_cost": det_s / nondet_s, **{f"{k}_{m}": v for k, r in rows.items() for m, v in r.items()},
              "comparisons": rows}
    report(f"{args.model} {layer}: unit {u} of a batch of {n} x {args.chains} chains x {args.steps} steps on {device}",
           record, ["deterministic_batch_seconds", "nondeterministic_batch_seconds", "determinism_cost",
                    *(f"{k}_{m}" for k, r in rows.items() for m in r)], args.out, fmt="10.4g")


if __name__ == "__main__":
    main()
