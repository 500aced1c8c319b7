"""The GAN-style discriminator: a learned realism prior, log D(x) = log P(real | x).

Stage 1 (``train_discriminator``) trains D adversarially against persistent Langevin chains on the
units to be swept: alternate a block of Langevin steps with one D update on a batch that is half
chain samples (fake) and half real images (real); chains are re-initialised every few updates so
D also sees young chains. Stage 2 freezes D: every unit of a sweep sees the same prior.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldam_sweep.errors import LdamError
from ldam_sweep.model.handle import ModelHandle, state_digest
from ldam_sweep.objectives import objective_for, unit_objective
from ldam_sweep.sampling import noise
from ldam_sweep.sampling.langevin import run_chains
from ldam_sweep.progressbar import progress_bar
from ldam_sweep.settings import WEAK_DISCRIMINATOR, DiscriminatorSettings, parse_options

SMALL_MAX_SIDE = 32
FORMAT = "ldam-sweep-discriminator-v1"


class DiscriminatorError(LdamError):
    """A discriminator file cannot be used (unreadable, or made for another input shape)."""


class DiscriminatorModelWarning(UserWarning):
    """A discriminator was trained against a different model than the one it is used with."""


class SmallDiscriminator(nn.Module):
    """For inputs up to ~32 px: two strided 5x5 convs (16, 32 channels, leaky ReLU) + linear."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Conv2d(16, 32, 5, stride=2, padding=2), nn.LeakyReLU(0.2), nn.Flatten(),
        )
        self.head = nn.Linear(32 * math.ceil(height / 4) * math.ceil(width / 4), 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(z)).squeeze(1)


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.2)), 0.2))


