"""Vision transformers at full size: do the MLP neurons of a middle block of vit_b_16 @224 px
(random weights) climb under ls.sample, and what does it cost? Also digits-vit's training record.

  climbed    fraction of chains whose final activation beats the best start among its unit's chains
  seconds    wall time of the ls.sample call (units x chains x steps chain-steps)

    python benchmarks/vit.py                    # 8 units x 2 chains x 20 steps on the CPU
    python benchmarks/vit.py --device cuda --units 64 --chains 8 --steps 100
    python benchmarks/vit.py --quick            # 32 px, 2 units x 2 chains x 3 steps, no digits-vit: seconds
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

import ldam_sweep as ls
from record import chain_steps_done, load_bench_model, report, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--layer", default="encoder.layers.encoder_layer_5.mlp.1")
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vit.json"))
    args = ap.parse_args()
    size = 32 if args.quick else args.size
    if args.quick:
        args.units, args.chains, args.steps = 2, 2, 3
    model = load_bench_model("torchvision:vit_b_16", size, args.device)
    n = model.layer(args.layer).units
    units = np.linspace(0, n - 1, args.units).astype(int)
    sync(model.device)
    t0 = time.perf_counter()
    res = ls.sample(model, args.layer, units, chains=args.chains, steps=args.steps, seed=0)
    sync(model.device)
    seconds = time.perf_counter() - t0
    a = res.activation
    climbed = float((a[:, :, -1] > a[:, :, 0].max(axis=1, keepdims=True)).mean())
    metrics = {} if args.quick else ls.load_model("digits-vit", device="cpu").metadata["train_metrics"]
    record = {
        "benchmark": "vit", "device": str(model.device),
        "machine": platform.machine() + (f", {torch.cuda.get_device_name(0)}" if model.device.type == "cuda"
                                         else f", {torch.get_num_threads()} threads"),
        "model": "vit_b_16 (random weights)", "size": size, "layer": args.layer, "units": len(units),
        "chains": args.chains, "steps": args.steps, "chain_steps": chain_steps_done(res),
        "climbed": climbed, "mean_start_activation": float(a[:, :, 0].mean()),
        "mean_final_activation": float(a[:, :, -1].mean()), "seconds": seconds,
        "chain_steps_per_s": chain_steps_done(res) / seconds,
        "digits_vit_test_accuracy": metrics.get("test_accuracy"), "digits_vit_train_seconds": metrics.get("train_seconds"),
    }
    report(f"vit_b_16 @{size} px, {args.layer}: {len(units)} units x {args.chains} chains x {args.steps} steps",
           record, ["climbed", "mean_start_activation", "mean_final_activation", "seconds", "chain_steps_per_s",
                    *([] if args.quick else ["digits_vit_test_accuracy", "digits_vit_train_seconds"])], args.out)


if __name__ == "__main__":
    main()
