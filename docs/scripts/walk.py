"""Do the chains move, and does the move show more than the real images they start from? The
measurements behind docs/method.md ("Chains that walk", "The activation ladder"): the demo's setting
(digits-cnn, 8 chains x 300 steps, lambda = 0.5, chains from each unit's real exemplars, today's D),
one row per sampler setting, measured side by side in one run. Rows with ``"method": "walk"`` run on
the score prior (``ls.train_score_prior`` on the training digits, cached beside D) with no D in the
update ("Walks on a score prior").

    .venv/bin/python docs/scripts/walk.py [--rows NAME ...] [--units N] [--cache DIR] [--json out.json]

Per row, over the live units of every layer (``--units N``: the first N units of each layer):
- move: median over chains of RMS(final - start) (pixel range 0..1; two real digits are ~0.30 apart,
  two of one class ~0.21, a digit's nearest other digit ~0.09);
- two-sample: held-out accuracy of the small CNN telling final samples from real digits (0.5 = alike),
  HF: high-frequency energy / real digits' (docs/scores.md, "Realism");
- activation: median over live units of the chains' median final activation / the unit's best real
  image's; reached: the share of live units whose chains' median final activation is at least the
  rung's target;
- observer: the informativeness 2-AFC (``ldam_sweep.sampling.observer``) on the held-out split, for
  the samples, their starts and the top-8 exemplars, per layer (conv2, fc1) and over all;
- seeds: median RMS between the final samples of seed 0 and seed 1 (same starts): what the noise
  changes;
- spread: median over units (best real activation > 0) of how far apart a unit's chains end, pairwise,
  over how far apart they started (1: as varied as their real starts; near 0: the chains collapsed
  onto one image).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ldam_sweep as ls
import ldam_sweep.sampling.chains as chains_mod
from ldam_sweep.data import digits
from ldam_sweep.objectives import DEFAULT_BY_KIND
from ldam_sweep.sampling.exemplars import top_exemplars
from ldam_sweep.sampling.observer import Observer, observer_columns, query_subset
from ldam_sweep.sampling.precondition import fit_preconditioner
from ldam_sweep.sampling.realism import hf_energy, two_sample_test

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from realism import train_d  # noqa: E402

ROWS: dict[str, dict] = {"default": {}, "walk": {"method": "walk"}}


def score_prior(train, cache: Path):
    """The score prior of the ``walk`` rows (ls.train_score_prior's defaults), trained once into the cache."""
    import inspect

    given = inspect.signature(ls.train_score_prior).parameters  # one file per default network and training length
    path = cache / f"score_prior-h{given['hidden'].default}-s{given['steps'].default}.pt"
    if path.is_file():
        return ls.load_score_prior(path)
    prior = ls.train_score_prior(train)
    print(f"score prior: {prior.record['seconds']:.0f}s, final loss {prior.record['final_loss']:.3f}", flush=True)
    prior.save(path)
    return prior


def sweep(model, options, d, lam, pool, pre, units_per_layer, seed=0, steps=300, chains=8, prior=None):
    options = dict(options)
    ladder = options.pop("ladder", ())
    walk = options.get("method") == "walk"  # the score prior is its realism term: D is recorded, not used
    extra = {"prior": prior, "lam": 0.0} if walk else {"preconditioner": pre, "ladder": ladder, "lam": lam}
    out = {}
    for lp in model.layers:
        objective = DEFAULT_BY_KIND[lp.kind]
        n = lp.units if units_per_layer is None else min(lp.units, units_per_layer)
        for i in range(0, n, 32):
            units = np.arange(i, min(i + 32, n))
            ex, exv = top_exemplars(model, lp.name, units, objective, pool, 64)
            res = ls.sample(model, lp.name, units, chains=chains, steps=steps, seed=seed, discriminator=d.module,
                            exemplars=ex, **extra, **options)
            out.setdefault(lp.name, []).append((units, res, ex, exv))
    return out


def rms(a, b):
    return np.sqrt(((a.astype(np.float64) - b) ** 2).reshape(*a.shape[:2], -1).mean(-1))


def apart(x):
    """Mean RMS between the (K, C, H, W) images of one unit's chains, pairwise."""
    x = x.reshape(len(x), -1).astype(np.float64)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
    return float(d[np.triu_indices(len(x), 1)].mean())


def measure(model, runs, real, obs, target=1.0, again=None):
    fake, moves, acts, reached, seeds, spread = [], {}, [], [], [], []
    hits: dict[str, dict[str, list]] = {}
    for layer, parts in runs.items():
        for k, (units, res, ex, exv) in enumerate(parts):
            live = ~res.dead
            if not live.any():
                continue
            fin = res.final_samples[live]
            fake.append(fin.reshape(-1, *fin.shape[2:]))
            moves.setdefault(layer, []).append(rms(fin, res.starts[live]).ravel())
            ok = live & (exv[:, 0] > 1e-12)
            r = np.median(res.final_activation[ok], 1) / exv[ok, 0]
            acts += r.tolist()
            spread += [apart(f) / max(apart(s), 1e-12) for f, s in zip(res.final_samples[ok], res.starts[ok])]
            reached += (r >= target * (1 - 1e-3)).tolist()
            if again is not None:
                seeds.append(rms(fin, again[layer][k][1].final_samples[live]).ravel())
            cols = observer_columns(model, layer, DEFAULT_BY_KIND[model.layer(layer).kind], res, ex[:, :8], obs)
            for row in cols.values():
                for name, v in row.items():
                    if v is not None:
                        hits.setdefault(layer, {}).setdefault(name, []).append(v)
    fake = np.concatenate(fake).astype(np.float32)
    m = {"move": float(np.median(np.concatenate([np.concatenate(v) for v in moves.values()]))),
         "move_by_layer": {k: float(np.median(np.concatenate(v))) for k, v in moves.items()},
         "two_sample": two_sample_test(fake, real, max_images=2048).accuracy,
         "hf": float(hf_energy(fake).mean() / hf_energy(real).mean()),
         "activation": float(np.median(acts)), "reached": float(np.mean(reached)),
         "spread": float(np.median(spread))}
    if seeds:
        m["seeds"] = float(np.median(np.concatenate(seeds)))
    first = next(iter(runs.values()))[0][1]
    for r, f in enumerate([] if first.ladder is None else first.ladder):  # each rung of the ladder
        rf, rmove, rratio, robs = [], [], [], {}
        for layer, parts in runs.items():
            for units, res, ex, exv in parts:
                live = ~res.dead
                if not live.any():
                    continue
                if layer in ("conv2", "fc1"):  # the observer shown the rung's images instead of the finals
                    rung = dataclasses.replace(res, samples=res.rung_samples[:, :, r : r + 1])
                    cols = observer_columns(model, layer, DEFAULT_BY_KIND[model.layer(layer).kind], rung, None, obs)
                    robs.setdefault(layer, []).extend(v["observer_samples"] for v in cols.values()
                                                      if v["observer_samples"] is not None)
                x = res.rung_samples[live][:, :, r]
                rf.append(x.reshape(-1, *x.shape[2:]))
                rmove.append(rms(x, res.starts[live]).ravel())
                ok = live & (exv[:, 0] > 1e-12)
                rratio += (np.median(res.rung_activation[ok][:, :, r], 1) / exv[ok, 0]).tolist()
        rf = np.concatenate(rf).astype(np.float32)
        m[f"rung_{f:g}"] = {"move": float(np.median(np.concatenate(rmove))), "activation": float(np.median(rratio)),
                            "reached": float(np.mean(np.asarray(rratio) >= f * (1 - 1e-3))),
                            "two_sample": two_sample_test(rf, real, max_images=2048).accuracy,
                            "hf": float(hf_energy(rf).mean() / hf_energy(real).mean()),
                            **{f"observer_{k}": float(np.mean(v)) for k, v in robs.items()}}
    for layer in ("conv2", "fc1"):
        for name in ("samples", "starts", "exemplars"):
            v = hits.get(layer, {}).get(f"observer_{name}", [])
            m[f"observer_{layer}_{name}"] = float(np.mean(v)) if v else None
    for name in ("samples", "starts", "exemplars"):
        v = [x for layer in hits.values() for x in layer.get(f"observer_{name}", [])]
        m[f"observer_{name}"] = float(np.mean(v)) if v else None
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", help="row names to run; default: all")
    ap.add_argument("--row", action="append", default=[], help="an extra row: NAME=JSON options")
    ap.add_argument("--units", type=int, default=None, help="the first N units of each layer (default: all)")
    ap.add_argument("--seeds", action="store_true", help="also run seed 1 (the noise's share of the move)")
    ap.add_argument("--cache", default=str(ROOT / "storage" / "realism-cache"), help="where the trained D is kept")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = dict(ROWS)
    for r in args.row:
        name, _, js = r.partition("=")
        rows[name] = json.loads(js)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = ls.load_model("digits-cnn", device="cpu")
    (train, _), (test, _) = digits(28, "train"), digits(28, "test")
    real = digits(28, "all")[0]
    pool, pre = torch.from_numpy(train), fit_preconditioner(train)
    d = train_d(model, "new", train, test, cache)
    obs = Observer(torch.from_numpy(query_subset(test)))
    prior = score_prior(train, cache) if any(o.get("method") == "walk" for n, o in rows.items()
                                             if not args.rows or n in args.rows) else None
    results = {}
    for name, options in rows.items():
        if args.rows and name not in args.rows:
            continue
        options = dict(options)
        target = float(options.get("target", 1.0)) if options.get("target", "auto") not in ("auto", None) else 1.0
        if "ladder_step" in options:
            chains_mod.LADDER_STEP = options.pop("ladder_step")
        t0 = time.perf_counter()
        runs = sweep(model, options, d, 0.5, pool, pre, args.units, prior=prior)
        secs = time.perf_counter() - t0
        again = sweep(model, options, d, 0.5, pool, pre, args.units, seed=1, prior=prior) if args.seeds else None
        m = measure(model, runs, real, obs, target, again)
        m["seconds"] = secs
        results[name] = m
        print(name, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()
                                if k != "move_by_layer" and not k.startswith("rung_")}), flush=True)
        for k, v in m.items():
            if k.startswith("rung_"):
                print("  ", k, {a: round(b, 3) for a, b in v.items()}, flush=True)
        print("   move by layer", {k: round(v, 3) for k, v in m["move_by_layer"].items()}, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
