"""Layer discovery by one dry forward pass: every module whose output can be visualised.

A module is a layer when it runs exactly once per forward (a module reused at several places,
like torchvision ResNet's shared ``relu``, has no single output) and returns one float tensor,
batch first, of shape
- (B, C, H, W): "conv", C channel units;
- (B, F): "linear", F feature units; "logit" when it *is* the model's output (class units);
- (B, T, D): "token", D feature units over T tokens (a transformer block, its MLP hidden
  activation, a layer norm);
- (B, H, W, C) with the channels last (Swin stages, the Linear layers inside ConvNeXt blocks):
  also "token", C units over an H x W grid of tokens.
Which 4-D outputs are channels-last is decided by following the layout through the pass: Linear
and LayerNorm outputs have their features last, convolutions, batch norms and pools first,
``Permute`` modules swap them, and any other module keeps its input's layout.
A module that returns a tuple (``nn.MultiheadAttention``: output and weights) exposes its first
tensor. Pure reshaping modules (Flatten, Identity, Dropout, Permute) are skipped silently;
every other module that runs but cannot be a layer is listed with the reason (``skipped``).
When a container returns its last child's tensor unchanged (a Sequential stage and its last
block), both names mean one layer: the shortest is the layer's name and the others are kept as
aliases that resolve to it. Identity alone is not enough: an in-place op (``out += identity``,
``ReLU(inplace=True)``) returns the same tensor object with new values, so two modules alias only
when the tensor's version counter is also unchanged between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ldam_sweep.objectives import DEFAULT_BY_KIND, TokenGeometry, token_geometry

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


CHANNELS_FIRST_TYPES: tuple[type, ...] = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
)


@dataclass(frozen=True)
class LayerInfo:
    """One visualisable layer: dotted module name, module type, unit kind and count, output shape
    (as the module returns it, without the batch dimension), and how to read it unit-first:
    ``layout`` is nchw, nf, ntd (tokens then features) or nhwc (channels last); ``output_index``
    is the tuple element for modules that return tuples; ``geometry`` places a token layer's tokens."""

    name: str
    module_type: str
    kind: str  # "conv" | "linear" | "logit" | "token"
    units: int
    output_shape: tuple[int, ...]  # without the batch dimension
    aliases: tuple[str, ...] = field(default=())
    layout: str = "nchw"
    output_index: int | None = None
    geometry: TokenGeometry | None = None

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
            "layout": self.layout,
            "output_index": self.output_index,
            "tokens": None if self.geometry is None else self.geometry.as_dict(),
        }


@dataclass(frozen=True)
class SkippedModule:
    """A module that runs during the forward pass but is not a layer, and why."""

    name: str
    module_type: str
    reason: str

    def as_dict(self) -> dict:
        return {"name": self.name, "module_type": self.module_type, "reason": self.reason}


def pick_output(out: object, index: int | None) -> object:
    """The tensor a layer exposes: the module's output, or element ``index`` of its tuple."""
    return out if index is None else out[index]  # type: ignore[index]


def unit_first(out: torch.Tensor, layout: str) -> torch.Tensor:
    """A layer output with its units on dimension 1: (B, C, H, W), (B, F) or (B, D, T)."""
    if layout == "ntd":
        return out.transpose(1, 2)
    if layout == "nhwc":
        return out.permute(0, 3, 1, 2).flatten(2)
    return out


def _usable(out: object, batch: int) -> str | None:
    """None when ``out`` can be a layer's tensor, else why not."""
    if not isinstance(out, torch.Tensor):
        return f"returns {type(out).__name__}, not a tensor"
    if not out.is_floating_point():
        return f"returns a {out.dtype} tensor, not a float one"
    if out.dim() not in (2, 3, 4):
        return f"returns a {out.dim()}-D tensor {tuple(out.shape)}; layers are 2-D, 3-D or 4-D"
    if out.shape[0] != batch:
        return f"returns {tuple(out.shape)}: the batch ({batch}) is not its first dimension"
    return None


def _exposed(out: object, batch: int) -> tuple[int | None, str | None]:
    """(tuple index or None, reason it is unusable or None)."""
    if isinstance(out, (tuple, list)):  # the first tensor is the output (attention weights come after it)
        first = next((i for i, part in enumerate(out) if isinstance(part, torch.Tensor)), None)
        if first is None:
            return None, f"returns a {type(out).__name__} without a tensor"
        reason = _usable(out[first], batch)
        return first, (None if reason is None else f"{reason} (element {first} of the {type(out).__name__} it returns)")
    return None, _usable(out, batch)


