"""Sampler vs the hardware's limit: chain-steps/s of ``ls.sample`` divided by images/s of a bare
forward + input-gradient backward of the same truncated model at the same batch size (no noise,
no update, no traces). Both measured here, in this run, interleaved; medians of the repeats. lambda = 0, and lambda = 0.5 with a
discriminator (whose forward/backward the bare loop does not pay: that ratio shows D's cost).
A call's time is a fixed cost (set-up, the results' transfer to the host) plus a cost per step:
timing steps = S and 2S gives fixed = 2 t(S) - t(2S) and the steady-state ratio (per step only).
The step breakdown times the parts of one ``ldam`` step on their own at the same batch: the bare
forward+backward, the per-chain noise, and the rest of the update rule (RMS normalisation,
momentum, clip; with and without the chains' repulsion). Noise + update is the most that fusing
the element-wise work (torch.compile, CUDA graphs) could win per step.

    python benchmarks/hardware_limit.py                       # digits-cnn conv2, 32 units x 8 chains
    python benchmarks/hardware_limit.py --device cuda --model torchvision:resnet18 --size 224 --layer layer3
    python benchmarks/hardware_limit.py --quick               # seconds; run by the test suite
    python benchmarks/hardware_limit.py --baseline '{"repel": 0, "eps": 1e-8, "eps_rel": 0}'
        # also lambda = 0.5 with these sampler options, interleaved: the default's cost per step over them
    python benchmarks/hardware_limit.py --data --baseline revision2
        # the lambda = 0.5 runs as a sweep with data runs them (exemplar starts, the data preconditioner,
        # the activation target; digits for a 1x28x28 model, else photo crops), beside revision 2's defaults
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import ldam_sweep as ls
from ldam_sweep.sampling.discriminator import Discriminator, discriminator_config
from ldam_sweep.objectives import unit_objective
from ldam_sweep.sampling import noise
from ldam_sweep.sampling.langevin import LdamRule, Step
from ldam_sweep.settings import LdamOptions
from record import chain_steps_done, load_bench_model, report, sync



def bare_images_per_s(model: ls.ModelHandle, layer: str, units: list[int], chains: int, steps: int) -> tuple[float, int]:
    """Images per second of a bare truncated forward + input-gradient backward, and the image-steps run."""
    idx = torch.tensor(units, device=model.device).repeat_interleave(chains)
    objective = model.layer(layer).default_objective
    x = torch.rand(len(idx), *model.input.shape, device=model.device, requires_grad=True)
    torch.autograd.grad(unit_objective(model.activations(x, layer), idx, objective).sum(), x)  # warm-up
    sync(model.device)
    done = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        a = unit_objective(model.activations(x, layer), idx, objective)
        torch.autograd.grad(a.sum(), x)
        done += a.numel()
    sync(model.device)
    return done / (time.perf_counter() - t0), done


def real_data(model: ls.ModelHandle, layer: str, units: list[int]) -> dict:
    """What a sweep with data hands ``ls.sample``: the units' top real exemplars and the preconditioner."""
    from ldam_sweep.data import digits, photo_crops
    from ldam_sweep.objectives import DEFAULT_BY_KIND
    from ldam_sweep.sampling.exemplars import top_exemplars
    from ldam_sweep.sampling.precondition import fit_preconditioner

    shape = tuple(model.input.shape)
    pool = digits(28, "train")[0] if shape == (1, 28, 28) else photo_crops(model.input, 300, "train")
    ex, _ = top_exemplars(model, layer, units, DEFAULT_BY_KIND[model.layer(layer).kind], torch.from_numpy(pool), 64)
    return {"exemplars": ex, "preconditioner": fit_preconditioner(pool, device=model.device)}


