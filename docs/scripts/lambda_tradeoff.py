"""The lambda trade-off figure: the same 10 class-logit units of digits-cnn at lambda in
{0, 0.25, 0.5, 0.75, 1}, with a discriminator trained on digits (the demo's settings), plus the
numbers behind it. Writes docs/images/lambda_tradeoff.png and prints a markdown table.

    .venv/bin/python docs/scripts/lambda_tradeoff.py [--discriminator d.pt] [--chains 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import ldam_sweep as ls
from ldam_sweep.render import save_grid
from ldam_sweep.data import digits
from ldam_sweep.model.zoo import class_max_logits
from ldam_sweep.sampling.chains import SAMPLING_EXEMPLARS
from ldam_sweep.sampling.discriminator import load_discriminator, train_discriminator
from ldam_sweep.sampling.exemplars import top_exemplars

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ROOT = Path(__file__).resolve().parents[2]


def nearest_real_rms(samples: np.ndarray, real: np.ndarray) -> float:
    a = samples.reshape(-1, real[0].size).astype(np.float64)
    b = real.reshape(len(real), -1).astype(np.float64)
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T
    return float(np.sqrt(np.maximum(d2.min(1), 0) / a.shape[1]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--discriminator", default=None, help="a trained D file (default: train one against the logits' chains, 400 updates)")
    ap.add_argument("--chains", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "lambda_tradeoff.png"))
    args = ap.parse_args()
    model = ls.load_model("digits-cnn", device="cpu")
    train, (test, _) = digits(28, "train"), digits(28, "test")
    if args.discriminator:
        trained = load_discriminator(args.discriminator, model)
    else:
        t0 = time.perf_counter()
        trained = train_discriminator(model, [("fc2", range(10))], train[0], test, {"updates": 400, "lam": 0.5})
        print(f"trained D in {time.perf_counter() - t0:.0f}s: held-out accuracy {trained.heldout_accuracy:.3f}")
    ref = class_max_logits(model.net)
    exemplars, _ = top_exemplars(model, "fc2", np.arange(10), "logit", torch.from_numpy(train[0]), SAMPLING_EXEMPLARS)
    columns, labels, rows = [], [], []
    for lam in LAMBDAS:
        t0 = time.perf_counter()
        res = ls.sample(model, "fc2", range(10), chains=args.chains, steps=args.steps, lam=lam, discriminator=trained.module,
                        exemplars=exemplars, preconditioner=train[0])
        secs = time.perf_counter() - t0
        with torch.no_grad():
            pred = model.forward(torch.from_numpy(res.final_samples.reshape(-1, 1, 28, 28))).argmax(1).numpy()
        argmax = float((pred.reshape(10, -1) == np.arange(10)[:, None]).mean())
        rows.append((lam, argmax, float((res.final_activation.mean(1) / ref).mean()), float(res.realism[..., -1].mean()),
                     nearest_real_rms(res.final_samples, test), secs))
        columns.append(res.final_samples)
        labels.append(np.vectorize(lambda v: f"{v:.0f}")(res.final_activation))
    grid = np.concatenate(columns, axis=1)
    heads = [f"lambda={lam}" if c == 0 else "" for lam in LAMBDAS for c in range(args.chains)]
    path = save_grid(args.out, grid, model.input.range, row_labels=[f"class {u}" for u in range(10)],
                     cell_labels=np.concatenate(labels, axis=1), col_labels=heads, scale=3)
    print(f"wrote {path}")
    print("\n| λ | target still argmax | activation ÷ best real digit | log D | RMS distance to nearest held-out digit | seconds |")
    print("|---|---|---|---|---|---|")
    for lam, am, ratio, logd, near, secs in rows:
        print(f"| {lam} | {am:.2f} | {ratio:.2f} | {logd:.2f} | {near:.3f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
