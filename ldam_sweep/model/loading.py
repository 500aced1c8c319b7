"""Load a model from a ModelSpec: zoo name, torchvision architecture, ``module:factory`` or TorchScript.

Weight files are read with ``torch.load(weights_only=True)``: loading never runs code from a file.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldam_sweep.errors import ModelError, did_you_mean
from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.model.zoo import load_zoo_model, zoo_class_names
from ldam_sweep.spec import InputSpec, ModelSpec, parse_model_spec

RANDOM_WEIGHTS_SEED = 0  # torchvision models without a weights file: the same random network in every process

IMAGENET_INPUT = InputSpec(
    channels=3, height=224, width=224, range=(0.0, 1.0),
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
)


class RandomWeightsWarning(UserWarning):
    """A torchvision model was built without a weights file: its units respond to nothing learned."""


def default_device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def load_model(
    spec: ModelSpec | dict[str, Any] | str | nn.Module | ModelHandle,
    *,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
    input: InputSpec | dict[str, Any] | tuple[int, int, int] | None = None,
) -> ModelHandle:
    """Load the model a spec names and discover its layers. ``device``: default cuda:0 when present.

    ``spec`` may also be your own ``torch.nn.Module`` (as torch-lucent and captum take it): then
    ``input`` says what images it takes -- ``(C, H, W)`` in [0, 1], or an ``InputSpec``/dict with
    ``range``, ``mean`` and ``std`` (the normalisation the module expects, applied inside the
    handle). torchvision's models default to ImageNet's 224 px input. A ``ModelHandle`` passes through."""
    if isinstance(spec, ModelHandle):
        return spec if device is None else spec.to(device)
    if isinstance(spec, nn.Module):
        return module_handle(spec, input, device)
    spec = parse_model_spec(spec)
    if spec.module:
        raise ModelError(f"the model {spec.module!r} was given as a live torch.nn.Module, which a spec cannot load: pass "
                         "the module itself (ls.load_model(module, input=...), Finder(st, model=...), or --model SPEC)")
    dev = torch.device(device) if device is not None else default_device()
    metadata: dict[str, Any] = {"source": spec.source}
    scripted = False
    if spec.zoo:
        net, input_spec, metrics = load_zoo_model(spec.zoo, log=log)
        metadata["train_metrics"] = metrics
    elif spec.torchvision:
        net, input_spec = _torchvision(spec)
    elif spec.factory:
        net = _factory(spec)
        assert spec.input is not None
        input_spec = spec.input
    else:
        assert spec.torchscript is not None and spec.input is not None
        net = _torchscript(spec.torchscript)
        input_spec = spec.input
        scripted = True
    if spec.input is not None:
        input_spec = spec.input
    if spec.weights is not None:
        metadata["weights"] = str(spec.weights)
    handle = ModelHandle(net, input_spec, name=spec.source, device=dev, metadata=metadata, scripted=scripted,
                         memory_format=spec.memory_format, precision=spec.precision, class_names=class_names(spec))
    outputs = [layer.units for layer in handle.layers if layer.kind == "logit"]
    if spec.labels is not None and handle.class_names is not None and outputs and outputs[0] != len(handle.class_names):
        raise ModelError(f"model.labels: {str(spec.labels)!r} names {len(handle.class_names)} classes, but the model has "
                         f"{outputs[0]} outputs: give one class name per line, one line per output")
    return handle


def parse_input(input: InputSpec | dict[str, Any] | tuple[int, int, int] | list[int]) -> InputSpec:
    """An InputSpec from an InputSpec, a dict of its fields, or a (C, H, W) shape (range [0, 1], no normalisation)."""
    if isinstance(input, InputSpec):
        return input
    if isinstance(input, (tuple, list)):
        if len(input) != 3 or not all(isinstance(v, int) and v > 0 for v in input):
            raise ModelError(f"input must be (channels, height, width), got {tuple(input)!r}")
        return InputSpec(channels=input[0], height=input[1], width=input[2])
    if isinstance(input, dict):
        try:
            return InputSpec.model_validate(input)
        except Exception as err:
            raise ModelError(f"input {input!r} is not an input spec: {err}") from None
    raise ModelError(f"input must be (C, H, W), a dict or an InputSpec, got {type(input).__name__}")


def module_handle(net: nn.Module, input: Any, device: torch.device | str | None = None) -> ModelHandle:
    """A handle on the caller's own module (``load_model(module, input=...)``); named by its class,
    with ``module`` as its spec's source (a sweep records it; a reader must be given the module again)."""
    cls = type(net)
    torchvision_model = cls.__module__.startswith("torchvision.models")
    if input is None and not torchvision_model:
        raise ModelError(f"ls.load_model({cls.__name__} module) needs input=(C, H, W) (images in [0, 1]), or a dict with "
                         "channels, height, width and the range, mean and std the module expects: the shape of the "
                         "images it takes cannot be read off a module")
    input_spec = IMAGENET_INPUT if input is None else parse_input(input)
    dev = torch.device(device) if device is not None else default_device()
    name = f"module:{cls.__module__}.{cls.__qualname__}"
    return ModelHandle(net, input_spec, name=name, device=dev, metadata={"source": name},
                       scripted=isinstance(net, torch.jit.ScriptModule))


def class_names(spec: ModelSpec) -> list[str] | None:
    """The model's output class names: the spec's ``labels`` file (one per line), else the zoo's
    (digits models: "0".."9"), else ImageNet's for a torchvision classifier with 1000 outputs
    (from torchvision's weight metadata, on disk); None when unknown (classes are then numbered)."""
    if spec.labels is not None:
        try:
            names = [line.strip() for line in Path(spec.labels).read_text().splitlines() if line.strip()]
        except OSError as err:
            raise ModelError(f"model.labels: cannot read {str(spec.labels)!r}: {err}") from None
        if not names:
            raise ModelError(f"model.labels: {str(spec.labels)!r} names no class (one class name per line)")
        return names
    if spec.zoo:
        return zoo_class_names(spec.zoo)
    if spec.torchvision and spec.kwargs.get("num_classes", 1000) == 1000:
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(spec.torchvision)
            return list(next(iter(weights)).meta["categories"])
        except (ValueError, KeyError, StopIteration):
            return None
    return None