def _layout(mod: nn.Module, inp: object, out: torch.Tensor, known: dict[int, str], by_shape: dict) -> str:
    """Where a 4-D output keeps its channels: "nchw" or "nhwc" (see the module docstring)."""
    if isinstance(mod, CHANNELS_FIRST_TYPES):
        return "nchw"
    if isinstance(mod, nn.Linear) and out.shape[-1] == mod.out_features:
        return "nhwc"
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1 and out.shape[-1] == mod.normalized_shape[0]:
        return "nhwc"
    first = inp[0] if isinstance(inp, tuple) and inp else None
    source = known.get(id(first)) if isinstance(first, torch.Tensor) else None
    dims = [int(d) for d in getattr(mod, "dims", [])] if type(mod).__name__ == "Permute" else []
    if dims == [0, 2, 3, 1]:
        return "nhwc" if source in (None, "nchw") else "nchw"
    if dims == [0, 3, 1, 2]:
        return "nchw" if source in (None, "nhwc") else "nhwc"
    if source is not None and isinstance(first, torch.Tensor) and first.shape == out.shape:
        return source
    return by_shape.get(tuple(out.shape), "nchw")


def discover_layers(net: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Run ``net(example)`` once with recording hooks on every submodule; return layers in
    execution order. ``example`` is already normalised (what ``net`` itself takes)."""
    return discover(net, example)[0]


def discover(net: nn.Module, example: torch.Tensor) -> tuple[list[LayerInfo], list[SkippedModule]]:
    """``discover_layers`` and the modules that ran but are not layers, with the reason."""
    batch, height, width = example.shape[0], example.shape[-2], example.shape[-1]
    calls: dict[str, int] = {}
    outputs: dict[str, object] = {}
    versions: dict[str, int] = {}
    exposed: dict[str, tuple[int | None, str | None]] = {}  # (tuple index, why it is no layer) per module
    known: dict[int, str] = {}  # id of every 4-D tensor seen -> its layout
    by_shape: dict[tuple, str] = {}  # the last layout seen for each 4-D shape
    order: list[str] = []
    modules = dict(net.named_modules())

    def make_hook(name: str):
        def hook(mod: nn.Module, inp: object, out: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] != 1:
                return
            order.append(name)
            outputs[name] = out
            exposed[name] = _exposed(out, batch)
            t = pick_output(out, exposed[name][0])
            versions[name] = t._version if isinstance(t, torch.Tensor) else -1
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                by_shape[tuple(t.shape)] = known.setdefault(id(t), _layout(mod, inp, t, known, by_shape))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items() if n]
    try:
        with torch.no_grad():
            final = net(example)
    finally:
        for h in handles:
            h.remove()

    by_tensor: dict[tuple[int, int], list[str]] = {}
    skipped: list[SkippedModule] = []
    for name in order:
        mod = modules[name]
        if isinstance(mod, SKIPPED_TYPES) or type(mod).__name__ == "Permute":
            continue
        if calls[name] != 1:
            skipped.append(SkippedModule(name, type(mod).__name__,
                                         f"runs {calls[name]} times per forward (a shared module has no single output)"))
            continue
        index, reason = exposed[name]
        if reason is not None:
            skipped.append(SkippedModule(name, type(mod).__name__, reason))
            continue
        out = pick_output(outputs[name], index)
        by_tensor.setdefault((id(out), versions[name]), []).append(name)

    layers = []
    for names in by_tensor.values():  # insertion order = order of first completion
        canonical = min(names, key=lambda n: (n.count("."), len(n), n))
        out = pick_output(outputs[names[0]], exposed[names[0]][0])
        assert isinstance(out, torch.Tensor)
        shape = tuple(int(s) for s in out.shape[1:])
        geometry = None
        if out.dim() == 2:
            kind, layout, units = ("logit" if out is final else "linear"), "nf", shape[0]
        elif out.dim() == 3:
            kind, layout, units = "token", "ntd", shape[1]
            geometry = token_geometry(shape[0], height, width)
        elif known.get(id(out)) == "nhwc":
            kind, layout, units = "token", "nhwc", shape[2]
            geometry = TokenGeometry(shape[0] * shape[1], 0, (shape[0], shape[1]))
        else:
            kind, layout, units = "conv", "nchw", shape[0]
        layers.append(LayerInfo(
            name=canonical, module_type=type(modules[canonical]).__name__, kind=kind, units=units,
            output_shape=shape, aliases=tuple(n for n in names if n != canonical), layout=layout,
            output_index=exposed[canonical][0], geometry=geometry,
        ))
    return layers, skipped
