"""Built-in models that train on the spot from data shipped offline, cached by a hash of their recipe.

``digits-cnn``: a LeNet-style CNN on scikit-learn's digits upsampled to 28x28 (pixels in [0, 1]).
``digits-vit``: a small vision transformer on the same data (4x4 patches, a class token, 4 blocks).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ldam_sweep.data import digits
from ldam_sweep.errors import ModelError, did_you_mean
from ldam_sweep.spec import InputSpec


class DigitsCNN(nn.Module):
    """LeNet-style: two 5x5 conv + ReLU + max-pool stages, then two linear layers to 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class ViTBlock(nn.Module):
    """A pre-norm transformer encoder block, laid out like torchvision's ``EncoderBlock``:
    ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``; ``mlp.1`` (GELU) is the hidden activation."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class DigitsViT(nn.Module):
    """A small ViT for 28x28 digits: 4x4 patches (a 7x7 grid) embedded to 64 features, a class
    token and learned positions (50 tokens), 4 blocks with 4 heads and a 128-unit MLP, a final
    layer norm, and a linear head on the class token."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128, patch: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        grid = 28 // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.norm(self.blocks(x))[:, 0])

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.cls_token)
        nn.init.normal_(self.pos_embedding, std=0.02)


@dataclass(frozen=True)
class TrainRecipe:
    """Everything that determines the trained weights; its hash keys the cache file."""

    architecture: str = "DigitsCNN-v1"
    data: str = "sklearn-digits-28px-split0"
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    ema_tau: float | None = None  # keep theta_bar <- (1 - 1/tau) theta_bar + theta / tau after every step
    optimizer: str = "adam"  # "adamw": AdamW with a one-cycle learning-rate schedule peaking at lr
    shift: int = 0  # augmentation: each batch rolled by up to this many pixels in x and y

    def key(self) -> str:
        fields = asdict(self)
        for name, default in (("optimizer", "adam"), ("shift", 0)):  # fields added later: old keys stay valid
            if fields[name] == default:
                del fields[name]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class ZooEntry:
    build: Callable[[], nn.Module]
    input: InputSpec
    recipe: TrainRecipe
    description: str


DIGITS_INPUT = InputSpec(channels=1, height=28, width=28, range=(0.0, 1.0), mean=(0.0,), std=(1.0,))

ZOO: dict[str, ZooEntry] = {
    "digits-cnn": ZooEntry(
        build=DigitsCNN,
        input=DIGITS_INPUT,
        recipe=TrainRecipe(),
        description="LeNet-style CNN on scikit-learn digits at 28x28, trained on first use (~10 s)",
    ),
    "digits-cnn-ema": ZooEntry(
        build=DigitsCNN,
        input=DIGITS_INPUT,
        recipe=TrainRecipe(ema_tau=50.0),
        description="the same training run as digits-cnn (same seed and data), exponential moving average "
                    "of the weights with tau = 50 steps (the last ~2 of 12 epochs)",
    ),
    "digits-vit": ZooEntry(
        build=DigitsViT,
        input=DIGITS_INPUT,
        recipe=TrainRecipe(architecture="DigitsViT-v1", epochs=30, lr=2e-3, weight_decay=0.05, optimizer="adamw",
                           shift=1),
        description="small vision transformer (4x4 patches, class token, 4 blocks of 64 features) on scikit-learn "
                    "digits at 28x28, trained on first use (~20 s)",
    ),
}


def cache_dir() -> Path:
    """Where trained zoo weights live: $LDAM_SWEEP_CACHE, else the user cache dir."""
    env = os.environ.get("LDAM_SWEEP_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ldam-sweep"))


def zoo_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        names = sorted(ZOO)
        raise ModelError(f"unknown zoo model {name!r}; available: {', '.join(names)}.{did_you_mean(name, names)}")
    return ZOO[name]


def zoo_class_names(name: str) -> list[str]:
    """The output classes of a zoo model: every one is trained on the digits, so "0".."9"."""
    zoo_entry(name)
    return [str(d) for d in range(10)]


def load_zoo_model(name: str, *, log: Callable[[str], None] | None = None) -> tuple[nn.Module, InputSpec, dict]:
    """The trained zoo model (training it once and caching), its input spec and its training metrics."""
    entry = zoo_entry(name)
    path = cache_dir() / "zoo" / f"{name}-{entry.recipe.key()}.pt"
    net = entry.build()
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(blob["state_dict"])
            return net.eval(), entry.input, dict(blob["metrics"])
        except Exception as err:  # a torn or stale cache file is retrained, never trusted
            if log:
                log(f"cached {path} unreadable ({err}); retraining")
    if log:
        log(f"training zoo model {name!r} (recipe {entry.recipe.key()}) ...")
    metrics = train_digits_model(net, entry.recipe)  # with ema_tau, net ends up holding the averaged weights
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": net.state_dict(), "metrics": metrics}, tmp)
    os.replace(tmp, path)  # atomic: concurrent trainers (e.g. several actors) never see a torn file
    if log:
        log(f"trained {name!r}: test accuracy {metrics['test_accuracy']:.3f} in {metrics['train_seconds']:.1f}s")
    return net.eval(), entry.input, metrics


def train_digits_model(net: nn.Module, recipe: TrainRecipe) -> dict:
    """Train on the fixed digits train split (Adam, or AdamW with a one-cycle schedule); returns
    test accuracy and time."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    for m in net.modules():  # re-initialise deterministically from the recipe seed
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif isinstance(m, nn.MultiheadAttention):
            m._reset_parameters()
    x_train, y_train = (torch.from_numpy(a) for a in digits(28, "train"))
    x_test, y_test = (torch.from_numpy(a) for a in digits(28, "test"))
    n = len(y_train)
    schedule = None
    if recipe.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=recipe.lr, total_steps=recipe.epochs * -(-n // recipe.batch_size), pct_start=0.15)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    net.train()
    ema = None
    if recipe.ema_tau is not None:
        ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for _ in range(recipe.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, recipe.batch_size):
            idx = perm[i : i + recipe.batch_size]
            xb = x_train[idx]
            if recipe.shift:
                shifts = torch.randint(-recipe.shift, recipe.shift + 1, (2,), generator=gen).tolist()
                xb = torch.roll(xb, shifts=shifts, dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            if ema is not None:
                with torch.no_grad():
                    for k, v in net.state_dict().items():
                        ema[k].mul_(1 - 1 / recipe.ema_tau).add_(v, alpha=1 / recipe.ema_tau)
    net.eval()
    extra = {}
    with torch.no_grad():
        acc = float((net(x_test).argmax(1) == y_test).float().mean())
        if ema is not None:
            extra["raw_test_accuracy"] = acc
            net.load_state_dict(ema)
            acc = float((net(x_test).argmax(1) == y_test).float().mean())
    return {
        **extra,
        "test_accuracy": acc,
        "train_seconds": time.perf_counter() - t0,
        "recipe": json.dumps(asdict(recipe), sort_keys=True),
        "n_train": int(n),
        "n_test": int(len(y_test)),
    }


def class_max_logits(net: nn.Module, split: str = "test") -> np.ndarray:
    """Per class, the largest logit that class reaches over the real digits of ``split`` (10,)."""
    x, _ = digits(28, split)  # type: ignore[arg-type]
    with torch.no_grad():
        return net(torch.from_numpy(x)).max(0).values.numpy()
