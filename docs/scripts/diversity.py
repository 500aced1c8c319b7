"""Do a unit's chains sample the set of images that excite it? The old default (`repel=0`,
`eps=1e-8`, `eps_rel=0`, uniform starts: the paper's reference form) against the new default
(kernel repulsion among a unit's chains, starts from the unit's real exemplars) on the demo: the
10 class logits (`fc2`) of digits-cnn, lambda = 0.5, 8 chains, 300 steps, the same D and seeds.
Prints the table and writes docs/images/diversity_before_after.png (3 units; per unit, old and
new side by side; rows = chains, each cell = that chain's final sample).

    .venv/bin/python docs/scripts/diversity.py [--discriminator d.pt] [--save-discriminator d.pt]

Columns: variety = mean pairwise RMS distance of a unit's final samples after a low-pass (3x3 box
blur twice, `ldam_sweep.sampling.lowpass`), divided by that of the unit's class among the
held-out digits (mean over units); argmax kept = fraction of chains whose final image the model
still classifies as the target class; nearest real = mean RMS distance from a final sample to its
nearest held-out digit; activation ratio = final logit / the best held-out digit's logit of that
class; log D = the discriminator on the final samples.
"""

from __future__ import annotations

import argparse
import json
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
from ldam_sweep.sampling.lowpass import variety

ROOT = Path(__file__).resolve().parents[2]
OLD = {"repel": 0.0, "eps": 1e-8, "eps_rel": 0.0, "init": "uniform"}  # the reference form, exactly
FIGURE_UNITS = (2, 5, 8)


def nearest_real_rms(samples: np.ndarray, real: np.ndarray) -> np.ndarray:
    """RMS distance of each sample to its nearest real image."""
    a = samples.reshape(-1, real[0].size).astype(np.float64)
    b = real.reshape(len(real), -1).astype(np.float64)
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2.min(1), 0) / a.shape[1])


def measure(model, res, d, test: np.ndarray, real_variety: np.ndarray, best_logit: np.ndarray) -> dict[str, float]:
    """The five numbers of the issue for one ``ChainResult`` of the 10 logits."""
    final = res.final_samples
    u, k = final.shape[:2]
    x = torch.from_numpy(final.reshape(u * k, *final.shape[2:]))
    with torch.no_grad():
        pred = model.forward(x).argmax(1).numpy().reshape(u, k)
        log_d = d(x).numpy()
    var = variety(torch.from_numpy(final)).numpy()
    return {
        "variety": float((var / real_variety).mean()),
        "min_unit_variety": float((var / real_variety).min()),
        "argmax": float((pred == res.units[:, None]).mean()),
        "nearest_real": float(nearest_real_rms(final, test).mean()),
        "act_ratio": float((res.final_activation.mean(1) / best_logit).mean()),
        "log_d": float(log_d.mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--discriminator", default=None, help="a trained D file (default: train one, 200 updates at lambda 0.5)")
    ap.add_argument("--save-discriminator", default=None, help="where to keep the D trained here")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--variant", action="append", default=[],
                    help='extra row: sampler options as JSON, e.g. \'{"repel": 0.2}\' (may repeat)')
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "diversity_before_after.png"))
    args = ap.parse_args()
    model = ls.load_model("digits-cnn", device="cpu")
    (train, _), (test, test_y) = digits(28, "train"), digits(28, "test")
    if args.discriminator:
        trained = load_discriminator(args.discriminator, model)
    else:
        t0 = time.perf_counter()
        trained = train_discriminator(model, [("fc2", range(10))], train, test, {"updates": 200, "lam": 0.5})
        print(f"trained D in {time.perf_counter() - t0:.0f}s: held-out accuracy {trained.heldout_accuracy:.3f}")
        if args.save_discriminator:
            trained.save(args.save_discriminator)
    d = trained.module.eval()
    units = np.arange(10)
    exemplars, _ = top_exemplars(model, "fc2", units, "logit", torch.from_numpy(train), SAMPLING_EXEMPLARS)
    real_variety = np.array([float(variety(torch.from_numpy(test[test_y == c][None]))[0]) for c in units])
    best_logit = class_max_logits(model.net)
    print(f"real variety (held-out digits of a class, mean over classes): {real_variety.mean():.3f}")

    rows, finals = [], {}
    runs = [("old default (repel 0)", OLD), ("new default", {})] + [(v, json.loads(v)) for v in args.variant]
    for name, options in runs:
        t0 = time.perf_counter()
        res = ls.sample(model, "fc2", units, chains=args.chains, steps=args.steps, lam=args.lam, discriminator=d,
                        exemplars=exemplars, **options)
        secs = time.perf_counter() - t0
        rows.append((name, measure(model, res, d, test, real_variety, best_logit), secs / args.steps))
        finals[name] = res.final_samples

    print("\n| sampler | variety ÷ real | lowest unit | argmax kept | nearest real (RMS) | activation ratio | log D | ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m, per_step in rows:
        print(f"| {name} | {m['variety']:.2f} | {m['min_unit_variety']:.2f} | {m['argmax']:.2f} | {m['nearest_real']:.3f} | "
              f"{m['act_ratio']:.2f} | {m['log_d']:.2f} | {per_step * 1e3:.0f} |")

    old, new = finals["old default (repel 0)"], finals["new default"]
    cols = [side[u] for u in FIGURE_UNITS for side in (old, new)]  # each (chains, C, H, W)
    grid = np.stack(cols, axis=1)  # (chains, 6, C, H, W)
    heads = [f"class {u} {side}" for u in FIGURE_UNITS for side in ("old", "new")]
    path = save_grid(args.out, grid, model.input.range, row_labels=[f"chain {c}" for c in range(args.chains)],
                     col_labels=heads, scale=3)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
