"""Layer discovery by one dry forward pass: every module whose output can be visualised.

A module is a layer when it runs exactly once per forward (a module reused at several places,
like torchvision ResNet's shared ``relu``, has no single output) and returns one float tensor of
shape (B, C, H, W) ("conv": C channel units) or (B, F) ("linear": F feature units). The module
whose output *is* the model's output is "logit" (class units). Pure reshaping modules (Flatten,
Identity, Dropout) are skipped. When a container returns its last child's tensor unchanged (a
Sequential stage and its last block), both names mean one layer: the shortest is the layer's name
and the others are kept as aliases that resolve to it. Identity alone is not enough: an in-place
op (``out += identity``, ``ReLU(inplace=True)``) returns the same tensor object with new values,
so two modules alias only when the tensor's version counter is also unchanged between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ldam_sweep.objectives import DEFAULT_BY_KIND

SKIPPED_TYPES: tuple[type, ...] = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)


@dataclass(frozen=True)
class LayerInfo:
    """One visualisable layer: dotted module name, module type, unit kind and count, output shape."""

    name: str
    module_type: str
    kind: str  # "conv" | "linear" | "logit"
    units: int
    output_shape: tuple[int, ...]  # without the batch dimension
    aliases: tuple[str, ...] = field(default=())

    @property
    def default_objective(self) -> str:
        """The objective of this layer's kind unless a job asks for another (the objective table)."""
        return DEFAULT_BY_KIND[self.kind]

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "module_type": self.module_type,
            "kind": self.kind,
            "units": self.units,
            "output_shape": list(self.output_shape),
            "aliases": list(self.aliases),
        }


def discover_layers(net: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Run ``net(example)`` once with recording hooks on every submodule; return layers in
    execution order. ``example`` is already normalised (what ``net`` itself takes)."""
    calls: dict[str, int] = {}
    outputs: dict[str, object] = {}
    versions: dict[str, int] = {}
    order: list[str] = []

    def make_hook(name: str):
        def hook(_mod: nn.Module, _inp: object, out: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                outputs[name] = out
                versions[name] = out._version if isinstance(out, torch.Tensor) else -1

        return hook

    modules = dict(net.named_modules())
    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items() if n]
    try:
        with torch.no_grad():
            final = net(example)
    finally:
        for h in handles:
            h.remove()

    by_tensor: dict[tuple[int, int], list[str]] = {}
    for name in order:
        out = outputs[name]
        if calls[name] != 1 or isinstance(modules[name], SKIPPED_TYPES):
            continue
        if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() in (2, 4)):
            continue
        by_tensor.setdefault((id(out), versions[name]), []).append(name)

    layers = []
    for names in by_tensor.values():  # insertion order = order of first completion
        canonical = min(names, key=lambda n: (n.count("."), len(n), n))
        out = outputs[names[0]]
        assert isinstance(out, torch.Tensor)
        kind = "conv" if out.dim() == 4 else ("logit" if out is final else "linear")
        layers.append(
            LayerInfo(
                name=canonical,
                module_type=type(modules[canonical]).__name__,
                kind=kind,
                units=int(out.shape[1]),
                output_shape=tuple(int(s) for s in out.shape[1:]),
                aliases=tuple(n for n in names if n != canonical),
            )
        )
    return layers
