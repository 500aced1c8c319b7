"""Real-data sources. Images are float32 arrays (N, C, H, W) in the model's pixel range.

Only scikit-learn's 8x8 digits ship offline; they are upsampled to the demo model's 28x28 input.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ldam_sweep.errors import DataError

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25

Split = Literal["train", "test", "all"]


def digits(size: int = 28, split: Split = "all") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images (N, 1, size, size) in [0, 1], labels (N,) int64).

    The train/test split is stratified and fixed (seed 0, 25% test), so every part of the project
    that says "held-out digits" means the same 450 images.
    """
    if split not in ("train", "test", "all"):
        raise DataError(f"digits split {split!r} is not one of 'train', 'test', 'all'")
    if not isinstance(size, int) or size < 8:
        raise DataError(f"digits size must be an integer >= 8 (the source is 8x8), got {size!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).numpy()
    labels = bunch.target.astype(np.int64)
    if split == "all":
        return images, labels
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    pick = np.sort(train_idx if split == "train" else test_idx)
    return images[pick], labels[pick]
