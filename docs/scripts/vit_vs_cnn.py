"""The 10 class logits of the two digits models side by side: digits-cnn (LeNet-style) and
digits-vit (a small vision transformer), each with its own discriminator (200 updates at
lambda = 0.5, trained against that model's chains), sampled at lambda = 0.5 with the default
sampler (8 chains, 300 steps, starts from each class's top real exemplars). Prints, per model,
argmax kept (the fraction of chains the model still classifies as the target class) and nearest
real (mean RMS distance from a final sample to its nearest held-out digit), and writes
docs/images/vit_vs_cnn.png: one row per class, 4 chains of digits-cnn, then 4 of digits-vit.

    .venv/bin/python docs/scripts/vit_vs_cnn.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

import ldam_sweep as ls
from ldam_sweep.render import save_grid
from ldam_sweep.data import digits
from ldam_sweep.sampling.chains import SAMPLING_EXEMPLARS
from ldam_sweep.sampling.discriminator import train_discriminator
from ldam_sweep.sampling.exemplars import top_exemplars
from lambda_tradeoff import nearest_real_rms  # this folder's scripts share it

ROOT = Path(__file__).resolve().parents[2]
SHOWN = 4  # chains per model in the figure


def main() -> None:
    train = digits(28, "train")[0]
    test = digits(28, "test")[0]
    finals, record = {}, {}
    for name, layer in (("digits-cnn", "fc2"), ("digits-vit", "head")):
        t0 = time.perf_counter()
        model = ls.load_model(name, device="cpu")
        d = train_discriminator(model, [(layer, range(10))], train, test, {"updates": 200, "lam": 0.5})
        ex, _ = top_exemplars(model, layer, np.arange(10), model.layer(layer).default_objective,
                              torch.from_numpy(train), SAMPLING_EXEMPLARS)
        res = ls.sample(model, layer, range(10), chains=8, steps=300, lam=0.5, discriminator=d.module, exemplars=ex)
        with torch.no_grad():
            pred = model.forward(torch.from_numpy(res.final_samples.reshape(-1, 1, 28, 28))).argmax(1).numpy()
        record[name] = {"argmax_kept": float((pred.reshape(10, -1) == np.arange(10)[:, None]).mean()),
                        "nearest_real_rms": nearest_real_rms(res.final_samples, test),
                        "d_heldout_accuracy": d.heldout_accuracy, "seconds": time.perf_counter() - t0}
        finals[name] = res.final_samples[:, :SHOWN]
        print(name, json.dumps(record[name]))
    grid = np.concatenate([finals["digits-cnn"], finals["digits-vit"]], axis=1)  # (10, 2 * SHOWN, 1, 28, 28)
    out = save_grid(ROOT / "docs" / "images" / "vit_vs_cnn.png", grid, (0.0, 1.0),
                    row_labels=[f"class {c}" for c in range(10)],
                    col_labels=["digits-cnn"] + [""] * (SHOWN - 1) + ["digits-vit"] + [""] * (SHOWN - 1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
