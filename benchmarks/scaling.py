"""Scaling tables: how the sampler's throughput moves with the knobs a sweep sets, all measured
in this run with ``ls.sample`` (lambda = 0, truncated forward, the handle's default memory format).

  units per block   chain-steps/s for blocks of 1..128 units at a fixed number of chains
  chains per unit   chain-steps/s and units/s for 1..32 chains per unit at a fixed block
  layer depth       seconds per image of a bare forward + input-gradient backward at each stage
                    of a ResNet-18, truncated at the layer vs the whole network (what truncation
                    saves grows the earlier the layer)
  input size        chain-steps/s and pixel-steps/s for 32..224 px at one layer
  vit depth         vit_b_16 (random weights): the same truncation table by encoder block, and
                    ls.sample's chain-steps/s at a block's MLP neurons against a bare truncated
                    forward + input-gradient backward of the same batch (the sampler's overhead)

    python benchmarks/scaling.py                    # digits-cnn conv2 + resnet18 (random weights)
    python benchmarks/scaling.py --device cuda      # the same on a GPU
    python benchmarks/scaling.py --quick            # seconds; run by the test suite
    python benchmarks/scaling.py --vit-only --vit-size 112   # only the ViT rows, at 112 px (default 224)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import ldam_sweep as ls
from ldam_sweep.objectives import unit_objective
from record import load_bench_model, sync

REPEATS = 2  # best of; --quick sets 1


def chain_steps_per_s(model: ls.ModelHandle, layer: str, units: int, chains: int, steps: int) -> float:
    us = list(range(min(units, model.layer(layer).units)))
    if len(us) < units:  # more units asked than the layer has: repeat units (same cost per chain)
        us = (us * (units // len(us) + 1))[:units]
    ls.sample(model, layer, us, chains=chains, steps=1)  # warm-up at this batch size
    best = float("inf")
    for _ in range(REPEATS):
        sync(model.device)
        t0 = time.perf_counter()
        ls.sample(model, layer, us, chains=chains, steps=steps)
        sync(model.device)
        best = min(best, time.perf_counter() - t0)
    return len(us) * chains * steps / best


def bare_s_per_image_step(model: ls.ModelHandle, layer: str, batch: int, steps: int, truncated: bool) -> float:
    """Seconds per image of a bare forward + input-gradient backward for the layer's objective,
    with the forward truncated at the layer (ours) or running the whole network (peer libraries)."""
    captured: list[torch.Tensor] = []
    info = model.layer(layer)
    idx = torch.zeros(batch, dtype=torch.long, device=model.device)
    x = torch.rand(batch, *model.input.shape, device=model.device, requires_grad=True)

    def act() -> torch.Tensor:
        if truncated:
            return model.activations(x, layer)
        captured.clear()
        model.forward(x)
        return captured[0].float()

    handle = None if truncated else dict(model.net.named_modules())[info.name].register_forward_hook(
        lambda _m, _i, out: captured.append(out))
    best = float("inf")
    try:
        torch.autograd.grad(unit_objective(act(), idx, info.default_objective).sum(), x)  # warm-up
        for _ in range(REPEATS):
            sync(model.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                torch.autograd.grad(unit_objective(act(), idx, info.default_objective).sum(), x)
            sync(model.device)
            best = min(best, time.perf_counter() - t0)
    finally:
        if handle is not None:
            handle.remove()
    return best / (steps * batch)


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n  " + " | ".join(f"{h:>14s}" for h in header))
    for row in rows:
        print("  " + " | ".join(f"{v:>14.4g}" if isinstance(v, float) else f"{v!s:>14s}" for v in row))


def cnn_tables(args, record: dict, q: bool, steps: int) -> None:
    digits = load_bench_model("digits-cnn", None, args.device)
    resnet = load_bench_model("torchvision:resnet18", 32 if q else 64, args.device)
    record["device"] = str(digits.device)
    record["machine"] = platform.machine() + (f", {torch.cuda.get_device_name(0)}" if digits.device.type == "cuda"
                                              else f", {torch.get_num_threads()} threads")

    blocks = [1, 4] if q else [1, 4, 16, 32, 64, 128] + ([256, 512] if digits.device.type == "cuda" else [])
    rows = []
    for model, layer, chains in ((digits, "conv2", 8), (resnet, "layer2", 4)):
        for u in blocks:
            rows.append([model.name.split(":")[-1], layer, u, chains, chain_steps_per_s(model, layer, u, chains, steps * 4 if model is digits else steps)])
    record["units_per_block"] = [dict(zip(("model", "layer", "units", "chains", "chain_steps_per_s"), r)) for r in rows]
    table("units per block (chain-steps/s)", ["model", "layer", "units", "chains", "chain-steps/s"], rows)

    chain_counts = [1, 8] if q else [1, 2, 4, 8, 16, 32]
    rows = []
    for c in chain_counts:
        r = chain_steps_per_s(digits, "conv2", 32 if not q else 2, c, steps * 4)
        rows.append(["digits-cnn", "conv2", 32 if not q else 2, c, r, r / c])
    record["chains_per_unit"] = [dict(zip(("model", "layer", "units", "chains", "chain_steps_per_s", "unit_steps_per_s"), r)) for r in rows]
    table("chains per unit", ["model", "layer", "units", "chains", "chain-steps/s", "unit-steps/s"], rows)

    layers = ["layer1", "layer2"] if q else ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    batch = 8 if q else 128
    rows = []
    for layer in layers:
        trunc = bare_s_per_image_step(resnet, layer, batch, steps, truncated=True)
        whole = bare_s_per_image_step(resnet, layer, batch, steps, truncated=False)
        rows.append(["resnet18", layer, trunc * 1e3, whole * 1e3, whole / trunc])
    record["layer_depth"] = [dict(zip(("model", "layer", "truncated_ms_per_image_step", "whole_network_ms_per_image_step",
                                       "truncation_gain"), r)) for r in rows]
    table(f"layer depth (resnet18 @{resnet.input.height} px, batch {batch})",
          ["model", "layer", "trunc ms/step", "whole ms/step", "gain"], rows)

    sizes = [32, 48] if q else [32, 64, 128, 224]
    rows = []
    for size in sizes:
        m = load_bench_model("torchvision:resnet18", size, args.device)
        b = 8 if q else max(8, 128 * 64 * 64 // (size * size))
        r = chain_steps_per_s(m, "layer2", b // 4, 4, steps)
        rows.append(["resnet18", "layer2", size, b, r, r * size * size / 1e6])
    record["input_size"] = [dict(zip(("model", "layer", "size", "batch", "chain_steps_per_s", "mpixel_steps_per_s"), r)) for r in rows]
    table("input size (layer2)", ["model", "layer", "px", "batch", "chain-steps/s", "Mpixel-steps/s"], rows)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vit-size", type=int, default=224, help="input size of the vit_b_16 rows")
    ap.add_argument("--vit-batch", type=int, default=8, help="images per batch in the vit_b_16 rows")
    ap.add_argument("--vit-only", action="store_true", help="only the vit_b_16 rows")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling.json"))
    args = ap.parse_args()
    global REPEATS
    q = args.quick
    steps = 1 if q else args.steps
    REPEATS = 1 if q else REPEATS
    record: dict = {"benchmark": "scaling", "steps": steps}

    if not args.vit_only:
        cnn_tables(args, record, q, steps)
    vit_size = 32 if q else args.vit_size
    vit = load_bench_model("torchvision:vit_b_16", vit_size, args.device)
    record.setdefault("device", str(vit.device))
    record.setdefault("machine", platform.machine() + (f", {torch.cuda.get_device_name(0)}" if vit.device.type == "cuda"
                                                       else f", {torch.get_num_threads()} threads"))
    blocks = [0, 11] if q else [0, 3, 6, 9, 11]
    batch = 2 if q else args.vit_batch
    rows = []
    for b in blocks:
        layer = f"encoder.layers.encoder_layer_{b}"
        if b == 11:
            layer = vit.layer(layer).name  # block 11's output is the encoder stage's (an alias)
        trunc = bare_s_per_image_step(vit, layer, batch, steps, truncated=True)
        whole = bare_s_per_image_step(vit, layer, batch, steps, truncated=False)
        rows.append(["vit_b_16", f"block {b}", trunc * 1e3, whole * 1e3, whole / trunc])
    record["vit_depth"] = [dict(zip(("model", "block", "truncated_ms_per_image_step", "whole_network_ms_per_image_step",
                                     "truncation_gain"), r)) for r in rows]
    table(f"vit depth (vit_b_16 @{vit_size} px, batch {batch})", ["model", "block", "trunc ms/step", "whole ms/step", "gain"], rows)
    mid = "encoder.layers.encoder_layer_5.mlp.1"
    chains = 2
    sampler = chain_steps_per_s(vit, mid, batch // chains, chains, steps * 5)  # amortise the per-call probe and final pass
    bare = 1.0 / bare_s_per_image_step(vit, mid, batch, steps, truncated=True)
    record["vit_sampler"] = {"model": "vit_b_16", "size": vit_size, "layer": mid, "batch": batch,
                             "chain_steps_per_s": sampler, "bare_image_steps_per_s": bare, "ratio": sampler / bare}
    table(f"vit sampler vs bare forward+backward (block 5 MLP neurons, batch {batch})",
          ["model", "chain-steps/s", "bare steps/s", "ratio"], [["vit_b_16", sampler, bare, sampler / bare]])

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
