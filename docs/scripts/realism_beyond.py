"""Realism beyond the digits CNN: revision 2's sampler and D against today's, on

- ``photos64``: the setting of the realism issue: torchvision ``resnet18`` (random weights; no
  weights can be downloaded here) at 64 px RGB, 300 crops of scikit-learn's sample photographs as
  the training data, a D of 100 updates at lambda 0.5 against ``layer2`` and ``layer3``
  (16 units each), then 4 chains x 100 steps per unit;
- ``vit``: the zoo's ``digits-vit`` (a small vision transformer on the digits), three layers
  (the 10 class logits ``head``, a middle MLP hidden layer ``blocks.1.mlp.1`` and the last block's
  output ``blocks``, token mean), 16 units each (10 for ``head``), 8 chains x 300
  steps, a D of 200 updates at lambda 0.5 against them.

Per layer and row: the two-sample accuracy of the final samples against the real training images
(``two_sample_test``) and the HF ratio, each with the units' own top exemplars beside it (the
floor), the number of chains frozen and saturated (the manifest's definitions, ``score_result``),
and the median activation ratio (chains' mean final activation / the unit's best real image).

With ``--walk``: one row, ``method="walk"`` on a score prior trained on the real training images (no
D; docs/method.md, "Walks on a score prior"). With ``--ladder``: today's row only, with the activation ladder (1.5x, 2x; docs/method.md, "The
activation ladder"), and per layer the share of chains whose activation rose over the run (final >
start), the share that reached each rung, and each rung's two-sample accuracy and HF ratio.

    .venv/bin/python docs/scripts/realism_beyond.py photos64 vit [--ladder | --walk] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

import ldam_sweep as ls
from ldam_sweep.data import digits, photo_crops
from ldam_sweep.objectives import DEFAULT_BY_KIND
from ldam_sweep.sampling.discriminator import train_discriminator
from ldam_sweep.sampling.exemplars import top_exemplars
from ldam_sweep.sampling.precondition import fit_preconditioner
from ldam_sweep.sampling.realism import hf_energy, two_sample_test
from ldam_sweep.sampling.scoring import score_result
from ldam_sweep.settings import REVISION_2_LDAM

ROWS = [("revision 2", dict(REVISION_2_LDAM)), ("today", {})]


def setting(name: str):
    """(model, train images, held-out images, [(layer, units)], chains, steps, D updates)."""
    if name == "photos64":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ls.RandomWeightsWarning)
            model = ls.load_model({"torchvision": "resnet18", "input": {
                "channels": 3, "height": 64, "width": 64, "range": [0, 1],
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}, device="cpu")
        train, test = photo_crops(model.input, 300, "train"), photo_crops(model.input, 64, "test")
        return model, train, test, [("layer2", np.arange(16)), ("layer3", np.arange(16))], 4, 100, 100
    if name == "vit":
        model = ls.load_model("digits-vit", device="cpu")
        layers = [(n, np.arange(min(16, model.layer(n).units))) for n in ("head", "blocks.1.mlp.1", "blocks")]
        return model, digits(28, "train")[0], digits(28, "test")[0], layers, 8, 300, 200
    raise SystemExit(f"unknown setting {name!r}: photos64 or vit")


def run(name: str, ladder: tuple[float, ...] = (), walk: bool = False) -> dict:
    model, train, test, targets, chains, steps, updates = setting(name)
    pre = fit_preconditioner(train)
    real_hf = float(hf_energy(train, model.input.range).mean())
    out = {}
    for row, options in ([("walk", {"method": "walk"})] if walk else ROWS[-1:] if ladder else ROWS):
        t0 = time.perf_counter()
        if walk:  # the score prior instead of D (docs/method.md, "Walks on a score prior")
            prior = ls.train_score_prior(train, box=model.input.range)
            print(f"{name} / walk: score prior {prior.record['seconds']:.0f}s", flush=True)
            per_layer = {"prior_seconds": prior.record["seconds"]}
            extra = {"prior": prior, "lam": 0.0}
        else:
            d = train_discriminator(model, targets, train, test, {"updates": updates, "lam": 0.5, "sampler": options})
            print(f"{name} / {row}: D {time.perf_counter() - t0:.0f}s, held-out accuracy {d.heldout_accuracy:.3f}",
                  flush=True)
            per_layer = {"d_seconds": time.perf_counter() - t0, "d_heldout_accuracy": d.heldout_accuracy}
            extra = {"lam": 0.5, "discriminator": d.module, "preconditioner": pre, "ladder": ladder}
        for layer, units in targets:
            objective = DEFAULT_BY_KIND[model.layer(layer).kind]
            ex, exv = top_exemplars(model, layer, units, objective, torch.from_numpy(train), 64)
            t1 = time.perf_counter()
            res = ls.sample(model, layer, units, chains=chains, steps=steps, exemplars=ex, objective=objective,
                            snapshot_every=max(1, steps // 10), **extra, **options)
            secs = time.perf_counter() - t1
            scores = score_result(model, res, real_pool=test, exemplar_max=exv[:, 0], exemplars=ex[:, :8],
                                  real_hf=real_hf)
            live = ~res.dead
            fake = res.final_samples[live].reshape(-1, *model.input.shape)
            floor = ex[live][:, :chains].reshape(-1, *model.input.shape)
            ratio = res.final_activation[live].mean(1) / exv[live, 0]
            m = {
                "two_sample": two_sample_test(fake, train, value_range=model.input.range).accuracy,
                "two_sample_exemplars": two_sample_test(floor, train, value_range=model.input.range).accuracy,
                "hf": float(hf_energy(fake, model.input.range).mean()) / real_hf,
                "hf_exemplars": float(hf_energy(floor, model.input.range).mean()) / real_hf,
                "frozen": int(round(sum(s["frozen_fraction"] * chains for s in scores.values()))),
                "saturated": int(round(sum(s["saturated_fraction"] * chains for s in scores.values()))),
                "chains": int(live.sum()) * chains,
                "activation_ratio_median": float(np.median(ratio[exv[live, 0] > 0])),
                "sample_seconds": secs,
            }
            act = res.activation[live]
            m["rose"] = float((act[:, :, -1] > act[:, :, 0]).mean())
            m["move"] = float(np.median(np.sqrt(((res.final_samples[live] - res.starts[live]) ** 2)
                                                .reshape(*act.shape[:2], -1).mean(-1))))
            if ladder:
                best = exv[live, 0][:, None]
                for r, f in enumerate(ladder):
                    x = res.rung_samples[live][:, :, r].reshape(-1, *model.input.shape)
                    m[f"rung_{f:g}"] = {
                        "reached": float((res.rung_activation[live][:, :, r] >= f * best * (1 - 1e-3))[best[:, 0] > 0].mean()),
                        "rose": float((res.rung_activation[live][:, :, r] > (act[:, :, -1] if r == 0 else
                                                                             res.rung_activation[live][:, :, r - 1])).mean()),
                        "two_sample": two_sample_test(x, train, value_range=model.input.range).accuracy,
                        "hf": float(hf_energy(x, model.input.range).mean()) / real_hf}
            per_layer[layer] = m
            print(f"  {layer}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()},
                                              default=str),
                  flush=True)
        out[row] = per_layer
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+", choices=["photos64", "vit"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--ladder", action="store_true", help="today's sampler with the ladder 1.5x, 2x")
    ap.add_argument("--walk", action="store_true", help="method walk on a score prior of the real images (no D)")
    args = ap.parse_args()
    results = {name: run(name, (1.5, 2.0) if args.ladder else (), args.walk) for name in args.settings}
    print("\n| setting | layer | sampler and D | two-sample (exemplars) | HF ÷ real (exemplars) | frozen | saturated | activation ÷ best real |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for row, per_layer in rows.items():
            for layer, m in per_layer.items():
                if not isinstance(m, dict):
                    continue
                print(f"| {name} | `{layer}` | {row} | {m['two_sample']:.2f} ({m['two_sample_exemplars']:.2f}) | "
                      f"{m['hf']:.2f} ({m['hf_exemplars']:.2f}) | {m['frozen']}/{m['chains']} | "
                      f"{m['saturated']}/{m['chains']} | {m['activation_ratio_median']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
