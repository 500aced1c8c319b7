"""The score prior of ``walk``: a denoising model of the real images, a stronger realism prior than D.

A discriminator trained against the chains tells a moved sample from a real image, but its gradient
does not lead a moved image back onto the data (docs/method.md, "Chains that walk"). A denoising
score model does: trained to remove Gaussian noise of any level sigma from real images, its output
gives grad log p_sigma(x), the score of the data blurred by that noise (Vincent 2011; Song and Ermon
2019). Annealed Langevin dynamics on log p_sigma(x) + (guidance) a(x), sigma falling from sigma_max
to sigma_min, walks a chain through the images the unit prefers while the prior pulls it toward the data.

The model lives in the real images' top-k principal subspace (k = ``components``): images become
k coordinates z = sqrt(k / D) V^T (x - mean) (D values per image, V the k principal directions),
scaled so that noise of standard deviation sigma in z moves an image by an RMS of sigma per pixel
(sigma in units of the pixel range: sigma x (hi - lo) in pixel values).
On the digits (8x8 images upsampled to 28x28) the data span 64 dimensions and k = 64 loses nothing;
on larger images the subspace holds the coarse structure, and the walk moves only that: a chain keeps
its start's part outside the subspace (its fine detail) as it is (a stated limit: the walk neither
adds nor removes detail there). The network is an MLP on z and log sigma that predicts the
noise (epsilon-prediction): score(z, sigma) = -eps_hat(z, sigma) / sigma.

The default network (3 hidden layers of 1,024, 2.3 M weights) and training (16,000 Adam steps: ~6
min on 2 CPU cores) are what made its own walk hard to tell from real digits on the demo (two-sample
0.79 against 0.975 for 512 units and 4,000 steps: docs/scripts/prior_alone.json); ``ScorePrior.to_bytes``
and ``load_score_prior`` keep it as tensors only (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldam_sweep.errors import SamplerError
from ldam_sweep.model.handle import state_digest
from ldam_sweep.settings import PRIOR_SIGMA_RANGE as SIGMA_RANGE  # noise levels trained on (per-pixel RMS / range)

FORMAT = "ldam-sweep-score-prior-1"
COMPONENTS = 64  # the digits' exact span; a folder of photos keeps its top 64 directions
MIN_IMAGES = 32


class ScorePrior(nn.Module):
    """eps_hat(z, sigma) for images in the real data's principal subspace; see the module doc."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, shape: tuple[int, ...], box: tuple[float, float],
                 hidden: int = 1024, sigma_data: float = 1.0) -> None:
        super().__init__()
        d, k = basis.shape
        self.shape = tuple(int(s) for s in shape)
        self.box = (float(box[0]), float(box[1]))
        self.hidden = int(hidden)
        self.register_buffer("mean", mean.reshape(d).float())
        self.register_buffer("basis", basis.float())  # (D, k) orthonormal columns
        self.register_buffer("freq", torch.linspace(0.5, 16.0, 16))
        self.scale = math.sqrt(k / d) / (self.box[1] - self.box[0])  # z per pixel-range unit: RMS-preserving
        self.sigma_data = float(sigma_data)
        self.record: dict[str, Any] = {}  # how it was trained (images, steps, seconds, final loss), saved with it
        self.net = nn.Sequential(nn.Linear(k + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, k))

    @property
    def components(self) -> int:
        return int(self.basis.shape[1])

    def coords(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, k) coordinates (the part outside the subspace is dropped)."""
        return (x.flatten(1) - self.mean) @ self.basis * self.scale

    def image(self, z: torch.Tensor) -> torch.Tensor:
        """(B, k) coordinates -> (B, C, H, W) images (not clipped to the pixel box)."""
        return (self.mean + (z / self.scale) @ self.basis.T).view(-1, *self.shape)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """eps_hat: the noise in z at level sigma ((B,) or a number), as the model estimates it."""
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).expand(z.shape[0]).reshape(-1, 1)
        e = torch.log(sigma) * self.freq
        c_in = torch.rsqrt(sigma * sigma + self.sigma_data**2)
        return self.net(torch.cat([z * c_in, torch.sin(e), torch.cos(e)], 1))

    def score(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """grad_z log p_sigma(z) = -eps_hat / sigma."""
        return self(z, sigma).div_(-sigma)

    def config(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "box": list(self.box), "hidden": self.hidden, "sigma_data": self.sigma_data,
                "components": self.components}

    def digest(self) -> str:
        """sha256 of its weights (the principal basis included): what a sweep's rows name."""
        return state_digest(self)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "config": self.config(), "state_dict": self.state_dict(),
                    "record": dict(self.record)}, buf)
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.to_bytes())
        return p


