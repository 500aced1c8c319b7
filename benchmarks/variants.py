"""Layout and precision variants, with achieved TFLOP/s: ResNet-18 (random weights) at 224 px by
default, sampled at several depths with the model in float32 contiguous, float32 channels_last and
bf16 autocast + channels_last (chains, noise and update stay float32 in every variant).

For each variant and layer: chain-steps/s of ``ls.sample`` (lambda = 0), images/s of the bare
truncated forward + input-gradient backward, their ratio, and the achieved TFLOP/s (FLOPs of one
forward + input-gradient backward, counted with torch's FlopCounterMode, times chain-steps/s).
Speed-ups are against float32 contiguous in this run.

    python benchmarks/variants.py --device cuda                 # the GPU run (issue 8, item 5)
    python benchmarks/variants.py --quick                       # seconds on CPU; run by the test suite
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import ldam_sweep as ls
from hardware_limit import bare_images_per_s, sampler_chain_steps_per_s
from record import load_bench_model, report

VARIANTS = {
    "fp32": {"memory_format": "contiguous", "precision": "float32"},
    "fp32_channels_last": {"memory_format": "channels_last", "precision": "float32"},
    "bf16_channels_last": {"memory_format": "channels_last", "precision": "bf16"},
}


def flops_per_image_step(model: ls.ModelHandle, layer: str) -> float:
    """FLOPs of one truncated forward + input-gradient backward, per image."""
    x = torch.rand(2, *model.input.shape, device=model.device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(model.activations(x, layer).sum(), x)
    return counter.get_total_flops() / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--layers", default="layer1,layer2,layer3,layer4")
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "variants.json"))
    args = ap.parse_args()
    if args.quick:
        args.size, args.layers, args.units, args.chains, args.steps = 32, "layer1", 2, 2, 2
    layers = args.layers.split(",")
    rows = []
    dev = torch.device("cpu")
    for name, options in VARIANTS.items():
        model = load_bench_model(args.model, args.size, args.device, **options)
        dev = model.device
        for layer in layers:
            units = list(range(min(args.units, model.layer(layer).units)))
            t0 = time.perf_counter()
            bare, bare_work = bare_images_per_s(model, layer, units, args.chains, args.steps)
            rate, work = sampler_chain_steps_per_s(model, layer, units, args.chains, args.steps)
            flops = flops_per_image_step(model, layer)
            rows.append({"variant": name, "layer": layer, "batch": len(units) * args.chains,
                         "memory_format": model.memory_format, "precision": model.precision,
                         "sampler_chain_steps": work, "bare_image_steps": bare_work,
                         "sampler_chain_steps_per_s": rate, "bare_images_per_s": bare, "ratio": rate / bare,
                         "gflop_per_image_step": flops / 1e9, "sampler_tflops": flops * rate / 1e12,
                         "bare_tflops": flops * bare / 1e12, "seconds": time.perf_counter() - t0})
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = {r["layer"]: r["sampler_chain_steps_per_s"] for r in rows if r["variant"] == "fp32"}
    for r in rows:
        r["speedup_vs_fp32"] = r["sampler_chain_steps_per_s"] / base[r["layer"]]
    record = {
        "benchmark": "variants", "model": args.model, "size": args.size, "units": args.units, "chains": args.chains,
        "steps": args.steps, "device": str(dev), "machine": platform.machine()
        + (f", {torch.cuda.get_device_name(0)}" if dev.type == "cuda" else f", {torch.get_num_threads()} threads"),
        "torch": torch.__version__, "rows": rows,
        "best_sampler_tflops": max(r["sampler_tflops"] for r in rows),
        "best_speedup_vs_fp32": max(r["speedup_vs_fp32"] for r in rows),
    }
    print(f"{'variant':20s} {'layer':8s} {'chain-steps/s':>14s} {'vs bare':>8s} {'TFLOP/s':>8s} {'speed-up':>8s}")
    for r in rows:
        print(f"{r['variant']:20s} {r['layer']:8s} {r['sampler_chain_steps_per_s']:14.1f} {r['ratio']:8.2f} "
              f"{r['sampler_tflops']:8.3f} {r['speedup_vs_fp32']:8.2f}")
    report(f"{args.model} @{args.size}px on {record['device']}", record, ("best_sampler_tflops", "best_speedup_vs_fp32"),
           args.out)


if __name__ == "__main__":
    main()
