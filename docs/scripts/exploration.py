"""What LDAM explores, measured on digits-cnn's 10 class logits (issue "Diversity scores"):

(a) chains of one unit started from the *same* image: spread of their final samples;
(b) movement of a chain between successive snapshots after burn-in;
(c) between-chain diversity from independent starts, next to realism and activation,
    with the real data's own within-class diversity for scale.

Samplers: the `am` baseline (Adam ascent, no noise, as peer libraries do it), the reference
`ldam` schedule (noise annealed within blocks of 100 steps), `ldam` with faster noise restarts,
and the exact `sgld` form. Prints a markdown table; `--lams` picks the lambdas (D trained as in the
demo when any lambda > 0).

    .venv/bin/python docs/scripts/exploration.py [--lams 0 0.5] [--chains 8] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import ldam_sweep as ls
from ldam_sweep.data import digits
from ldam_sweep.sampling.diversity import pairwise_rms
from ldam_sweep.sampling.scoring import score_result
from ldam_sweep.sampling.discriminator import train_discriminator
from ldam_sweep.settings import REFERENCE_LDAM

VARIANTS = {
    "am (baseline)": dict(method="am"),
    "ldam reference form": dict(method="ldam", **REFERENCE_LDAM),
    "ldam default (diverse real starts, preconditioner, target)": dict(method="ldam"),
    "ldam reference, σ=0.3 restart every 10": dict(method="ldam", **{**REFERENCE_LDAM, "noise": 0.3, "noise_block": 10}),
    "sgld (ε=1e-3, T=0.01)": dict(method="sgld"),
}


def within_class_diversity(images: np.ndarray, labels: np.ndarray) -> float:
    """Mean pairwise RMS distance between real digits of one class, averaged over classes."""
    vals = []
    for c in range(10):
        x = torch.from_numpy(images[labels == c]).flatten(1).unsqueeze(0).double()
        d = pairwise_rms(x)[0]
        n = d.shape[0]
        vals.append(float(d.sum() / (n * (n - 1))))
    return float(np.mean(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    model = ls.load_model("digits-cnn", device="cpu")
    train, labels = digits(28, "train")
    test, _ = digits(28, "test")
    real_div = within_class_diversity(train, labels)
    print(f"real digits: within-class diversity {real_div:.3f} (mean pairwise RMS, pixel range [0, 1])")
    d = None
    if any(lam > 0 for lam in args.lams):
        t0 = time.perf_counter()
        d = train_discriminator(model, [(l.name, range(l.units)) for l in model.layers], train, test,
                                {"updates": 400, "lam": 0.5}).module
        print(f"discriminator trained in {time.perf_counter() - t0:.0f}s")
    pool = torch.from_numpy(train)
    from ldam_sweep.sampling.exemplars import top_exemplars

    ex64, ex_act = top_exemplars(model, "fc2", np.arange(10), "logit", pool, 64)
    start = np.full((1, 28, 28), 0.5, dtype=np.float32)
    rows = []
    for lam in args.lams:
        for name, kw in VARIANTS.items():
            if kw["method"] == "am" and lam > 0:
                continue
            common = dict(chains=args.chains, steps=args.steps, lam=lam, discriminator=d, snapshot_every=max(1, args.steps // 12))
            # ldam's default starts from the units' exemplars and moves in the data's directions (as a sweep
            # with data does); the reference form from noise
            data = dict(exemplars=ex64, preconditioner=train) if name.startswith("ldam default") else {}
            same = ls.sample(model, "fc2", range(10), init=start, **data, **common, **kw)
            free = ls.sample(model, "fc2", range(10), **data, **common, **kw)
            s_same = score_result(model, same, real_pool=test, exemplar_max=ex_act[:, 0])
            s_free = score_result(model, free, real_pool=test, exemplar_max=ex_act[:, 0])
            mean = lambda scores, key: float(np.nanmean([v[key] if v[key] is not None else np.nan for v in scores.values()]))  # noqa: E731
            row = {
                "lam": lam, "sampler": name,
                "a_same_start_spread": mean(s_same, "pixel_diversity"),
                "b_movement_after_burn_in": mean(s_free, "movement"),
                "c_between_chain_diversity": mean(s_free, "pixel_diversity"),
                "modes": mean(s_free, "modes"),
                "activation_ratio": mean(s_free, "activation_ratio"),
                "nearest_real": mean(s_free, "nearest_real"),
                "log_d": float(np.mean(free.realism[..., -1])) if free.realism is not None else float("nan"),
            }
            rows.append(row)
            print(json.dumps(row))
    print(f"\nreal digits, within-class diversity: {real_div:.3f}\n")
    print("| λ | sampler | (a) same-start spread | (b) movement after burn-in | (c) between-chain diversity | modes (of %d) | activation ratio | nearest real digit | log D |" % args.chains)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lam']} | {r['sampler']} | {r['a_same_start_spread']:.3f} | {r['b_movement_after_burn_in']:.4f} | "
              f"{r['c_between_chain_diversity']:.3f} | {r['modes']:.1f} | {r['activation_ratio']:.2f} | {r['nearest_real']:.3f} | {r['log_d']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"real_within_class": real_div, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