def sampler_seconds(model: ls.ModelHandle, layer: str, units: list[int], chains: int, steps: int,
                    **kw) -> tuple[float, int]:
    """Wall time of one ``ls.sample`` call (host transfer of the results included), and the
    chain-steps it ran."""
    ls.sample(model, layer, units, chains=chains, steps=2, **kw)  # warm-up
    sync(model.device)
    t0 = time.perf_counter()
    result = ls.sample(model, layer, units, chains=chains, steps=steps, **kw)
    sync(model.device)
    return time.perf_counter() - t0, chain_steps_done(result)


def sampler_chain_steps_per_s(model: ls.ModelHandle, layer: str, units: list[int], chains: int, steps: int,
                              **kw) -> tuple[float, int]:
    """Chain-steps per second of ``ls.sample`` on one block, and the chain-steps it ran."""
    seconds, work = sampler_seconds(model, layer, units, chains, steps, **kw)
    return work / seconds, work


def step_breakdown_ms(model: ls.ModelHandle, layer: str, units: list[int], chains: int, steps: int) -> dict:
    """Milliseconds per step of the parts of one ``ldam`` step at this batch, each timed alone
    (``steps`` calls, after one warm-up): the per-chain noise (as the sampler draws it), and the update rule without the noise
    (gradients given; one copy of the gradient included) at a step with the repulsion on and at one
    after it is off."""
    b = len(units) * chains
    shape = tuple(model.input.shape)
    keys = noise.chain_keys(0, layer, units, chains).to(model.device)
    x = torch.rand(b, *shape, device=model.device)
    g = torch.randn_like(x)
    xi = noise.normal(keys, 1, shape)

    def timed(fn) -> float:
        fn(0)
        sync(model.device)
        t0 = time.perf_counter()
        for t in range(steps):
            fn(t)
        sync(model.device)
        return (time.perf_counter() - t0) / steps * 1e3

    rule = LdamRule(LdamOptions())
    rule.init(x)

    def update(t: int, repel: bool) -> None:
        # the rule with its gradients and noise handed in (a copy: the rule updates them in place)
        s = Step(t=0 if repel else steps, x=x, activation=x, log_d=None, lam=0.0, box=model.input.range, chains=chains,
                 unit_context=None, keys=keys, draw=t + 1, steps=steps, _grads=(g.clone(), None))
        s.noise = lambda: xi  # type: ignore[method-assign]
        rule.step(s)

    stream = noise.NormalStream(keys, shape, last_draw=steps + 1)  # as the sampler draws it (several hashed at once)
    return {"noise_ms": timed(lambda t: stream(t + 1)),
            "update_ms_repulsion_on": timed(lambda t: update(t, True)),
            "update_ms_repulsion_off": timed(lambda t: update(t, False))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--layer", default="conv2")
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians reported")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline", default=None, help="sampler options (JSON, or 'revision2') to time at lambda = 0.5 "
                    "beside the default")
    ap.add_argument("--data", action="store_true", help="lambda = 0.5 runs with real data: exemplars and preconditioner")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hardware_limit.json"))
    args = ap.parse_args()
    if args.quick:
        args.units, args.chains, args.steps, args.repeats = 4, 4, 3, 1
        args.size = min(args.size, 32) if args.size else None
    model = load_bench_model(args.model, args.size, args.device)
    units = list(range(min(args.units, model.layer(args.layer).units)))
    d = Discriminator(discriminator_config(model.input)).to(model.device).eval()
    baseline = None
    if args.baseline:
        from ldam_sweep.settings import REVISION_2_LDAM

        baseline = dict(REVISION_2_LDAM) if args.baseline == "revision2" else json.loads(args.baseline)
    data = real_data(model, args.layer, units) if args.data else {}
    runs = []
    for _ in range(args.repeats):  # interleaved: the runs in each repeat see the same machine state
        t1, work1 = sampler_seconds(model, args.layer, units, args.chains, args.steps)
        t2, _ = sampler_seconds(model, args.layer, units, args.chains, 2 * args.steps)
        run = (bare_images_per_s(model, args.layer, units, args.chains, args.steps),
               (work1 / t1, work1),
               sampler_chain_steps_per_s(model, args.layer, units, args.chains, args.steps, lam=0.5, discriminator=d,
                                         **data),
               (2 * t1 - t2, 0), (t2 - t1, 0))
        if baseline is not None:
            run += (sampler_chain_steps_per_s(model, args.layer, units, args.chains, args.steps, lam=0.5,
                                              discriminator=d, **data, **baseline),)
        runs.append(run)
    work = {k: {n for _, n in col} for k, col in zip(("bare", "lam0", "lam05"), zip(*runs))}
    runs = [tuple(rate for rate, _ in run) for run in runs]
    bare, lam0, lam5, fixed, per_s_steps = (statistics.median(col) for col in list(zip(*runs))[:5])
    # per call = fixed + steps * per step: t(S) and t(2S) separate the two
    # (NaN when the box's noise exceeds the extra steps' time: t(2S) <= t(S))
    steady = statistics.median(len(units) * args.chains * args.steps / r[4] / r[0] if r[4] > 0 else float("nan")
                               for r in runs)
    record = {
        "benchmark": "hardware_limit", "model": model.name, "layer": args.layer, "units": len(units), "chains": args.chains,
        "steps": args.steps, "repeats": args.repeats, "lam05_with_data": bool(args.data), "memory_format": model.memory_format, "device": str(model.device), "machine": platform.machine()
        + (f", {torch.cuda.get_device_name(0)}" if model.device.type == "cuda" else f", {torch.get_num_threads()} threads"),
        "bare_image_steps": sorted(work["bare"]), "sampler_lam0_chain_steps": sorted(work["lam0"]),
        "sampler_lam05_chain_steps": sorted(work["lam05"]),
        "bare_images_per_s": bare, "sampler_lam0_chain_steps_per_s": lam0, "sampler_lam05_chain_steps_per_s": lam5,
        "ratio_lam0": statistics.median(r[1] / r[0] for r in runs),
        "ratio_lam05": statistics.median(r[2] / r[0] for r in runs),
        "sampler_fixed_seconds_per_call": fixed, "sampler_seconds_per_step": per_s_steps / args.steps,
        "ratio_lam0_steady": steady,
    }
    parts = step_breakdown_ms(model, args.layer, units, args.chains, args.steps)
    bare_ms = len(units) * args.chains / bare * 1e3
    record.update({"step_bare_forward_backward_ms": bare_ms, **{f"step_{k}": v for k, v in parts.items()},
                   "step_noise_update_share": (parts["noise_ms"] + parts["update_ms_repulsion_off"])
                   / (bare_ms + parts["noise_ms"] + parts["update_ms_repulsion_off"])})
    keys = ["bare_images_per_s", "sampler_lam0_chain_steps_per_s", "sampler_lam05_chain_steps_per_s", "ratio_lam0",
            "ratio_lam05", "ratio_lam0_steady", "sampler_fixed_seconds_per_call", "sampler_seconds_per_step",
            "step_bare_forward_backward_ms", "step_noise_ms", "step_update_ms_repulsion_on", "step_update_ms_repulsion_off",
            "step_noise_update_share"]
    if baseline is not None:
        # time per step of the default over the baseline's, each repeat's pair measured back to back
        record.update({"baseline_options": baseline, "baseline_lam05_chain_steps_per_s": statistics.median(r[5] for r in runs),
                       "cost_per_step_vs_baseline_lam05": statistics.median(r[5] / r[2] for r in runs)})
        keys += ["baseline_lam05_chain_steps_per_s", "cost_per_step_vs_baseline_lam05"]
    report(f"{model.name} {args.layer}: {len(units)} units x {args.chains} chains on {record['device']}", record,
           tuple(keys), args.out, fmt="10.4f")


if __name__ == "__main__":
    main()
