"""Is a score prior's own walk detectable? Its unguided annealed Langevin samples (the walk's update
with no activation push: docs/method.md, "Walks on a score prior") from 2,048 random training digits,
against all real digits: the small-CNN two-sample accuracy (0.5 = alike), HF, and the move from the
start. One JSON line per prior (``ls.train_score_prior`` keyword arguments) and walk setting:

    .venv/bin/python docs/scripts/prior_alone.py '{}' '{"steps": 16000, "hidden": 1024}' \
        '{"steps": 4000, "hidden": 512, "walks": [{}, {"denoise": true}]}'

Results of this session: docs/scripts/prior_alone.json."""
import json
import math
import sys
import time

import numpy as np
import torch

import ldam_sweep as ls
from ldam_sweep.data import digits
from ldam_sweep.sampling.realism import hf_energy, two_sample_test

torch.set_num_threads(2)
train = digits(28, "train")[0]
real = digits(28, "all")[0]

def walk(prior, x0, steps=300, levels=10, smax=0.3, smin=0.02, eps=0.05, seed=0, denoise=False):
    g = torch.Generator().manual_seed(seed)
    z = prior.coords(x0)
    z = z + smax * torch.randn(z.shape, generator=g)
    for t in range(1, steps):
        i = min(levels - 1, t * levels // steps)
        s = smax * (smin / smax) ** (i / max(levels - 1, 1))
        a = eps * s * s
        with torch.no_grad():
            z = z + a * prior.score(z, s) + math.sqrt(2 * a) * torch.randn(z.shape, generator=g)
            if t == steps - 1 and denoise:
                z = z - smin * prior(z, smin)
            x = prior.image(z).clamp_(0, 1)
            z = prior.coords(x)
    return x.numpy()

configs = [json.loads(a) for a in sys.argv[1:]] or [{}]
rng = np.random.default_rng(0)
x0 = torch.from_numpy(train[rng.choice(len(train), 2048)])
print("real starts", two_sample_test(x0.numpy(), real, max_images=2048).accuracy)
for cfg in configs:
  walks = cfg.pop("walks", [{}])
  t0 = time.perf_counter()
  prior = ls.train_score_prior(train, **cfg)
  tt = time.perf_counter() - t0

  for walkcfg in walks:
    x = walk(prior, x0, **walkcfg)
    ts = two_sample_test(x, real, max_images=2048).accuracy
    hf = float(hf_energy(x).mean() / hf_energy(real).mean())
    move = float(np.median(np.sqrt(((x - x0.numpy()) ** 2).reshape(len(x), -1).mean(1))))
    print(json.dumps({"cfg": cfg, "walk": walkcfg, "train_s": round(tt, 1), "loss": round(prior.record["final_loss"], 4),
                      "two_sample": round(ts, 3), "hf": round(hf, 3), "move": round(move, 3)}), flush=True)
