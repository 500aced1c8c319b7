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


def chain_keys(seed: int, layer: str, units: np.ndarray, chains: int) -> torch.Tensor:
    """(len(units) * chains, 2) int64 keys, row u * chains + c for (unit u, chain c)."""
    rows = []
    for unit in np.asarray(units).reshape(-1):
        for c in range(chains):
            digest = hashlib.blake2b(f"{int(seed)}|{layer}|{int(unit)}|{c}".encode(), digest_size=8).digest()
            rows.append((int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (Wellons' lowbias32) on int64 tensors holding values < 2**32.

    Products overflow int64 and wrap (two's complement); masking keeps the exact low 32 bits.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _bits(keys: torch.Tensor, draw: int, n: int, lane: int) -> torch.Tensor:
    """(B, n) 32-bit hashes for elements 0..n-1 of ``draw``; ``lane`` separates independent uses."""
    k0, k1 = keys[:, 0:1], keys[:, 1:2]
    stream = mix32(k0 ^ mix32(torch.full_like(k0, (draw * 2 + lane) & M32)))
    counter = torch.arange(n, device=keys.device, dtype=torch.int64).unsqueeze(0)
    return mix32(mix32(stream ^ counter) ^ k1)


def _unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """Top 23 bits to float32 in the open interval (0, 1): (k + 0.5) / 2**23 is exact in float32."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def uniform(keys: torch.Tensor, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) float32 uniform on (0, 1), one independent stream per key row."""
    n = math.prod(shape)
    return _unit_interval(_bits(keys, draw, n, 0)).reshape(keys.shape[0], *shape)


def normal(keys: torch.Tensor, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) float32 standard normal, one independent stream per key row.

    Box-Muller with both outputs used: each pair of uniforms gives two normals (r cos, r sin).
    """
    n = math.prod(shape)
    half = (n + 1) // 2
    r = torch.sqrt(-2.0 * torch.log(_unit_interval(_bits(keys, draw, half, 0))))
    theta = (2.0 * math.pi) * _unit_interval(_bits(keys, draw, half, 1))
    z = torch.cat((r * torch.cos(theta), r * torch.sin(theta)), dim=1)[:, :n]
    return z.reshape(keys.shape[0], *shape)
