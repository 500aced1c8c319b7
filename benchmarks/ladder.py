"""Cost of the activation ladder and of ``walk`` per unit: ``ls.sample`` of one batch of units with
and without ``ladder=(1.5, 2.0)`` (150 steps per rung), and ``method="walk"`` on a score prior (the
same steps; no D), side by side in one run, alternating, best of ``--repeats`` each. The demo's setting by default: digits-cnn, 32 units of a layer, 8 chains x 300
steps, lambda = 0.5 with a small discriminator, chains from the units' exemplars.

    python benchmarks/ladder.py [--layer conv2] [--device cuda] [--out benchmarks/results/ladder.json]

Reported: seconds per batch each way and their ratios to the plain run (the issue's bound: at most
2x a unit's cost), and the seconds to train the score prior (once per sweep, like D).
A rung's step costs less than a run's step: no gradient of log D (the rungs climb without the
realism term; log D is still recorded, one forward).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

import ldam_sweep as ls
from ldam_sweep.data import digits
from ldam_sweep.objectives import DEFAULT_BY_KIND
from ldam_sweep.sampling.discriminator import train_discriminator
from ldam_sweep.sampling.exemplars import top_exemplars
from ldam_sweep.sampling.precondition import fit_preconditioner
from record import report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="conv2")
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/ladder.json")
    args = ap.parse_args()
    model = ls.load_model("digits-cnn", device=args.device)
    (train, _), (test, _) = digits(28, "train"), digits(28, "test")
    d = train_discriminator(model, [(args.layer, range(args.units))], train, test, {"updates": 20, "lam": 0.5})
    units = np.arange(args.units)
    ex, _ = top_exemplars(model, args.layer, units, DEFAULT_BY_KIND[model.layer(args.layer).kind], torch.from_numpy(train), 64)
    pre = fit_preconditioner(train, device=args.device)
    prior = ls.train_score_prior(train)
    kw = dict(chains=8, steps=args.steps, discriminator=d.module, exemplars=ex)
    rows = (("plain", {"lam": 0.5, "preconditioner": pre}), ("ladder", {"lam": 0.5, "preconditioner": pre, "ladder": (1.5, 2.0)}),
            ("walk", {"method": "walk", "prior": prior}))
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(args.repeats):
        for name, extra in rows:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ls.sample(model, args.layer, units, **kw, **extra)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    rec = {"layer": args.layer, "units": args.units, "chains": 8, "steps": args.steps, "ladder": [1.5, 2.0],
           "ladder_steps": 150, "device": args.device, "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "plain_s": min(times["plain"]), "ladder_s": min(times["ladder"]),
           "walk_s": min(times["walk"]), "prior_train_s": prior.record["seconds"], "all_s": times}
    rec["ratio"] = rec["ladder_s"] / rec["plain_s"]
    rec["walk_ratio"] = rec["walk_s"] / rec["plain_s"]
    report("activation ladder and walk: cost per batch", rec,
           ["plain_s", "ladder_s", "ratio", "walk_s", "walk_ratio", "prior_train_s"], args.out)


if __name__ == "__main__":
    main()