class ResidualDiscriminator(nn.Module):
    """For larger inputs: a stem conv, then (residual block + strided conv) stages down to <= 4 px,
    global average pooling and a linear head. No batch norm: D sees mixed real/fake batches.

    ``stem_stride`` 2 (inputs above 32 px) halves the resolution before the first residual block:
    at 64 px that makes D ~5x cheaper (the full-resolution block dominated its cost, and D's
    forward/backward runs every step at lambda > 0; benchmarks/README.md). Checkpoints saved
    without the key were built with stride 1 and load as such."""

    def __init__(self, channels: int, height: int, width: int, base: int = 32, max_channels: int = 256,
                 stem_stride: int = 1) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise DiscriminatorError(f"residual discriminator stem_stride must be 1 or 2, got {stem_stride!r}")
        side = max(height, width)
        if stem_stride == 2:
            layers: list[nn.Module] = [nn.Conv2d(channels, base, 4, stride=2, padding=1)]
            side = (side + 1) // 2
        else:
            layers = [nn.Conv2d(channels, base, 3, padding=1)]
        ch = base
        while side > 4:
            nxt = min(ch * 2, max_channels)
            layers += [_ResBlock(ch), nn.LeakyReLU(0.2), nn.Conv2d(ch, nxt, 4, stride=2, padding=1)]
            ch, side = nxt, (side + 1) // 2
        self.features = nn.Sequential(*layers, nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(ch, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(z)).squeeze(1)


class Discriminator(nn.Module):
    """log D(x) for pixel-space images x (B, C, H, W) -> (B,). ``logits(x)``: the raw real/fake logit."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        c, h, w = config["channels"], config["height"], config["width"]
        self.lo, self.hi = (float(v) for v in config["range"])
        arch = config["arch"]
        if arch == "small":
            self.net: nn.Module = SmallDiscriminator(c, h, w)
        elif arch == "residual":
            self.net = ResidualDiscriminator(c, h, w, stem_stride=int(config.get("stem_stride", 1)))
        else:
            raise DiscriminatorError(f"unknown discriminator arch {arch!r}; allowed: small, residual")
        # NHWC: 1.2-1.3x faster forward+backward on CPU (benchmarks/README.md), the GPU's conv layout
        self.net.to(memory_format=torch.channels_last)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.config["channels"], self.config["height"], self.config["width"])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.lo) * (2.0 / (self.hi - self.lo)) - 1.0
        return self.net(z.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(self.logits(x))


def discriminator_config(input_spec: Any, arch: str = "auto") -> dict[str, Any]:
    """Architecture sized to the input: ``small`` up to 32 px, ``residual`` above."""
    c, h, w = input_spec.shape
    if arch == "auto":
        arch = "small" if max(h, w) <= SMALL_MAX_SIDE else "residual"
    config = {"arch": arch, "channels": c, "height": h, "width": w, "range": list(input_spec.range)}
    if arch == "residual" and max(h, w) > SMALL_MAX_SIDE:
        config["stem_stride"] = 2
    return config


@dataclass
class TrainedDiscriminator:
    """A discriminator with its training record."""

    module: Discriminator
    settings: dict[str, Any]
    log: dict[str, list[float]]
    heldout_accuracy: float
    heldout_real_accuracy: float
    heldout_fake_accuracy: float
    model_fingerprint: str
    seconds: float

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.to_bytes())
        return p

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({
            "format": FORMAT, "config": self.module.config, "state_dict": self.module.state_dict(),
            "settings": self.settings, "log": self.log, "heldout_accuracy": self.heldout_accuracy,
            "heldout_real_accuracy": self.heldout_real_accuracy, "heldout_fake_accuracy": self.heldout_fake_accuracy,
            "model_fingerprint": self.model_fingerprint, "seconds": self.seconds,
        }, buf)
        return buf.getvalue()

    def digest(self) -> str:
        return state_digest(self.module)


def load_discriminator(source: str | Path | bytes, model: ModelHandle | None = None) -> TrainedDiscriminator:
    """Load a saved discriminator safely (``weights_only=True``). Against a model: the input shape
    must match (error) and a different model fingerprint warns."""
    what = "discriminator bytes" if isinstance(source, bytes) else f"discriminator file {str(source)!r}"
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise DiscriminatorError(f"{what} does not exist")
    try:
        blob = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu", weights_only=True)
    except Exception as err:
        from ldam_sweep.model.loading import torch_file_error

        raise DiscriminatorError(torch_file_error(what, err, "save it with `TrainedDiscriminator.save(path)` or "
                                                  "`ldam-sweep train-discriminator SPEC -o d.pt`")) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DiscriminatorError(f"{what} is not an ldam-sweep discriminator (format {FORMAT!r})")
    module = Discriminator(blob["config"])
    module.load_state_dict(blob["state_dict"])
    module.eval()
    if model is not None:
        if tuple(module.input_shape) != tuple(model.input.shape) or list(blob["config"]["range"]) != list(model.input.range):
            raise DiscriminatorError(
                f"{what} takes images {module.input_shape} in range {blob['config']['range']}, "
                f"but model {model.name!r} takes {model.input.shape} in range {list(model.input.range)}; "
                "train a discriminator for this model (ldam-sweep train-discriminator)"
            )
        if blob["model_fingerprint"] != model.fingerprint:
            warnings.warn(
                f"{what} was trained against another model (fingerprint {blob['model_fingerprint'][:12]}, "
                f"this model {model.fingerprint[:12]}); its realism prior may not fit this model's chains",
                DiscriminatorModelWarning, stacklevel=2,
            )
    return TrainedDiscriminator(
        module=module, settings=blob["settings"], log=blob["log"], heldout_accuracy=blob["heldout_accuracy"],
        heldout_real_accuracy=blob["heldout_real_accuracy"], heldout_fake_accuracy=blob["heldout_fake_accuracy"],
        model_fingerprint=blob["model_fingerprint"], seconds=blob["seconds"],
    )


@dataclass
class ChainSetting:
    """How stage 1's chains run: the sweep's rule, and, with real data, its starts and context."""

    method: str
    options: Any
    lam: float
    real: np.ndarray | None = None  # the training images: exemplar starts and the activation targets
    preconditioner: Any = None


class _ChainGroup:
    """Persistent chains of one layer, each chain on its own unit (cycling over the targets). With
    real data and ``ldam`` they start as a sweep's chains do: from the unit's real exemplars (a new one
    at each re-initialisation, from the diverse subset a sweep starts from), with the same
    preconditioner and activation target; otherwise from uniform noise."""

    def __init__(self, model: ModelHandle, layer: str, units: np.ndarray, objective: str, seed: int, tag: str,
                 setting: ChainSetting) -> None:
        self.model, self.layer, self.units, self.objective = model, layer, units, objective
        self.seed, self.tag, self.setting = seed, tag, setting
        self.unit_idx = torch.from_numpy(units).to(model.device)
        self.generation = 0
        self.draws = 0
        self.advances = 0  # blocks of steps run since the last re-initialisation
        self.starts = self.target = None
        if setting.real is not None and setting.method == "ldam" and setting.options.start_pool > 0:
            self._exemplar_starts()
        self.reinit()

    def _exemplar_starts(self) -> None:
        from ldam_sweep.sampling.chains import _targets, diverse_order
        from ldam_sweep.sampling.exemplars import top_exemplars

        o = self.setting.options
        uniq, inverse = np.unique(self.units, return_inverse=True)
        images, _ = top_exemplars(self.model, self.layer, uniq, self.objective, torch.from_numpy(self.setting.real),
                                  o.start_pool)
        ex = torch.from_numpy(images)
        per_unit = max(8, int(np.bincount(inverse).max()))  # starts per unit: as many as a sweep's chains, at least
        order = diverse_order(ex, o.start_pool, per_unit)  # (U, per_unit)
        self.starts = ex[np.arange(len(uniq))[:, None], order][inverse]  # (slots, per_unit, C, H, W)
        target = _targets(self.model, self.layer, self.objective, uniq, ex, o)
        self.target = None if target is None else target[torch.from_numpy(inverse).to(target.device)]

    def reinit(self) -> None:
        self.generation += 1
        self.draws = 0
        self.advances = 0
        # keyed by chain position, not unit: two chains on one unit must not be copies of each other
        slots = np.arange(len(self.units))
        self.keys = noise.chain_keys(self.seed, f"{self.tag}|{self.layer}|gen{self.generation}", slots, 1).to(self.model.device)
        if self.starts is not None:  # slot i takes start (i + generation) of its unit's diverse subset
            pick = (slots + self.generation + (0 if self.tag == "train" else 3)) % self.starts.shape[1]
            self.x = self.starts[slots, pick].to(self.model.device)
            return
        lo, hi = self.model.input.range
        self.x = lo + (hi - lo) * noise.uniform(self.keys, 0, self.model.input.shape)

    def advance(self, steps: int, log_d: Callable | None) -> None:
        from ldam_sweep.sampling.langevin import ChainContext

        def act(x: torch.Tensor) -> torch.Tensor:
            return unit_objective(self.model.activations(x, self.layer), self.unit_idx, self.objective)

        st = self.setting
        context = ChainContext(preconditioner=st.preconditioner, target=self.target,
                               diverse_starts=self.starts is not None)
        out = run_chains(act, self.x, self.keys, steps=steps, method=st.method, options=st.options,
                         box=self.model.input.range, snapshot_steps=[steps], chains=1,
                         lam=st.lam if log_d else 0.0, log_d=log_d, draw_offset=self.draws, context=context)
        self.draws += steps
        self.advances += 1
        self.x = out.snapshots[-1]


def _spread(targets: list[tuple[str, np.ndarray]], n: int) -> list[tuple[str, np.ndarray]]:
    """n chains over the targets: round-robin over the layers (each layer gets its share, whatever
    its unit count), and within a layer evenly over its units, wrapping when it has fewer units."""
    targets = [(layer, np.asarray(units)) for layer, units in targets if len(units)]
    if not targets:
        raise LdamError("discriminator training needs at least one target unit")
    counts = [n // len(targets) + (1 if i < n % len(targets) else 0) for i in range(len(targets))]
    out = []
    for (layer, units), k in zip(targets, counts):
        if k:
            pick = (np.arange(k) * len(units) // k) if k <= len(units) else np.arange(k) % len(units)
            out.append((layer, units[pick].astype(np.int64)))
    return out


def train_discriminator(
    model: ModelHandle,
    targets: list[tuple[str, Any]],
    real_train: np.ndarray,
    real_heldout: np.ndarray,
    settings: DiscriminatorSettings | dict[str, Any] | None = None,
    *,
    progress: bool | Callable[[int, dict[str, float]], None] | None = None,
    objectives: dict[str, str] | None = None,
) -> TrainedDiscriminator:
    """Stage 1: train D against persistent chains on ``targets`` [(layer, units), ...].

    ``real_train`` / ``real_heldout``: real images (N, C, H, W) in the model's pixel range.
    ``progress``: ``True`` shows a progress bar (updates, loss, batch accuracy, time left) on
    stderr; a callable ``progress(update, stats)`` is called after each D update. A D whose
    held-out accuracy stays under ``WEAK_DISCRIMINATOR`` (0.55) is warned about
    (``WeakDiscriminatorWarning``): it barely tells chains from real images.
    """
    s = settings if isinstance(settings, DiscriminatorSettings) else DiscriminatorSettings(**(settings or {}))
    with progress_bar(progress, s.updates, "training D") as report:
        trained = _train(model, targets, real_train, real_heldout, s, report, objectives)
    if trained.heldout_accuracy < WEAK_DISCRIMINATOR:
        warnings.warn(WeakDiscriminatorWarning(weak_discriminator_text(trained.heldout_accuracy, s.lam)), stacklevel=2)
    return trained


class WeakDiscriminatorWarning(UserWarning):
    """A trained discriminator tells samples from real images barely better than chance."""


def weak_discriminator_text(accuracy: float, lam: float) -> str:
    return (f"the discriminator tells chains from real images only {accuracy:.2f} of the time on held-out data (0.5 is "
            f"chance, under {WEAK_DISCRIMINATOR} is weak): chains sampled with lambda > 0 get little realism from it "
            f"and its realism scores (log D) mean little. Train it longer (discriminator.train.updates, "
            f"trained here with lambda {lam:g}), or sample with lam: 0")


def _train(model: ModelHandle, targets: list[tuple[str, Any]], real_train: np.ndarray, real_heldout: np.ndarray,
           s: DiscriminatorSettings, progress: Callable[..., None] | None,
           objectives: dict[str, str] | None) -> TrainedDiscriminator:
    t0 = time.perf_counter()
    dev = model.device
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    options = parse_options(s.method, s.sampler)
    setting = ChainSetting(method=s.method, options=options, lam=s.lam, real=np.ascontiguousarray(real_train, dtype=np.float32))
    if s.method == "ldam":
        from ldam_sweep.sampling.precondition import fit_preconditioner

        setting.preconditioner = fit_preconditioner(real_train, options.precondition, device=dev)
    d = Discriminator(discriminator_config(model.input, s.arch)).to(dev)
    opt = torch.optim.Adam(d.parameters(), lr=s.lr, betas=(0.5, 0.999))
    real = torch.from_numpy(np.ascontiguousarray(real_train, dtype=np.float32)).to(dev)

    groups = []
    for layer, units in _spread([(layer, model.check_units(layer, units)) for layer, units in targets], s.chains):
        info = model.layer(layer)
        objective = objective_for(info.name, info.kind, objectives, info.geometry)
        groups.append(_ChainGroup(model, info.name, units, objective, s.seed, "train", setting))

    def frozen_log_d(x: torch.Tensor) -> torch.Tensor:
        return d(x)

    log: dict[str, list[float]] = {"loss": [], "accuracy": [], "real_accuracy": [], "fake_accuracy": [], "fake_log_d": []}
    half = s.batch // 2
    for update in range(s.updates):
        d.eval()
        for p in d.parameters():
            p.requires_grad_(False)
        g = groups[update % len(groups)]  # one layer's chains per update; the others keep their state
        if g.advances >= s.reinit_every:  # counted per group, so every chain ages reinit_every blocks
            g.reinit()
        g.advance(s.steps_per_update, frozen_log_d if s.lam > 0 else None)
        for p in d.parameters():
            p.requires_grad_(True)
        d.train()
        fakes = torch.cat([grp.x for grp in groups])
        fake = fakes[torch.randint(len(fakes), (half,), generator=gen).to(dev)]
        real_b = real[torch.randint(len(real), (half,), generator=gen).to(dev)]
        logits = d.logits(torch.cat([real_b, fake.detach()]))
        labels = torch.cat([torch.ones(half, device=dev), torch.zeros(half, device=dev)])
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            real_acc = float((logits[:half] > 0).float().mean())
            fake_acc = float((logits[half:] < 0).float().mean())
            stats = {"loss": float(loss), "accuracy": (real_acc + fake_acc) / 2, "real_accuracy": real_acc,
                     "fake_accuracy": fake_acc, "fake_log_d": float(F.logsigmoid(logits[half:]).mean())}
        for k, v in stats.items():
            log[k].append(v)
        if progress:
            progress(update + 1, stats)
    d.eval()
    for p in d.parameters():
        p.requires_grad_(False)
    real_acc, fake_acc = heldout_accuracy(d, model, groups, real_heldout, s, setting)
    return TrainedDiscriminator(
        module=d.cpu(), settings=s.model_dump(), log=log, heldout_accuracy=(real_acc + fake_acc) / 2,
        heldout_real_accuracy=real_acc, heldout_fake_accuracy=fake_acc, model_fingerprint=model.fingerprint,
        seconds=time.perf_counter() - t0,
    )


def heldout_accuracy(d: Discriminator, model: ModelHandle, groups: list[_ChainGroup], real_heldout: np.ndarray,
                     s: DiscriminatorSettings, setting: ChainSetting) -> tuple[float, float]:
    """Accuracy on held-out real images and on *fresh* chains (new starts, run with the final D)."""
    dev = model.device
    per_group = max(1, s.eval_chains // len(groups))
    fakes = []
    for g in groups:
        units = np.resize(g.units, per_group)
        fresh = _ChainGroup(model, g.layer, units, g.objective, s.seed, "heldout", setting)
        fresh.advance(s.eval_steps, d if s.lam > 0 else None)
        fakes.append(fresh.x)
    with torch.no_grad():
        real = torch.from_numpy(np.ascontiguousarray(real_heldout, dtype=np.float32)).to(dev)
        real_acc = float((d.logits(real) > 0).float().mean())
        fake_acc = float((d.logits(torch.cat(fakes)) < 0).float().mean())
    return real_acc, fake_acc
