"""Per-chain random streams that do not depend on batch position: a counter-based generator.

Each chain has a 64-bit key derived from (seed, layer, unit, chain). The value at (chain, draw,
element) is an integer hash of (key, draw, element), computed for the whole batch at once with
integer tensor ops, so a chain's initial image and its noise at every step are the same whether
the chain runs alone, inside a block of 16 units, on a retry, or on another device (the integer
part is exact everywhere). torch.Generator has no per-element seeding, and the peer libraries
share one random draw across the batch; this is what makes a unit re-runnable alone.

Draw 0 is the initial image; draw t + 1 is the noise of step t.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

M32 = 0xFFFFFFFF
STREAM_BYTES = 64 << 20  # NormalStream hashes as many draws ahead as fit in this many bytes of int32 bits
STREAM_MAX_DRAWS = 32


def chain_keys(seed: int, layer: str, units: np.ndarray, chains: int) -> torch.Tensor:
    """(len(units) * chains, 2) int64 keys, row u * chains + c for (unit u, chain c)."""
    rows = []
    for unit in np.asarray(units).reshape(-1):
        for c in range(chains):
            digest = hashlib.blake2b(f"{int(seed)}|{layer}|{int(unit)}|{c}".encode(), digest_size=8).digest()
            rows.append((int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


def _i32(v: int) -> int:
    """A 32-bit pattern as the int32 value with the same bits (two's complement)."""
    v &= M32
    return v - (1 << 32) if v >= 1 << 31 else v


_C1, _C2 = _i32(0x7FEB352D), _i32(0x846CA68B)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (Wellons' lowbias32), in place on an int32 tensor.

    int32 products wrap (two's complement), which keeps exactly the low 32 bits of the unsigned
    product; right shifts are made logical by masking off the sign extension. The bits equal the
    uint32 reference (a test checks them against a plain-Python version). int32 in place costs a
    third of the int64 form this replaced: noise was ~4% of a step.
    """
    if x.dtype != torch.int32:
        raise TypeError(f"mix32 works in place on int32 tensors, got {x.dtype}")
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))
    x.mul_(_C1)
    x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF))
    x.mul_(_C2)
    return x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))


def _as_i32(v: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as the int32 tensor with the same bits (``_i32`` on a tensor)."""
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


def _bits(keys: torch.Tensor, draw: int, n: int, lane: int) -> torch.Tensor:
    """(B, n) int32 hashes (32 random bits each) for elements 0..n-1 of ``draw``; ``lane``
    separates independent uses."""
    return _bits_many(keys, draw, 1, n, lane)[0]


def _bits_many(keys: torch.Tensor, first: int, count: int, n: int, lane: int) -> torch.Tensor:
    """(count, B, n): ``_bits`` of draws first .. first + count - 1 in one pass (integer ops: exact,
    so each draw's bits are the same as alone). The draw values are made on the device (no
    host-to-device copy, which would synchronise a GPU once per step)."""
    k = _as_i32(keys)
    k0, k1 = k[:, 0:1].unsqueeze(0), k[:, 1:2].unsqueeze(0)  # (1, B, 1)
    if count == 1:
        d = torch.full((1, 1, 1), _i32(first * 2 + lane), dtype=torch.int32, device=keys.device)
    else:  # _i32(draw * 2 + lane) for each draw, wrapped as _i32 does
        v = (torch.arange(count, dtype=torch.int64, device=keys.device) * 2 + (first * 2 + lane)).bitwise_and_(M32)
        d = _as_i32(v).view(-1, 1, 1)
    stream = mix32(k0 ^ mix32(d))  # (count, B, 1)
    counter = torch.arange(n, device=keys.device, dtype=torch.int32).view(1, 1, n)
    return mix32(mix32(stream ^ counter).bitwise_xor_(k1))


def _unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """Top 23 bits to float32 in the open interval (0, 1): (k + 0.5) / 2**23 is exact in float32."""
    return ((bits >> 9).bitwise_and_(0x7FFFFF).to(torch.float32) + 0.5).mul_(1.0 / (1 << 23))


def uniform(keys: torch.Tensor, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) float32 uniform on (0, 1), one independent stream per key row."""
    n = math.prod(shape)
    return _unit_interval(_bits(keys, draw, n, 0)).reshape(keys.shape[0], *shape)


def normal(keys: torch.Tensor, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) float32 standard normal, one independent stream per key row.

    Box-Muller with both outputs used: each pair of uniforms gives two normals (r cos, r sin).
    """
    half = (math.prod(shape) + 1) // 2
    return _box_muller(_bits(keys, draw, half, 0), _bits(keys, draw, half, 1), shape)


def _box_muller(bits_r: torch.Tensor, bits_theta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) normals from two (B, half) int32 hash tensors (one draw's lanes 0 and 1)."""
    n, (b, half) = math.prod(shape), bits_r.shape
    r = _unit_interval(bits_r).log_().mul_(-2.0).sqrt_()
    theta = _unit_interval(bits_theta).mul_(2.0 * math.pi)
    z = torch.empty((b, 2 * half), dtype=torch.float32, device=bits_r.device)
    torch.mul(r, torch.cos(theta), out=z[:, :half])
    torch.mul(r, theta.sin_(), out=z[:, half:])
    return z[:, :n].reshape(b, *shape)


class NormalStream:
    """``normal(keys, draw, shape)`` for a run of consecutive draws, bit-equal, with fewer small
    ops per draw: the integer hashing (most of the ~100 ops of one draw) is done for up to
    STREAM_MAX_DRAWS draws at once, as many as fit in STREAM_BYTES; the float part (Box-Muller)
    stays per draw, on tensors of the same shape as ``normal``'s, so its rounding is the same too.
    Pays where a step is overhead-bound (small images, a GPU); large images hash one draw at a time."""

    def __init__(self, keys: torch.Tensor, shape: tuple[int, ...], last_draw: int, budget: int = STREAM_BYTES) -> None:
        self.keys, self.shape, self.last = keys, shape, last_draw
        self.half = (math.prod(shape) + 1) // 2
        self.ahead = max(1, min(STREAM_MAX_DRAWS, budget // (2 * 4 * self.half * max(1, keys.shape[0]))))
        self.first = 0
        self.bits: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, draw: int) -> torch.Tensor:
        if self.ahead == 1:
            return normal(self.keys, draw, self.shape)
        if self.bits is None or not self.first <= draw < self.first + len(self.bits[0]):
            count = max(1, min(self.ahead, self.last - draw + 1))
            self.first = draw
            self.bits = (_bits_many(self.keys, draw, count, self.half, 0), _bits_many(self.keys, draw, count, self.half, 1))
        i = draw - self.first
        return _box_muller(self.bits[0][i], self.bits[1][i], self.shape)
