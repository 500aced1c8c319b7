"""Sampler vs a peer library: units per second for one layer against torch-lucent, the PyTorch port
of lucid, with the same model (one module object), the same images per unit and the same steps.

  ours        ``ls.sample``: a block of units x chains in one batch, forward truncated at the layer,
              weights frozen (what a sweep's worker runs; lambda = 0, no discriminator)
  lucent (a)  as users run it: ``render_vis(model, "layer:n", param.image(size, batch=k))`` per unit,
              i.e. its defaults: FFT + decorrelated image, the standard transforms, upsampling to 224
  lucent (b)  its fastest honest settings: pixel image at ``size`` (no FFT, no decorrelation, no
              transforms, no upsampling), frozen weights, and the units of a block batched the way its
              docs show (one ``objectives.channel(layer, n, batch=i)`` per image, summed); timed with
              the model in both memory layouts (contiguous, channels_last) and the faster one kept

Lucent runs the whole network every step and hooks every module; its ``render_vis`` never removes
its hooks, so here they are removed after each call (in lucent's favour). lucent (a) is timed on
``--a-units`` units and its rate extrapolated (its units are independent calls); ours and (b) on
every unit asked for. torch-lucent is in the optional ``bench`` extra (``pip install -e .[bench]``).

    python benchmarks/peers.py                    # resnet18 (random weights) @64 px, layer2, 128 units x 4 images x 32 steps
    python benchmarks/peers.py --device cuda --units 512 --layer layer3
    python benchmarks/peers.py --quick            # seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import torch

import ldam_sweep as ls
from record import chain_steps_done, load_bench_model, report, sync


def import_lucent():
    """lucent's modules, with the two aliases it needs under kornia >= 0.5 (functions that moved
    to ``kornia.geometry.transform``); torch-lucent 0.1.8's own pin installs kornia 0.4.1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kornia 0.4.1 calls the deprecated torch.jit.script at import
        try:
            import kornia
            import lucent  # noqa: F401
        except ImportError as err:
            raise SystemExit("torch-lucent is not installed: pip install -e '.[bench]'") from err
        for name in ("get_rotation_matrix2d", "warp_affine"):
            if not hasattr(kornia, name):
                import kornia.geometry.transform as kgt

                setattr(kornia, name, getattr(kgt, name))
        from lucent.optvis import objectives, param, render
    return objectives, param, render



def _unhook(net: torch.nn.Module) -> None:
    for m in net.modules():
        m._forward_hooks.clear()


def time_ours(model: ls.ModelHandle, layer: str, units: list[int], images: int, steps: int, block: int) -> tuple[float, int]:
    """Seconds for every unit, and the image-steps really run."""
    ls.sample(model, layer, units[:block], chains=images, steps=2)  # warm-up
    sync(model.device)
    t0 = time.perf_counter()
    results = [ls.sample(model, layer, units[i : i + block], chains=images, steps=steps) for i in range(0, len(units), block)]
    sync(model.device)
    return time.perf_counter() - t0, sum(chain_steps_done(r) for r in results)


def time_lucent(lucent, net: torch.nn.Module, layer: str, units: list[int], images: int, steps: int, size: int,
                block: int | None) -> tuple[float, int]:
    """block None: lucent (a), one render_vis per unit with its defaults; else lucent (b).
    Returns the seconds and the image-steps rendered (images returned x steps)."""
    objectives, param, render = lucent
    lname = layer.replace(".", "_")

    def one(part: list[int]) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if block is None:
                out = render.render_vis(net, f"{lname}:{part[0]}", param_f=lambda: param.image(size, batch=images),
                                  thresholds=(steps,), show_image=False, progress=False)
            else:
                obj = objectives.Objective.sum(
                    [objectives.channel(lname, u, batch=i * images + c) for i, u in enumerate(part) for c in range(images)])
                out = render.render_vis(net, obj, param_f=lambda: param.image(size, batch=len(part) * images, fft=False,
                                                                        decorrelate=False),
                                  transforms=[], fixed_image_size=size, thresholds=(steps,), show_image=False,
                                  progress=False)
        _unhook(net)
        return len(out[-1]) * steps

    step = 1 if block is None else block
    one(units[:step])  # warm-up
    sync(next(net.parameters()).device)
    t0 = time.perf_counter()
    done = sum(one(units[i : i + step]) for i in range(0, len(units), step))
    sync(next(net.parameters()).device)
    return time.perf_counter() - t0, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--layer", default="layer2")
    ap.add_argument("--units", type=int, default=128, help="units of the layer timed for ours and lucent (b)")
    ap.add_argument("--a-units", type=int, default=4, help="units timed for lucent (a); its rate is per unit")
    ap.add_argument("--images", type=int, default=4, help="images (chains) per unit, both tools")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--block", type=int, default=32, help="units per batch (ours and lucent (b))")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "peers.json"))
    args = ap.parse_args()
    if args.quick:
        args.units, args.a_units, args.images, args.steps, args.block = 4, 1, 2, 2, 4
    lucent = import_lucent()
    model = load_bench_model(args.model, args.size, args.device)
    units = list(range(min(args.units, model.layer(args.layer).units)))
    a_units = units[: max(1, min(args.a_units, len(units)))]
    net = model.net.to(memory_format=torch.contiguous_format)  # lucent (a) as users run it: default layout,
    for p in net.parameters():  # and weights trainable
        p.requires_grad_(True)
    t_a, work_a = time_lucent(lucent, net, args.layer, a_units, args.images, args.steps, args.size, None)
    for p in net.parameters():
        p.requires_grad_(False)
    t_b, work_b = {}, {}  # lucent (b) in both memory layouts; its best counts
    for fmt in (torch.contiguous_format, torch.channels_last):
        net.to(memory_format=fmt)
        layout = str(fmt).split(".")[-1]
        t_b[layout], work_b[layout] = time_lucent(lucent, net, args.layer, units, args.images, args.steps, args.size,
                                                  args.block)
    net.to(memory_format=model._format)
    t_ours, work_ours = time_ours(model, args.layer, units, args.images, args.steps, args.block)
    ours, a, b = len(units) / t_ours, len(a_units) / t_a, len(units) / min(t_b.values())
    record = {
        "benchmark": "peers", "peer": "torch-lucent 0.1.8", "model": model.name, "size": args.size, "layer": args.layer,
        "units": len(units), "a_units": len(a_units), "images_per_unit": args.images, "steps": args.steps,
        "block": args.block, "device": str(model.device), "machine": platform.machine()
        + (f", {torch.cuda.get_device_name(0)}" if model.device.type == "cuda" else f", {torch.get_num_threads()} threads"),
        "ours_image_steps": work_ours, "lucent_defaults_image_steps": work_a,
        "lucent_fastest_image_steps_by_layout": work_b,
        "ours_units_per_s": ours, "lucent_defaults_units_per_s": a, "lucent_fastest_units_per_s": b,
        "lucent_fastest_units_per_s_by_layout": {k: len(units) / v for k, v in t_b.items()},
        "ours_memory_format": model.memory_format, "ratio_vs_lucent_defaults": ours / a, "ratio_vs_lucent_fastest": ours / b,
        "ours_image_steps_per_s": ours * args.images * args.steps,
    }
    report(f"{model.name} @{args.size}px {args.layer}: {len(units)} units x {args.images} images x {args.steps} steps "
           f"on {record['device']}", record,
           ("ours_units_per_s", "lucent_defaults_units_per_s", "lucent_fastest_units_per_s", "ratio_vs_lucent_defaults",
            "ratio_vs_lucent_fastest"), args.out)


if __name__ == "__main__":
    main()
