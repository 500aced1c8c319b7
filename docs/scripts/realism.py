"""How realistic are a sweep's samples, and which sampler settings make them so? The ablation behind
docs/method.md ("Realism"): the demo's setting (every unit of digits-cnn, 8 chains x 300 steps,
lambda = 0.5, chains from each unit's real exemplars), one row per lever, added one at a time from
revision 2's defaults (the default before this change) to today's.

    .venv/bin/python docs/scripts/realism.py [--rows NAME ...] [--cache DIR] [--json out.json] [--figure f.png]

Measures (docs/scores.md, "Realism"), over all layers pooled (~2,900 final samples):
- two-sample: held-out accuracy of a small CNN telling the final samples from as many real digits
  (``ldam_sweep.sampling.realism.two_sample_test``: 3-fold cross-fitted, up to 2,048 per side); the
  units' top-8 exemplars give the floor (0.5 = indistinguishable);
- HF: high-frequency energy of the samples / real digits' (exemplars: the floor);
- on fc2 (the 10 logits, issue 14's measures): variety (low-passed pairwise distance / the class's
  among held-out digits), argmax kept, nearest held-out digit (RMS), activation / the best held-out
  digit's logit;
- hidden: the median over live hidden units of the chains' mean final activation / the unit's best
  training image;
- observer: a two-alternative task after Borowski et al. (ICLR 2021): shown a unit's 8 samples, an
  observer picks which of two held-out digits excites the unit more, one from the unit's top 5% on
  the held-out digits, one from its 50-75th percentile. The observer sees only digits-vit's features
  (a transformer the sampler never sees) and picks the query more similar (cosine) to the samples'
  mean feature. Fraction correct over 10 pairs per unit (chance 0.5); "exemplars" gives the same
  observer the unit's top-8 training digits instead of samples.
- log D: the row's discriminator on the final samples.

Discriminators: "revision 2 D" is stage 1 with revision 2's sampler (trained from uniform starts, 200 updates:
the demo's D before); "today's D" is stage 1 as it is now (chains from the units' exemplars, with
the sampler's preconditioner and target, 400 updates: the demo's D now). Both at lambda 0.5 against
all 410 units, seed 0. ``--quick`` (10 steps, the first 32 units of each layer) checks the script.
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
from ldam_sweep.objectives import DEFAULT_BY_KIND, units_objective
from ldam_sweep.sampling import noise
from ldam_sweep.sampling.chains import initial_images
from ldam_sweep.sampling.discriminator import load_discriminator, train_discriminator
from ldam_sweep.sampling.exemplars import top_exemplars
from ldam_sweep.sampling.lowpass import variety
from ldam_sweep.sampling.precondition import fit_preconditioner
from ldam_sweep.sampling.realism import hf_energy, two_sample_test
from ldam_sweep.settings import REVISION_2_LDAM, parse_options

ROOT = Path(__file__).resolve().parents[2]
R2 = dict(REVISION_2_LDAM)
# (row name, sampler options, discriminator, lambda): each row adds one lever to the one before
ROWS = [
    ("revision 2 (the default before)", R2, "r2", 0.5),
    ("+ data preconditioner", {**R2, "precondition": "auto"}, "r2", 0.5),
    ("+ activation target 1.0", {**R2, "precondition": "auto", "target": "auto"}, "r2", 0.5),
    ("+ diverse starts (top 32), no repulsion", {**R2, "precondition": "auto", "target": "auto", "start_pool": 32,
                                                 "repel": "auto"}, "r2", 0.5),
    ("+ step 2e-4, no L2 pull", {**R2, "precondition": "auto", "target": "auto", "start_pool": 32, "repel": "auto",
                                 "step_size": "auto", "l2": 0.0}, "r2", 0.5),
    ("+ realism term fades (logit scale)", {}, "r2", 0.5),
    ("+ today's D: today's default", {}, "new", 0.5),
    ("today's default, noise 0", {"noise": 0.0}, "new", 0.5),
    ("today's default, lambda 0 (no D)", {}, None, 0.0),
    ("today's default, lambda 0.75", {}, "new", 0.75),
    ("today's default, lambda 1", {}, "new", 1.0),
]
FIGURE_HIDDEN = ("conv2", "fc1", "relu3")  # the first unit live in both runs of each
FIGURE_LOGITS = (2, 5, 8)


def train_d(model, kind: str, train: np.ndarray, test: np.ndarray, cache: Path, quick: bool = False):
    path = cache / f"d_{kind}{'_quick' if quick else ''}.pt"
    if path.is_file():
        return load_discriminator(path, model)
    targets = [(lp.name, range(lp.units)) for lp in model.layers]
    t0 = time.perf_counter()
    d = train_discriminator(model, targets, train, test, {"updates": 20 if quick else 200 if kind == "r2" else 400, "lam": 0.5,
                                                           "sampler": R2 if kind == "r2" else {}})
    print(f"D {kind}: {time.perf_counter() - t0:.0f}s, held-out accuracy {d.heldout_accuracy:.3f}", flush=True)
    d.save(path)
    return d


def sweep(model, options, d, lam, pool, pre, steps=300, chains=8, quick=False):
    """Every unit, 32 units per batch: {layer: [(units, result, exemplar images, activations, starts), ...]}."""
    out = {}
    for lp in model.layers:
        objective = DEFAULT_BY_KIND[lp.kind]
        for i in range(0, 32 if quick else lp.units, 32):
            units = np.arange(i, min(i + 32, lp.units))
            ex, exv = top_exemplars(model, lp.name, units, objective, pool, 64)
            res = ls.sample(model, lp.name, units, chains=chains, steps=steps, lam=lam, seed=0,
                            discriminator=None if d is None else d.module, exemplars=ex, preconditioner=pre, **options)
            o = parse_options("ldam", options)
            keys = noise.chain_keys(0, lp.name, units, chains)
            starts = initial_images(model, "exemplars", keys, len(units), chains, torch.from_numpy(ex),
                                    o.start_pool).reshape(len(units), chains, *model.input.shape).numpy()
            out.setdefault(lp.name, []).append((units, res, ex, exv, starts))
    return out


@torch.no_grad()
def observer(model, vit, runs, test: np.ndarray, pairs: int = 10, seed: int = 0) -> dict[str, float]:
    """Fraction of 2-alternative trials in which the observer picks the strongly exciting query."""
    feats = vit.activations(torch.from_numpy(test), "norm")[:, :, 0]
    feats = torch.nn.functional.normalize(feats, dim=1)
    rng = np.random.default_rng(seed)
    hits = {"samples": [], "exemplars": []}
    for layer, parts in runs.items():
        kind = model.layer(layer).kind
        acts = units_objective(model.activations(torch.from_numpy(test), layer),
                               torch.arange(model.layer(layer).units), DEFAULT_BY_KIND[kind]).numpy()
        for units, res, ex, exv, _ in parts:
            for j, u in enumerate(units):
                if res.dead[j] or not exv[j, 0] > 0:
                    continue
                a = acts[:, u]
                q95, q50, q75 = np.quantile(a, [0.95, 0.5, 0.75])
                strong, moderate = np.flatnonzero(a >= q95), np.flatnonzero((a >= q50) & (a <= q75) & (a < q95))
                if len(strong) == 0 or len(moderate) == 0 or q75 >= q95:
                    continue
                for name, refs in (("samples", res.final_samples[j]), ("exemplars", ex[j, :8])):
                    ref = torch.nn.functional.normalize(vit.activations(torch.from_numpy(refs.astype(np.float32)), "norm")[:, :, 0], dim=1)
                    center = torch.nn.functional.normalize(ref.mean(0), dim=0)
                    s, m = rng.choice(strong, pairs), rng.choice(moderate, pairs)
                    hits[name] += (feats[s] @ center > feats[m] @ center).tolist()
    return {k: float(np.mean(v)) for k, v in hits.items()}


def measure(model, vit, runs, d, real, test, test_y, best_logit) -> dict[str, float]:
    fake, exs, hidden = [], [], []
    for layer, parts in runs.items():
        for units, res, ex, exv, _ in parts:
            live = ~res.dead
            fake.append(res.final_samples[live].reshape(-1, *res.final_samples.shape[2:]))
            exs.append(ex[live][:, :8].reshape(-1, *ex.shape[2:]))
            if layer != "fc2":
                r = res.final_activation[live].mean(1) / exv[live, 0]
                hidden += r[exv[live, 0] > 1e-12].tolist()
    fake, exs = np.concatenate(fake).astype(np.float32), np.concatenate(exs).astype(np.float32)
    real_hf = hf_energy(real).mean()
    m = {"two_sample": two_sample_test(fake, real, max_images=2048).accuracy,
         "two_sample_exemplars": two_sample_test(exs, real, max_images=2048).accuracy,
         "hf": float(hf_energy(fake).mean() / real_hf), "hf_exemplars": float(hf_energy(exs).mean() / real_hf),
         "hidden_activation": float(np.median(hidden))}
    units, res, *_ = runs["fc2"][0]
    final = res.final_samples
    x = torch.from_numpy(final.reshape(-1, *final.shape[2:]))
    with torch.no_grad():
        pred = model.forward(x).argmax(1).numpy().reshape(len(units), -1)
        m["log_d"] = float(d.module(torch.from_numpy(fake)).mean()) if d is not None else None
    real_var = np.array([float(variety(torch.from_numpy(test[test_y == c][None]))[0]) for c in units])
    m["variety"] = float((variety(torch.from_numpy(final)).numpy() / real_var).mean())
    m["argmax"] = float((pred == units[:, None]).mean())
    a, b = final.reshape(len(x), -1).astype(np.float64), test.reshape(len(test), -1).astype(np.float64)
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T
    m["nearest_real"] = float(np.sqrt(np.maximum(d2.min(1), 0) / a.shape[1]).mean())
    m["fc2_activation"] = float((res.final_activation.mean(1) / best_logit[units]).mean())
    obs = observer(model, vit, runs, test)
    m["observer"], m["observer_exemplars"] = obs["samples"], obs["exemplars"]
    return m


def figure(model, before, after, path: Path) -> Path:
    """Rows: 3 hidden units and 3 logits; columns: 3 chains' start | final, before, then after."""
    def live(runs, layer):
        return {int(u) for units, res, *_ in runs[layer] for u, dead in zip(units, res.dead) if not dead}

    picks = [(layer, min(live(before, layer) & live(after, layer))) for layer in FIGURE_HIDDEN]
    picks += [("fc2", u) for u in FIGURE_LOGITS]
    cells, rows = [], []
    for layer, unit in picks:
        row = []
        for runs in (before, after):
            for units, res, _, _, starts in runs[layer]:
                if unit in units:
                    j = int(np.flatnonzero(units == unit)[0])
                    for c in range(3):
                        row += [starts[j, c], res.final_samples[j, c]]
        cells.append(np.stack(row))
        rows.append(f"{layer} {unit}")
    heads = [f"{side} c{c} {what}" for side in ("before", "after") for c in range(3) for what in ("start", "final")]
    return save_grid(path, np.stack(cells), model.input.range, row_labels=rows, col_labels=heads, scale=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", help="row names (prefixes) to run; default: all")
    ap.add_argument("--cache", default=str(ROOT / "storage" / "realism-cache"), help="where trained Ds are kept")
    ap.add_argument("--json", default=str(ROOT / "docs" / "scripts" / "realism.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "images" / "realism_before_after.png"))
    ap.add_argument("--quick", action="store_true", help="10 steps, 32 units per layer, Ds of 20 updates: a smoke run")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = ls.load_model("digits-cnn", device="cpu")
    vit = ls.load_model("digits-vit", device="cpu")
    (train, _), (test, test_y) = digits(28, "train"), digits(28, "test")
    real = digits(28, "all")[0]
    pool, pre = torch.from_numpy(train), fit_preconditioner(train)
    best_logit = class_max_logits(model.net)
    ds = {k: train_d(model, k, train, test, cache, args.quick) for k in ("r2", "new")}
    results, kept = {}, {}
    for name, options, dk, lam in ROWS:
        if args.rows and not any(name.startswith(r) for r in args.rows):
            continue
        t0 = time.perf_counter()
        runs = sweep(model, options, None if dk is None else ds[dk], lam, pool, pre,
                     steps=10 if args.quick else 300, quick=args.quick)
        m = measure(model, vit, runs, None if dk is None else ds[dk], real, test, test_y, best_logit)
        m["seconds"] = time.perf_counter() - t0
        results[name] = m
        if name.startswith("revision 2") or name.startswith("+ today's D"):
            kept[name.split()[0]] = runs
        print(name, json.dumps({k: (None if v is None else round(v, 3)) for k, v in m.items()}), flush=True)
    cols = ["two_sample", "two_sample_exemplars", "hf", "hf_exemplars", "variety", "argmax", "nearest_real",
            "fc2_activation", "hidden_activation", "observer", "observer_exemplars", "log_d"]
    print("\n| row | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for name, m in results.items():
        print(f"| {name} | " + " | ".join("–" if m[c] is None else f"{m[c]:.2f}" if c != "nearest_real" else f"{m[c]:.3f}"
                                        for c in cols) + " |")
    Path(args.json).write_text(json.dumps(results, indent=1))
    if {"revision", "+"} <= set(kept):
        print("wrote", figure(model, kept["revision"], kept["+"], Path(args.figure)))


if __name__ == "__main__":
    main()
