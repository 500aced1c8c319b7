"""Pictures of samples: grids upscaled with nearest-neighbour so tiny inputs keep visible pixels.

``unit_grid`` is the one picture of a unit's chains x snapshots (``ldam-sweep show``,
``UnitView.image``, the atlas's unit page); ``render_change`` its start | final | change strip.
Used by the store's readers and the atlas alike, so it imports neither."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """float images (..., C, H, W) in ``value_range`` -> uint8 (..., H, W, C); non-finite -> 0."""
    lo, hi = value_range
    x = np.nan_to_num((images - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0)
    x = np.clip(x, 0.0, 1.0)
    return np.moveaxis(np.round(x * 255).astype(np.uint8), -3, -1)


def render_grid(
    images: np.ndarray,
    value_range: tuple[float, float],
    *,
    scale: int | None = None,
    row_labels: Sequence[str] | None = None,
    cell_labels: np.ndarray | None = None,
    col_labels: Sequence[str] | None = None,
    pad: int = 2,
) -> Image.Image:
    """A (rows, cols, C, H, W) array as one picture; optional text left of rows, above columns
    (an empty string continues the previous header) and under cells."""
    if images.ndim != 5:
        raise ValueError(f"render_grid wants (rows, cols, C, H, W), got shape {images.shape}")
    rows, cols, c, h, w = images.shape
    scale = scale or max(1, 96 // max(h, w))
    tiles = to_uint8(images, value_range)
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    elif c != 3:
        tiles = np.repeat(tiles[..., :1], 3, axis=-1)
    font = ImageFont.load_default()
    label_w = 0
    if row_labels is not None:
        label_w = max(int(font.getlength(s)) for s in row_labels) + 8
    text_h = 12 if cell_labels is not None else 0
    head_h = 14 if col_labels is not None else 0
    cw, ch = w * scale + pad, h * scale + pad + text_h
    canvas = Image.new("RGB", (label_w + cols * cw + pad, head_h + rows * ch + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if col_labels is not None:
        for col, text in enumerate(col_labels):
            if text:
                draw.text((label_w + pad + col * cw + 1, 1), text, fill="black", font=font)
    for r in range(rows):
        y = head_h + pad + r * ch
        if row_labels is not None:
            draw.text((4, y + (h * scale) // 2 - 5), row_labels[r], fill="black", font=font)
        for col in range(cols):
            x = label_w + pad + col * cw
            tile = Image.fromarray(tiles[r, col]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (x, y))
            if cell_labels is not None:
                draw.text((x + 1, y + h * scale), str(cell_labels[r, col]), fill="black", font=font)
    return canvas


def chain_labels(n: int) -> list[str]:
    return [f"chain {c}" for c in range(n)]


def unit_grid(samples: np.ndarray, activation: np.ndarray, snapshot_steps: Sequence[int] | np.ndarray,
              value_range: tuple[float, float], *, scale: int | None = None) -> Image.Image:
    """A unit's chains (rows) x snapshots (columns): each cell labelled with the chain's activation
    at that step, the steps as column headers, ``chain c`` left of each row."""
    steps = np.asarray(snapshot_steps, dtype=np.int64)
    labels = np.vectorize(lambda v: f"{v:.3g}")(np.asarray(activation)[:, steps])
    return render_grid(samples, value_range, scale=scale, row_labels=chain_labels(len(samples)),
                       cell_labels=labels, col_labels=[f"t={t}" for t in steps])


def save_grid(path: str | Path, *args, **kwargs) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    render_grid(*args, **kwargs).save(p, format="PNG")
    return p


def diverging(diff: np.ndarray, scale: float) -> np.ndarray:
    """(..., H, W) signed values -> (..., H, W, 3) uint8 on a blue-white-red map: white at 0,
    full red at +scale (brighter), full blue at -scale (darker)."""
    t = np.clip(np.nan_to_num(diff / scale), -1.0, 1.0)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def render_change(starts: np.ndarray, finals: np.ndarray, value_range: tuple[float, float], *,
                  scale: int | None = None, labels: Sequence[str] | None = None) -> tuple[Image.Image, float]:
    """Per chain (row): its start | its final image | final − start on a diverging map (channels
    averaged; red: brighter in the final image, blue: darker). The map's full colour is the
    largest change among the chains, as a share of the pixel range, which is returned with it.
    Rows are labelled ``chain c`` unless ``labels`` are given."""
    lo, hi = value_range
    diff = (np.asarray(finals, np.float32) - np.asarray(starts, np.float32)).mean(axis=-3) / (hi - lo)  # (chains, H, W)
    finite = np.abs(diff[np.isfinite(diff)])
    full = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    chains, c, h, w = starts.shape
    scale = scale or max(1, 96 // max(h, w))
    pair = render_grid(np.stack([starts, finals], 1), value_range, scale=scale, pad=2,
                       row_labels=labels if labels is not None else chain_labels(chains), col_labels=["start", "final"])
    maps = diverging(diff, full)
    maps[~np.isfinite(diff).all(axis=(1, 2))] = 160  # a diverged chain: grey, not white ("no change")
    head = 14
    canvas = Image.new("RGB", (pair.width + w * scale + 6, pair.height), "white")
    canvas.paste(pair, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((pair.width + 1, 1), "change", fill="black", font=ImageFont.load_default())  # its scale: the caption
    for r in range(chains):
        tile = Image.fromarray(maps[r]).resize((w * scale, h * scale), Image.NEAREST)
        x, y = pair.width, head + 2 + r * (h * scale + 2)
        canvas.paste(tile, (x, y))
        draw.rectangle((x - 1, y - 1, x + w * scale, y + h * scale), outline=(170, 170, 170))  # white is "no change"
    return canvas, full