def load_score_prior(source: str | Path | bytes) -> ScorePrior:
    """A saved score prior, loaded safely (``weights_only=True``: tensors and plain data, no code)."""
    what = "score prior bytes" if isinstance(source, bytes) else f"score prior file {str(source)!r}"
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise SamplerError(f"{what} does not exist")
    try:
        blob = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                          weights_only=True)
    except Exception as err:  # a pickle with code, a truncated file: say which, never run it
        from ldam_sweep.model.loading import torch_file_error

        raise SamplerError(torch_file_error(what, err, "save it with ScorePrior.save(path)")) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SamplerError(f"{what} is not an ldam-sweep score prior (format {FORMAT!r})")
    cfg, state = blob.get("config"), blob.get("state_dict")
    if not isinstance(cfg, dict) or not isinstance(state, dict) or "mean" not in state or "basis" not in state:
        raise SamplerError(f"{what} is incomplete (no config or state_dict); save it with ScorePrior.save(path)")
    with torch.random.fork_rng(devices=[]):  # building the network draws its initial weights: not the caller's RNG
        prior = ScorePrior(state["mean"], state["basis"], tuple(cfg["shape"]), tuple(cfg["box"]), cfg["hidden"],
                           cfg["sigma_data"])
    prior.load_state_dict(state)
    prior.record = dict(blob.get("record") or {})
    return prior.eval().requires_grad_(False)


def train_score_prior(images: np.ndarray | torch.Tensor, *, box: tuple[float, float] = (0.0, 1.0),
                      components: int = COMPONENTS, steps: int = 16000, batch: int = 256, hidden: int = 1024,
                      lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu") -> ScorePrior:
    """Fit a ``ScorePrior`` to real images (N, C, H, W) in the pixel box ``box`` (the model's input
    range): their top ``components`` principal directions, then ``steps`` Adam steps of denoising
    score matching over noise levels log-uniform in ``SIGMA_RANGE`` (per-pixel RMS), on ``device``
    (the draws come from a CPU generator: the same batches on every device). Returned on the CPU."""
    x = (images.detach().cpu().float() if isinstance(images, torch.Tensor)
         else torch.as_tensor(np.asarray(images), dtype=torch.float32))
    if x.ndim != 4 or len(x) < MIN_IMAGES or not torch.isfinite(x).all():
        raise SamplerError(f"the score prior needs at least {MIN_IMAGES} finite real images (N, C, H, W), "
                           f"got shape {tuple(x.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise SamplerError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(components, int) or components < 1:
        raise SamplerError(f"components must be a positive integer, got {components!r}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    flat = x.flatten(1)
    mean = flat.double().mean(0).float()
    centred = flat - mean
    k = min(components, len(x) - 1, flat.shape[1])
    # the top-k principal directions from the N x N Gram matrix (N images, D values each: no D x D or
    # N x D float64 copy, so 224-px images cost N^2, not an SVD of N x D)
    gram = (centred @ centred.T).double()
    val, vec = torch.linalg.eigh(gram)  # ascending
    val, vec = val.flip(0)[:k].clamp_min(1e-12), vec.flip(1)[:, :k]
    basis = (centred.T.double() @ vec / val.sqrt()).float().contiguous()  # V = X^T U / s: orthonormal
    with torch.random.fork_rng(devices=[]):  # the network's initial weights from the seed, not the caller's RNG
        torch.manual_seed(seed)
        prior = ScorePrior(mean, basis, tuple(x.shape[1:]), box, hidden)
    with torch.no_grad():
        z = prior.coords(x)
    prior.sigma_data = float(z.std())
    dev = torch.device(device)
    prior.to(dev)
    z = z.to(dev)
    opt = torch.optim.Adam(prior.net.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    lo, hi = (math.log(s) for s in SIGMA_RANGE)
    losses = []
    for i in range(steps):
        zb = z[torch.randint(len(z), (batch,), generator=gen).to(dev)]
        sigma = torch.exp(lo + (hi - lo) * torch.rand(batch, generator=gen)).to(dev)
        eps = torch.randn(zb.shape, generator=gen).to(dev)
        loss = (prior(zb + sigma[:, None] * eps, sigma) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i >= steps - 100:  # the final loss: the mean of the last 100 (no device sync per step)
            losses.append(loss.detach())
    losses = torch.stack(losses).cpu().tolist()
    prior.record = {"images": len(x), "components": k, "steps": steps, "seconds": time.perf_counter() - t0,
                    "final_loss": float(np.mean(losses))}
    return prior.to("cpu").eval().requires_grad_(False)
