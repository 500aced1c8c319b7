"""What unit labels and activation distributions cost a sweep: per batch of units, side by side in
one process, the exemplar pass as it was (top-k only), the pass with distributions and labels, the
network's reading of the final samples, and the sampling itself (the demo's settings).

    python benchmarks/labels.py                 # digits-cnn conv2 (32 units) and fc1 (128 units)
    python benchmarks/labels.py --quick         # 3 steps, 1 repeat
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

import ldam_sweep as ls
from ldam_sweep.data import real_data
from ldam_sweep.sampling.chains import SAMPLING_EXEMPLARS
from ldam_sweep.sampling.exemplars import exemplar_pass, pool_scores, sample_label_columns
from ldam_sweep.spec import DataSpec
from record import report


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "labels.json"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 3, 1
    torch.set_num_threads(1)  # as a worker with one CPU runs
    model = ls.load_model("digits-cnn", device="cpu")
    images, labels, names = real_data(DataSpec(source="digits"), model.input, "train")
    pool = torch.from_numpy(images)
    record: dict = {"benchmark": "labels", "machine": platform.machine(), "steps": args.steps, "pool": len(pool)}
    for layer, n in (("conv2", 32), ("fc1", 128)):
        units = np.arange(n)
        objective = model.layer(layer).default_objective
        k = SAMPLING_EXEMPLARS
        def before_fn():  # the pass as it was: every image scored, the top k kept, nothing else
            scores = pool_scores(model, layer, units, objective, pool)
            vals, order = scores.topk(k, dim=0)
            return pool[order.T.reshape(-1)], vals.T.numpy()

        before = timed(before_fn, args.repeats)
        found = exemplar_pass(model, layer, units, objective, pool, k, labels=labels, class_names=names, label_k=8)
        now = timed(lambda: exemplar_pass(model, layer, units, objective, pool, k, labels=labels, class_names=names,
                                          label_k=8), args.repeats)
        result = ls.sample(model, layer, units.tolist(), chains=8, steps=args.steps, exemplars=found.images)
        reading = timed(lambda: sample_label_columns(model, result.final_samples, model.class_names,
                                                     [c.get("label") for c in found.columns]), args.repeats)
        sampling = timed(lambda: ls.sample(model, layer, units.tolist(), chains=8, steps=args.steps,
                                           exemplars=found.images), 1)
        record[layer] = {"units": n, "exemplar_pass_before_s": before, "exemplar_pass_now_s": now,
                         "sample_reading_s": reading, "sampling_s": sampling,
                         "added_share_of_batch": (now - before + reading) / (before + sampling)}
        record[f"{layer}_added_share"] = record[layer]["added_share_of_batch"]
    report("labels benchmark: added per batch ÷ the batch's exemplar pass + sampling", record,
           ("conv2_added_share", "fc1_added_share"), args.out)
    for layer in ("conv2", "fc1"):
        print(layer, {k: round(v, 4) for k, v in record[layer].items()})


if __name__ == "__main__":
    main()