SAVE_STATE_DICT = "save only the tensors with `torch.save(model.state_dict(), path)`"


def torch_file_error(what: str, err: Exception, save_hint: str = SAVE_STATE_DICT) -> str:
    """A complete, actionable message for a file ``torch.load(weights_only=True)`` refused: what was
    wrong (pickled objects and which class, or not a PyTorch file at all) and what to save instead.
    Never suggests ``weights_only=False``: that would run code from the file."""
    text = str(err)
    found = re.findall(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"{what} cannot be read: it holds pickled Python objects ({', '.join(dict.fromkeys(found))}), which "
                f"ldam-sweep never loads (weights_only=True: a file must not run code); {save_hint}")
    if "zip archive" in text or "central directory" in text:
        return f"{what} cannot be read: it is truncated or damaged (not a complete PyTorch zip archive); {save_hint}"
    # torch's own advice (rerun with weights_only=False, read the docs) is not ours to repeat
    reason = text.split("WeightsUnpickler error:", 1)[-1]
    kept = [p.strip() for p in re.split(r"\n\s*\n", reason) if p.strip() and "weights_only" not in p
            and "documentation of torch.load" not in p]
    detail = " ".join(kept[0].split()) if kept else "unreadable"
    return f"{what} cannot be read: it is not a file torch.save wrote ({type(err).__name__}: {detail}); {save_hint}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, safely (``weights_only=True``); accepts a bare state dict or one
    wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` (common checkpoint layouts)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file {str(p)!r} does not exist")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(torch_file_error(f"weights file {str(p)!r}", err)) from None
    if isinstance(blob, dict):
        for key in ("state_dict", "model"):
            if key in blob and isinstance(blob[key], dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ModelError(f"weights file {str(p)!r} does not hold a state dict (a mapping of names to tensors); "
                         f"{SAVE_STATE_DICT}")
    return blob


def apply_state_dict(net: nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    if any(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in net.state_dict()):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ModelError(f"weights file {str(path)!r} does not fit the model: {str(err)[:500]}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ModelError(
            f"weights file {str(path)!r} does not fit the model: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )


def _torchvision(spec: ModelSpec) -> tuple[nn.Module, InputSpec]:
    import torchvision

    name = spec.torchvision
    assert name is not None
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ModelError(
            f"unknown torchvision model {name!r}; see torchvision.models.list_models() "
            f"({len(names)} classification models).{did_you_mean(name, names)}"
        )
    # random initial weights from a fixed seed (the global RNG left as it was): the driver and every
    # worker of a sweep build the same network, so a random-weights sweep is one network, and resumes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        net = torchvision.models.get_model(name, weights=None, **spec.kwargs)
    if spec.weights is None:
        warnings.warn(
            f"torchvision model {name!r} has no weights file: using RANDOM weights. "
            "Give `weights: path/to/state_dict.pth` to visualise a trained network.",
            RandomWeightsWarning,
            stacklevel=3,
        )
    else:
        apply_state_dict(net, spec.weights)
    return net, IMAGENET_INPUT


def _factory(spec: ModelSpec) -> nn.Module:
    assert spec.factory is not None
    mod_name, fn_name = spec.factory.split(":")
    module = import_factory_module(mod_name, spec._search)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"factory {spec.factory!r}: module {mod_name!r} has no callable {fn_name!r}")
    net = fn(**spec.kwargs)
    if not isinstance(net, nn.Module):
        raise ModelError(f"factory {spec.factory!r} returned {type(net).__name__}, not a torch.nn.Module")
    if spec.weights is not None:
        apply_state_dict(net, spec.weights)
    return net


def import_factory_module(name: str, search: tuple[str, ...] = ()) -> Any:
    """Import a factory's module: from sys.path, else from the folders a spec file names (its own
    folder: a ``mynet.py`` beside the spec) and the working folder, which are then kept on sys.path
    (the module's own imports may need them). The error names every folder searched."""
    top = name.split(".")[0]
    folders = [f for f in dict.fromkeys([*search, os.getcwd()]) if f]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != top:  # the module was found; something it imports is missing
            raise ModelError(f"factory module {name!r} was found but cannot be imported: {err}") from None
    except ImportError as err:
        raise ModelError(f"factory module {name!r} cannot be imported: {err}") from None
    for folder in folders:
        if Path(folder, top + ".py").is_file() or Path(folder, top, "__init__.py").is_file():
            if folder not in sys.path:
                sys.path.insert(0, folder)
            try:
                return importlib.import_module(name)
            except ImportError as err:
                raise ModelError(f"factory module {name!r} (in {folder}) cannot be imported: {err}") from None
    where = ", ".join(folders + ["sys.path"])
    raise ModelError(f"factory module {name!r} cannot be imported: no {top}.py or {top}/ package in {where}. Put "
                     f"{top}.py beside the job spec, install its package, or add its folder to PYTHONPATH")


def _torchscript(path: Path) -> nn.Module:
    if not Path(path).is_file():
        raise ModelError(f"TorchScript file {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
        raise ModelError(f"TorchScript file {str(path)!r} could not be loaded ({type(err).__name__}: {first}); save a "
                         "TorchScript model with `torch.jit.save(torch.jit.script(model), path)`, or give a state dict "
                         "as `weights:` with a torchvision or factory model") from None
