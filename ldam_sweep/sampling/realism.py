"""Realism without the discriminator: how far a set of samples is from the real data.

Two measures (docs/scores.md, "Realism"):

- **two-sample test**: a small CNN, trained from scratch, tries to tell the samples from as many real
  images; its held-out accuracy (cross-fitted over ``FOLDS`` folds, so every image is scored by a
  classifier that never saw it) is 0.5 when the two sets cannot be told apart and 1.0 when they always
  can. Each sample's held-out prediction also gives a per-unit number: the fraction of a unit's
  samples the classifier calls generated.
- **high-frequency energy**: the RMS of an image minus its low-pass (``lowpass``: a 3x3 box blur
  twice), as a fraction of the pixel range, averaged over images and divided by the same for real
  images: 1.0 = as much fine detail as real data; speckle and stripes push it up.

Both are given for the samples and for the units' own top real exemplars, which are the floor: the
exemplars are real images, but a biased selection (all of one kind), so a classifier tells them from
random real images more often than chance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldam_sweep.sampling.lowpass import lowpass

FOLDS = 3
EPOCHS = 15
BATCH = 64
MAX_SIDE = 64  # larger images are area-downsampled to this side for the classifier
MAX_IMAGES = 1024  # per side (samples, real) and per test: a random subset beyond it


@torch.no_grad()
def hf_energy(images: np.ndarray | torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0),
              batch: int = 1024) -> np.ndarray:
    """(N, C, H, W) -> (N,) RMS of image minus its low-pass, as a fraction of the pixel range."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    width = float(value_range[1] - value_range[0])
    out = []
    for i in range(0, len(x), batch):
        b = x[i : i + batch].float()
        out.append(((b - lowpass(b)).pow(2).mean(dim=(1, 2, 3)).sqrt() / width).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


class _Classifier(nn.Module):
    """Two 3x3 convolutions (16, 32 channels) with max pooling, pooled to 4x4, one linear logit."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Linear(32 * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


@dataclass
class TwoSampleResult:
    accuracy: float  # held-out accuracy over both sets (0.5 = indistinguishable)
    fake_called: np.ndarray  # (n,) bool per given sample (in the order given): held-out call "generated"
    samples: int  # images per side actually used
    chosen: np.ndarray  # (n,) indices into the given samples that were used


def _prepare(x: np.ndarray | torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
    lo, hi = value_range
    t = (t - lo) * (2.0 / (hi - lo)) - 1.0
    side = max(t.shape[-2:])
    if side > MAX_SIDE:
        f = -(-side // MAX_SIDE)
        t = F.avg_pool2d(t, f, ceil_mode=True)
    return t.contiguous()


def two_sample_test(fake: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor, *,
                    value_range: tuple[float, float] = (0.0, 1.0), seed: int = 0, folds: int = FOLDS,
                    epochs: int = EPOCHS, max_images: int = MAX_IMAGES) -> TwoSampleResult:
    """Classifier two-sample test of ``fake`` against ``real`` (N, C, H, W), balanced to the smaller
    set (at most ``max_images`` per side), cross-fitted over ``folds`` folds. Deterministic per seed."""
    gen = torch.Generator().manual_seed(seed)
    n = int(min(len(fake), len(real), max_images))
    if n < 2 * folds:
        raise ValueError(f"two-sample test needs at least {2 * folds} images per side, got {n}")
    fi = torch.randperm(len(fake), generator=gen)[:n]
    ri = torch.randperm(len(real), generator=gen)[:n]
    x = torch.cat([_prepare(np.asarray(fake)[fi.numpy()], value_range), _prepare(np.asarray(real)[ri.numpy()], value_range)])
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    fold = torch.cat([torch.randperm(n, generator=gen) % folds, torch.randperm(n, generator=gen) % folds])
    called_fake = torch.zeros(2 * n, dtype=torch.bool)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for k in range(folds):
            tr, te = fold != k, fold == k
            net = _Classifier(x.shape[1])
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            xt, yt = x[tr], y[tr]
            for _ in range(epochs):
                perm = torch.randperm(len(xt), generator=gen)
                for i in range(0, len(xt), BATCH):
                    b = perm[i : i + BATCH]
                    loss = F.binary_cross_entropy_with_logits(net(xt[b]), yt[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                called_fake[te] = net(x[te]) < 0
    torch.set_num_threads(threads)
    correct = (called_fake == (y == 0)).float().mean().item()
    return TwoSampleResult(accuracy=correct, fake_called=called_fake[:n].numpy(), samples=n, chosen=fi.numpy())
