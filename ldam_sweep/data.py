"""Real-data sources. Images are float32 arrays (N, C, H, W) in the model's pixel range.

Only scikit-learn's 8x8 digits ship offline; they are upsampled to the demo model's 28x28 input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ldam_sweep.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def fit_images(images: np.ndarray, input_spec: Any, *, what: str) -> np.ndarray:
    """Check (N, C, H, W) float images against an input spec: shape and pixel range."""
    c, h, w = input_spec.shape
    lo, hi = input_spec.range
    if images.ndim != 4 or images.shape[1:] != (c, h, w):
        raise DataError(f"{what}: images have shape {tuple(images.shape)}, the model takes (N, {c}, {h}, {w})")
    if len(images) == 0:
        raise DataError(f"{what}: no images")
    if not np.isfinite(images).all():
        raise DataError(f"{what}: images contain NaN or infinite values")
    mn, mx = float(images.min()), float(images.max())
    if mn < lo - 1e-6 or mx > hi + 1e-6:
        raise DataError(f"{what}: values span [{mn:.4g}, {mx:.4g}], outside the model's pixel range [{lo}, {hi}]")
    return images.astype(np.float32, copy=False)


def _to_pixels(img: "Image.Image", input_spec: Any) -> np.ndarray:
    """A PIL image -> (C, H, W) float in the spec's range: resize the short side, centre-crop."""
    from PIL import Image

    c, h, w = input_spec.shape
    img = img.convert("L" if c == 1 else "RGB")
    scale = max(h / img.height, w / img.width)
    size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(size, Image.BILINEAR)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    arr = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    if c not in (1, 3):
        raise DataError(f"image folders give 1 (grey) or 3 (RGB) channels; the model takes {c}")
    lo, hi = input_spec.range
    return lo + (hi - lo) * arr


def image_folder(path: str | Path, input_spec: Any, limit: int | None = None) -> np.ndarray:
    """Every PNG/JPEG/BMP/WebP under ``path`` (recursive, sorted), resized and centre-cropped to the
    model input and converted to its channel count."""
    root = Path(path)
    out = [load_image(f, input_spec) for f in image_files(root)[:limit]]
    return fit_images(np.stack(out), input_spec, what=f"image folder {str(root)!r}")


