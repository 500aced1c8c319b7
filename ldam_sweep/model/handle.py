"""ModelHandle: a network in eval mode with frozen weights, its input spec, its layers, and a
forward pass that stops at the target layer."""

from __future__ import annotations

import hashlib
from functools import cached_property

import numpy as np
import torch
from torch import nn

from ldam_sweep.errors import LayerError, ModelError, did_you_mean
from ldam_sweep.model.discovery import LayerInfo, SkippedModule, discover, pick_output, unit_first
from ldam_sweep.spec import InputSpec


class _StopForward(Exception):
    """Raised by the target layer's hook to end the forward pass there."""


class ModelHandle:
    """A loaded model, ready for sampling.

    Chains live in pixel space (``input.range``); normalisation ``(x - mean) / std`` happens here,
    inside ``activations``. Weights never require grad: only the input gets gradients.
    """

    def __init__(
        self,
        net: nn.Module,
        input_spec: InputSpec,
        *,
        name: str,
        device: torch.device | str = "cpu",
        metadata: dict | None = None,
        scripted: bool = False,
        memory_format: str = "auto",
        precision: str = "float32",
        class_names: list[str] | None = None,
    ) -> None:
        self.name = name
        self.class_names = class_names  # the output classes' names (None: numbered), for the network's reading of samples
        self.input = input_spec
        self.device = torch.device(device)
        self.metadata = dict(metadata or {})
        self.scripted = scripted
        self.net = net.to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        if memory_format not in ("auto", "contiguous", "channels_last"):
            raise ModelError(f"memory_format must be auto, contiguous or channels_last, got {memory_format!r}")
        if memory_format == "channels_last" and scripted:
            raise ModelError("memory_format channels_last is not supported for TorchScript models (their weights "
                             "cannot be re-laid out); use auto or contiguous")
        has_conv = any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        self._set_format("channels_last" if memory_format == "channels_last" or (memory_format == "auto" and has_conv)
                         else "contiguous")
        if precision not in ("float32", "bf16"):
            raise ModelError(f"precision must be float32 or bf16, got {precision!r}")
        self.precision = precision
        c = input_spec.channels
        self._mean = torch.tensor(input_spec.mean, dtype=torch.float32, device=self.device).expand(c).reshape(1, c, 1, 1).clone()
        self._std = torch.tensor(input_spec.std, dtype=torch.float32, device=self.device).expand(c).reshape(1, c, 1, 1).clone()
        self._modules = dict(self.net.named_modules())
        self.skipped: list[SkippedModule] = []  # modules that ran but are not layers, with the reason
        try:
            self.layers: list[LayerInfo] = self._discover()
        except ModelError:
            # auto: a model that calls .view() on conv outputs (LeNet-style) cannot run NHWC; fall back
            if memory_format != "auto" or self.memory_format == "contiguous":
                raise
            self._set_format("contiguous")
            self.layers = self._discover()
        self._by_name = {layer.name: layer for layer in self.layers}
        for layer in self.layers:
            for alias in layer.aliases:
                self._by_name.setdefault(alias, layer)

    def _set_format(self, memory_format: str) -> None:
        self.memory_format = memory_format
        self._format = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        if not self.scripted:
            self.net.to(memory_format=self._format)

    # -- discovery ---------------------------------------------------------------------------
    def _discover(self) -> list[LayerInfo]:
        lo, hi = self.input.range
        example = torch.full((1, *self.input.shape), (lo + hi) / 2, device=self.device)
        try:
            if self.scripted:
                with torch.no_grad():
                    out = self.net(self.normalize(example))
                if not (isinstance(out, torch.Tensor) and out.dim() == 2):
                    raise ModelError(f"TorchScript model {self.name!r} must return a (batch, classes) tensor")
                return [LayerInfo("output", type(self.net).__name__, "logit", int(out.shape[1]), (int(out.shape[1]),))]
            layers, self.skipped = discover(self.net, self.normalize(example))
        except ModelError:
            raise
        except Exception as err:
            hint = (" If the model calls .view() on conv outputs, set memory_format: contiguous (it runs with "
                    "channels_last now)." if self.memory_format == "channels_last" else "")
            raise ModelError(
                f"model {self.name!r} failed on an input of shape (1, {', '.join(map(str, self.input.shape))}) "
                f"from its input spec: {type(err).__name__}: {err}. Check the input section "
                f"(channels, height, width) against what the model expects.{hint}"
            ) from None
        if not layers:
            raise ModelError(f"model {self.name!r} has no layer with a (B, C, H, W), (B, T, D) or (B, F) float output")
        return layers

    # -- lookups -----------------------------------------------------------------------------
    def layer(self, name: str) -> LayerInfo:
        """The layer called ``name`` (or one of its aliases); LayerError lists valid names."""
        try:
            return self._by_name[name]
        except KeyError:
            names = [layer.name for layer in self.layers]
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
            raise LayerError(
                f"unknown layer {name!r} in model {self.name!r}; valid layers: {shown}."
                f"{did_you_mean(name, list(self._by_name))}"
            ) from None

    def check_units(self, layer: str, units: int | list[int] | range | np.ndarray) -> np.ndarray:
        """Unit indices as an int64 array, each checked against the layer's unit range."""
        info = self.layer(layer)
        arr = np.atleast_1d(np.asarray(units))
        if arr.size == 0:
            raise LayerError(f"no units given for layer {info.name!r} (it has units 0..{info.units - 1})")
        if not np.issubdtype(arr.dtype, np.integer):
            raise LayerError(f"units for layer {info.name!r} must be integers, got {arr.dtype} values")
        bad = arr[(arr < 0) | (arr >= info.units)]
        if bad.size:
            raise LayerError(
                f"unit {int(bad[0])} is out of range for layer {info.name!r}: "
                f"valid units are 0..{info.units - 1} ({info.units} units)"
            )
        return arr.astype(np.int64).reshape(-1)

    # -- forward -----------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std``, laid out in the handle's memory format (channels_last convs run
        1.2-2x faster on CPU; see benchmarks/README.md)."""
        return ((x - self._mean) / self._std).contiguous(memory_format=self._format)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input.shape:
            raise ModelError(
                f"input of shape {tuple(x.shape)} does not match model {self.name!r}: "
                f"expected (batch, {', '.join(map(str, self.input.shape))})"
            )

    def activations(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """The target layer's output for pixel-space images x, units on dimension 1 ((B, C, H, W),
        (B, F), or (B, D, T) for token layers); the forward stops at that layer.

        A hook on the target module alone captures its output and raises to end the pass; it is
        removed in ``finally`` whatever happens.
        """
        info = self.layer(layer)
        if info.kind == "logit" and (self.scripted or info.name not in self._modules):
            return self.forward(x)
        z = self.normalize(x)
        captured: list[torch.Tensor] = []

        def hook(_mod: nn.Module, _inp: object, out: object) -> None:
            captured.append(pick_output(out, info.output_index))
            raise _StopForward

        handle = self._modules[info.name].register_forward_hook(hook)
        try:
            with self._autocast():
                self.net(z)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ModelError(f"layer {info.name!r} did not run during the forward pass")
        return unit_first(captured[0], info.layout).float()

    def activations_at(self, x: torch.Tensor, layers: "list[str] | tuple[str, ...]") -> dict[str, torch.Tensor]:
        """Several layers' outputs from one forward pass, stopped once the last of them has run
        (``activations`` for one layer). Outputs are copied, so a later in-place op cannot change them."""
        names = list(dict.fromkeys(self.layer(n).name for n in layers))
        whole = [n for n in names if self.layer(n).kind == "logit" and (self.scripted or n not in self._modules)]
        hooked = [n for n in names if n not in whole]
        captured: dict[str, torch.Tensor] = {}

        def hook_for(name: str):
            def hook(_mod: nn.Module, _inp: object, out: object) -> None:
                captured[name] = pick_output(out, self.layer(name).output_index).detach().clone()
                if not whole and len(captured) == len(hooked):
                    raise _StopForward
            return hook

        handles = [self._modules[n].register_forward_hook(hook_for(n)) for n in hooked]
        try:
            with self._autocast():
                output = self.net(self.normalize(x))
            for n in whole:
                captured[n] = output
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in captured]
        if missing:
            raise ModelError(f"layer(s) {missing} did not run during the forward pass")
        return {n: unit_first(captured[n], self.layer(n).layout).float() for n in names}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's class logits (N, classes) for pixel-space images, float32; None when the model
        is not a classifier (its output is not one (N, classes) tensor that discovery calls a logit layer)."""
        if not any(layer.kind == "logit" for layer in self.layers):
            return None
        with self._autocast():
            out = self.net(self.normalize(x))
        return out.float() if isinstance(out, torch.Tensor) and out.ndim == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole model on pixel-space images (normalisation included); float32 out."""
        with self._autocast():
            return self.net(self.normalize(x)).float()

    # -- identity ----------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """sha256 over parameter and buffer names, dtypes, shapes and bytes (stable across devices)."""
        h = hashlib.sha256()
        for key, t in sorted(self.net.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def to(self, device: torch.device | str) -> "ModelHandle":
        """Move the model (and normalisation constants) to ``device``; returns self."""
        self.device = torch.device(device)
        self.net.to(self.device)
        self._mean = self._mean.to(self.device)
        self._std = self._std.to(self.device)
        return self

    def __repr__(self) -> str:
        return f"ModelHandle({self.name!r}, input={self.input.shape}, layers={len(self.layers)}, device={self.device})"


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names and bytes, in name order): the digest a store's manifest
    stamps into each row of the frozen models (discriminator, score prior) it was sampled with."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
