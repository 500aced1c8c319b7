"""Unit objectives, vectorised: element i of a batch maximises unit ``units[i]`` of the layer.

No Python loop over the batch: one gather picks each element's own unit.
"""

from __future__ import annotations

import torch

from ldam_sweep.errors import SamplerError

OBJECTIVES_BY_KIND: dict[str, tuple[str, ...]] = {
    "conv": ("channel", "neuron"),
    "linear": ("unit",),
    "logit": ("logit", "unit"),
}


def check_objective(objective: str, layer_kind: str, layer_name: str) -> str:
    allowed = OBJECTIVES_BY_KIND[layer_kind]
    if objective not in allowed:
        raise SamplerError(
            f"objective {objective!r} does not apply to {layer_kind} layer {layer_name!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    return objective


def unit_objective(acts: torch.Tensor, units: torch.Tensor, objective: str) -> torch.Tensor:
    """(B,) activation of each element's own unit.

    - ``channel``: spatial mean of channel ``units[i]`` of a (B, C, H, W) output;
    - ``neuron``: channel ``units[i]`` at the centre position (H // 2, W // 2);
    - ``unit`` / ``logit``: feature ``units[i]`` of a (B, F) output (pre-softmax for logits).
    """
    idx = units.to(device=acts.device, dtype=torch.int64)
    if objective == "channel":
        b, _, h, w = acts.shape
        picked = acts.gather(1, idx.view(b, 1, 1, 1).expand(b, 1, h, w))
        return picked.mean(dim=(1, 2, 3))
    if objective == "neuron":
        centre = acts[:, :, acts.shape[2] // 2, acts.shape[3] // 2]
        return centre.gather(1, idx.view(-1, 1)).squeeze(1)
    if objective in ("unit", "logit"):
        return acts.gather(1, idx.view(-1, 1)).squeeze(1)
    raise SamplerError(f"unknown objective {objective!r}; allowed: channel, neuron, unit, logit")