def image_files(path: str | Path) -> list[Path]:
    """The image files under a folder (recursive, sorted by path), as ``image_folder`` reads them."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)")
    return files


def load_image(path: str | Path, input_spec: Any) -> np.ndarray:
    """One image file as (C, H, W) in the model's pixel range: resized, centre-cropped, channel-converted."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return _to_pixels(img, input_spec)
    except FileNotFoundError:
        raise DataError(f"image file {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"image file {str(path)!r} cannot be read: {err}") from None


def _load_npy(p: Path, what: str) -> np.ndarray:
    """A .npy file loaded without pickle (no code runs); DataError naming ``what`` it is for."""
    if not p.is_file():
        raise DataError(f"{what}.npy file {str(p)!r} does not exist")
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{what}.npy file {str(p)!r} cannot be read as a numeric array (loaded without pickle): {err}") from None


def npy_images(path: str | Path, input_spec: Any) -> np.ndarray:
    """A .npy array of images (N, C, H, W), already in the model's pixel range (loaded without pickle)."""
    p = Path(path)
    arr = _load_npy(p, "")
    if arr.ndim == 4 and arr.shape[1] != input_spec.channels and arr.shape[-1] == input_spec.channels:
        raise DataError(f".npy file {str(p)!r} looks channels-last {arr.shape}; save it as (N, C, H, W)")
    if arr.ndim == 4 and arr.shape[1] != input_spec.channels:
        raise DataError(f".npy file {str(p)!r} has {arr.shape[1]} channels, the model takes {input_spec.channels}")
    return fit_images(np.asarray(arr, dtype=np.float32), input_spec, what=f".npy file {str(p)!r}")


def photo_crops(input_spec: Any, n: int, split: Split = "train", seed: int = 0) -> np.ndarray:
    """Random crops of scikit-learn's two sample photographs (china.jpg, flower.jpg), resized to the
    model input. Crops of the left 3/4 of each photo are "train", of the right 1/4 "test", so
    held-out crops never overlap training pixels."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if split not in ("train", "test"):
        raise DataError(f"photo_crops split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
    photos = load_sample_images().images
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        ph, pw = photo.shape[:2]
        x0, x1 = (0, pw * 3 // 4) if split == "train" else (pw * 3 // 4, pw)
        side = int(rng.integers(min(ph, x1 - x0) // 4, min(ph, x1 - x0) + 1))
        top = int(rng.integers(0, ph - side + 1))
        left = int(rng.integers(x0, x1 - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        out.append(_to_pixels(crop, input_spec))
    return fit_images(np.stack(out), input_spec, what="photo crops")


def real_images(source: Any, input_spec: Any, split: Split = "train") -> np.ndarray:
    """Images of a DataSpec (``ldam_sweep.spec.DataSpec``) for the given split, fitted to the model.

    digits: the fixed 25% held-out split; photos: disjoint regions; folder / npy: every 4th
    image (by sorted order) is held out.
    """
    return real_data(source, input_spec, split)[0]


def real_data(source: Any, input_spec: Any, split: Split = "train") -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """(images, labels, class names) of a DataSpec for the given split, as ``real_images`` splits
    them. Labels are class indices into the names, or None for unlabelled data: digits (the digit),
    a folder whose every image sits in a class subfolder (the subfolder's name: torchvision's
    ImageFolder convention), an npy source with a ``labels`` array; photos have none."""
    c, h, w = input_spec.shape
    lo, hi = input_spec.range
    if source.source == "digits":
        if h != w or c not in (1, 3):
            raise DataError(f"digits need a square 1- or 3-channel input, the model takes {input_spec.shape}")
        imgs, labels = digits(h, split)
        imgs = np.repeat(imgs, c, axis=1) if c == 3 else imgs
        imgs = lo + (hi - lo) * imgs
        n = source.limit or len(imgs)
        return fit_images(imgs[:n], input_spec, what="digits"), labels[:n], [str(d) for d in range(10)]
    if source.source == "photos":
        return photo_crops(input_spec, source.count if split != "test" else max(64, source.count // 4),
                           "test" if split == "test" else "train", seed=source.seed), None, None
    return _pick_split(source, *_load_files(source, input_spec), split)


def real_data_and_queries(source: Any, input_spec: Any) -> tuple[tuple[np.ndarray, np.ndarray | None, list[str] | None], np.ndarray]:
    """``real_data(source, input_spec, "train")`` and the held-out split's images, a folder or .npy
    source read once (a sweep's worker needs both: the pool, and the observer's query images)."""
    if source.source not in ("folder", "npy"):
        return real_data(source, input_spec, "train"), real_data(source, input_spec, "test")[0]
    loaded = _load_files(source, input_spec)
    return _pick_split(source, *loaded, "train"), _pick_split(source, *loaded, "test")[0]


def _load_files(source: Any, input_spec: Any) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Every image of a folder or .npy source, its labels and class names."""
    if source.source == "folder":
        imgs = image_folder(source.path, input_spec)
        labels, names = folder_labels(source.path)
    else:
        imgs = npy_images(source.path, input_spec)
        labels, names = npy_labels(source.labels, len(imgs)) if getattr(source, "labels", None) else (None, None)
    return imgs, labels, names


def _pick_split(source: Any, imgs: np.ndarray, labels: np.ndarray | None, names: list[str] | None,
                split: Split) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """A folder or .npy source's split: every 4th image (by sorted order) held out."""
    if split == "all":
        pick = np.arange(len(imgs))
    else:
        held = np.zeros(len(imgs), dtype=bool)
        held[3::4] = True
        if held.sum() == 0 or (~held).sum() == 0:
            raise DataError(f"{source.source} {str(source.path)!r} has {len(imgs)} image(s); at least 4 are needed for a held-out split")
        pick = np.flatnonzero(held if split == "test" else ~held)
    pick = pick[: source.limit] if source.limit else pick
    return imgs[pick], None if labels is None else labels[pick], names


def folder_labels(path: str | Path) -> tuple[np.ndarray | None, list[str] | None]:
    """Class indices of ``image_files(path)`` (in that order) and the class names: the first-level
    subfolder each image sits in, names sorted. (None, None) when any image is not in a subfolder,
    or when there is only one subfolder."""
    root = Path(path)
    files = image_files(root)
    tops = [f.relative_to(root).parts for f in files]
    if any(len(parts) < 2 for parts in tops):
        return None, None
    names = sorted({parts[0] for parts in tops})
    if len(names) < 2:  # one subfolder (e.g. train/) is a place, not a class
        return None, None
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[parts[0]] for parts in tops], dtype=np.int64), names


def npy_labels(path: str | Path, n: int) -> tuple[np.ndarray, list[str]]:
    """An npy source's labels: a 1-D .npy of N integers or strings (loaded without pickle), one per
    image; class names are the sorted distinct values as text."""
    p = Path(path)
    arr = _load_npy(p, "data.labels: ")
    if arr.ndim != 1 or len(arr) != n or arr.dtype.kind not in "iuU":
        raise DataError(f"data.labels: {str(p)!r} must be a 1-D array of {n} integers or strings (one per image), "
                        f"got shape {arr.shape} dtype {arr.dtype}")
    text = arr.astype(str)
    names = [str(v) for v in sorted(set(arr.tolist()))]  # integers in numeric order, strings in text order
    index = {v: i for i, v in enumerate(names)}
    return np.array([index[v] for v in text.tolist()], dtype=np.int64), names
