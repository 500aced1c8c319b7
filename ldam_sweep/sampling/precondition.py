"""The data preconditioner of ``ldam``: drift and noise shaped by the real data's second moments.

A step x <- x + eta * P g (+ the noise P^(1/2) xi) moves the image only in directions along which
real images vary, in proportion to how much they vary there. Per-pixel gradients of a unit (and of a
discriminator) are full of single-pixel detail that real images never have: ascending them writes
speckle and stripes. P = Sigma / ||Sigma|| (Sigma: the covariance of the real images) removes it,
whatever its source. Two forms:

- ``covariance``: Sigma itself, eigendecomposed once; the directions with a non-negligible eigenvalue
  are kept (P = V diag(w) V^T). For inputs up to COVARIANCE_MAX_VALUES values (28x28, 32x32x3). On
  the digits, which are 8x8 images upsampled to 28x28, Sigma has rank 64: the chains move inside
  the data's own span.
- ``spectrum``: a stationary approximation for larger images: Sigma ~ M (x) S, with S the mean power
  spectrum of the images (one per frequency, shared by the channels) and M the channels' 3x3
  covariance; applied with two FFTs per image. Natural images have S ~ 1/f^2: the step becomes smooth.

Both are scaled to keep the size of white noise: E||P xi||^2 = E||xi||^2 (the mean squared eigenvalue
is 1), so ``step_size`` means the same for any data and image size: P takes the step's size from the
directions real data does not use and gives it to those it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ldam_sweep.errors import SamplerError

COVARIANCE_MAX_VALUES = 3072  # C*H*W up to 32x32x3: one eigendecomposition of at most 3072x3072 (a few s on a CPU)
EIGEN_FLOOR = 1e-6  # eigenvalues below this fraction of the largest are dropped (numerical rank)
MIN_IMAGES = 16

Kind = Literal["covariance", "spectrum"]


@dataclass
class Preconditioner:
    """P (drift) and P^(1/2) (noise) for images of one shape; tensors on one device."""

    kind: Kind
    shape: tuple[int, int, int]
    basis: torch.Tensor | None = None  # covariance: (D, r) eigenvectors
    weight: torch.Tensor | None = None  # covariance: (r,) eigenvalues / max
    spectrum: torch.Tensor | None = None  # spectrum: (H, W//2 + 1) power / max
    mixing: torch.Tensor | None = None  # spectrum: (C, C) channel covariance / max eigenvalue
    mixing_half: torch.Tensor | None = None  # its symmetric square root

    def to(self, device: torch.device | str) -> "Preconditioner":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Preconditioner(**moved)

    @property
    def device(self) -> torch.device:
        t = self.basis if self.basis is not None else self.spectrum
        return t.device  # type: ignore[union-attr]

    def drift(self, g: torch.Tensor) -> torch.Tensor:
        """P g for a batch (B, C, H, W)."""
        return self._apply(g, half=False)

    def noise(self, xi: torch.Tensor) -> torch.Tensor:
        """P^(1/2) xi for a batch (B, C, H, W): noise with covariance P."""
        return self._apply(xi, half=True)

    def _apply(self, g: torch.Tensor, half: bool) -> torch.Tensor:
        if self.kind == "covariance":
            w = self.weight.sqrt() if half else self.weight  # type: ignore[union-attr]
            flat = g.reshape(g.shape[0], -1)
            return ((flat @ self.basis) * w @ self.basis.T).view_as(g)  # type: ignore[operator]
        m = self.mixing_half if half else self.mixing
        s = self.spectrum.sqrt() if half else self.spectrum  # type: ignore[union-attr]
        if g.shape[1] > 1:
            g = torch.einsum("ij,bjhw->bihw", m, g)
        h, w = g.shape[-2:]
        return torch.fft.irfft2(torch.fft.rfft2(g) * s, s=(h, w))

    def stationary(self) -> "Preconditioner":
        """The ``spectrum`` form of this preconditioner (itself if it is one): from the covariance's
        eigenvectors, their power spectra weighted by the eigenvalues (averaged over the channels)
        and the channels' covariance; full rank, so steps may leave the data's span but stay as smooth
        as the data. The activation ladder climbs with it (docs/method.md, "The activation ladder")."""
        if self.kind == "spectrum":
            return self
        c, h, w = self.shape
        v = self.basis.T.double().reshape(-1, c, h, w)  # type: ignore[union-attr]
        weight = self.weight.double()  # type: ignore[union-attr]
        full = (torch.fft.fft2(v).abs().pow(2).mean(1) * weight.view(-1, 1, 1)).sum(0)  # (H, W)
        full = full / full.max()
        flat = v.flatten(2)
        mixing = torch.einsum("r,rcp,rdp->cd", weight, flat, flat)
        cev, cvec = torch.linalg.eigh(mixing)
        cev = cev.clamp_min(0) / cev.max()
        mixing, half = (cvec * cev) @ cvec.T, (cvec * cev.sqrt()) @ cvec.T
        scale = (full.pow(2).mean() * cev.pow(2).mean()).sqrt()
        return Preconditioner(kind="spectrum", shape=self.shape, spectrum=(full[:, : w // 2 + 1] / scale).float(),
                              mixing=mixing.float(), mixing_half=half.float()).to(self.device)

    def describe(self) -> str:
        if self.kind == "covariance":
            return f"data covariance, rank {self.basis.shape[1]} of {self.basis.shape[0]}"  # type: ignore[union-attr]
        return "data power spectrum" + (" with channel covariance" if self.shape[0] > 1 else "")


def choose_kind(kind: str, shape: tuple[int, ...]) -> Kind | None:
    """The form ``auto`` means for this input shape; None for ``none``."""
    if kind == "none":
        return None
    if kind == "auto":
        return "covariance" if int(np.prod(shape)) <= COVARIANCE_MAX_VALUES else "spectrum"
    if kind not in ("covariance", "spectrum"):
        raise SamplerError(f"precondition must be auto, covariance, spectrum or none, got {kind!r}")
    return kind  # type: ignore[return-value]


@torch.no_grad()
def fit_preconditioner(images: np.ndarray | torch.Tensor, kind: str = "auto",
                       device: torch.device | str = "cpu") -> Preconditioner | None:
    """The preconditioner of real images (N, C, H, W) in the model's pixel range; None for ``none``."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).double()
    if x.ndim != 4:
        raise SamplerError(f"preconditioner: real images must be (N, C, H, W), got shape {tuple(x.shape)}")
    shape = tuple(int(v) for v in x.shape[1:])
    form = choose_kind(kind, shape)
    if form is None:
        return None
    if len(x) < MIN_IMAGES:
        raise SamplerError(f"preconditioner: {len(x)} real images are too few to estimate their covariance "
                           f"(at least {MIN_IMAGES}); give more data or precondition: none")
    if not torch.isfinite(x).all():
        raise SamplerError("preconditioner: real images contain NaN or infinite values")
    x = x - x.mean(0)
    if form == "covariance":
        if int(np.prod(shape)) > 4 * COVARIANCE_MAX_VALUES:
            raise SamplerError(f"precondition: covariance needs a {int(np.prod(shape))}-square matrix for inputs "
                               f"{shape}; use spectrum (or auto) above {COVARIANCE_MAX_VALUES} values")
        flat = x.reshape(len(x), -1)
        cov = flat.T @ flat / len(flat)
        ev, vec = torch.linalg.eigh(cov)
        top = float(ev.max())
        if top <= 0:
            raise SamplerError("preconditioner: the real images are all the same; nothing to precondition with")
        keep = ev > EIGEN_FLOOR * top
        w = ev[keep] / top
        w = w / (w.pow(2).sum() / len(ev)).sqrt()  # mean squared eigenvalue over all D directions: 1
        pre = Preconditioner(kind="covariance", shape=shape, basis=vec[:, keep].float().contiguous(), weight=w.float())
        return pre.to(device)
    c = shape[0]
    mixing = torch.ones(1, 1, dtype=torch.float64)
    if c > 1:
        chan = x.transpose(0, 1).reshape(c, -1)
        mixing = chan @ chan.T / chan.shape[1]
        cev, cvec = torch.linalg.eigh(mixing)
        cev = cev.clamp_min(0) / cev.max()
        mixing = (cvec * cev) @ cvec.T
        half = (cvec * cev.sqrt()) @ cvec.T
        # the spectrum of the channel-decorrelated images (so M (x) S does not count the mixing twice)
        inv = (cvec * torch.where(cev > EIGEN_FLOOR, cev.rsqrt(), torch.zeros_like(cev))) @ cvec.T
        x = torch.einsum("ij,bjhw->bihw", inv, x)
    else:
        half = mixing
    full = torch.fft.fft2(x).abs().pow(2).mean(dim=(0, 1))  # (H, W): every frequency, for the scale
    full = full / full.max()
    m_eig = torch.linalg.eigvalsh(mixing).clamp_min(0)
    scale = (full.pow(2).mean() * m_eig.pow(2).mean()).sqrt()  # root mean squared eigenvalue of M (x) S
    power = full[:, : shape[2] // 2 + 1] / scale
    pre = Preconditioner(kind="spectrum", shape=shape, spectrum=power.float(),
                         mixing=mixing.float(), mixing_half=half.float())
    return pre.to(device)
