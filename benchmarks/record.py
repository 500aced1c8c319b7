"""Shared by the benchmark scripts: print a record's numbers as a table and write it as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def report(title: str, record: dict, keys: list[str] | tuple[str, ...], out: str | Path, fmt: str = "10.3f") -> None:
    print(title)
    for key in keys:
        print(f"  {key:28s} {record[key]:{fmt}}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


def load_bench_model(model: str, size: int | None, device: str | None, **options):
    """The model a benchmark names: a zoo name, or ``torchvision:NAME`` (random weights, ImageNet
    normalisation, ``size`` px when given); ``options``: more model-spec fields (memory_format, precision)."""
    import warnings

    import ldam_sweep as ls

    spec: dict = {"zoo": model, **options}
    if model.startswith("torchvision:"):
        spec = {"torchvision": model.split(":", 1)[1], **options}
        if size:
            spec["input"] = {"channels": 3, "height": size, "width": size,
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
            if spec["torchvision"].startswith("vit_") and size != 224:  # ViTs size their position embedding
                spec["kwargs"] = {"image_size": size}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ls.RandomWeightsWarning)
        return ls.load_model(spec, device=device)


def chain_steps_done(result) -> int:
    """Chain-steps a sampler result really holds (units x chains x steps, read from its trace), so a
    record's rates and work counts come from what ran, not from the arguments."""
    units, chains, trace = result.activation.shape
    return units * chains * (trace - 1)


def sync(device) -> None:
    """Wait for queued GPU work before reading a clock (no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
