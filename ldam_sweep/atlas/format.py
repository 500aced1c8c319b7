"""How the atlas and the compare report write values into HTML: escaped text, short numbers, and
where the atlas puts a layer's and a unit's pages (``find`` links to them)."""

from __future__ import annotations

import hashlib
import html
import math
import re
from pathlib import Path
from typing import Any


def escape(text: Any) -> str:
    """``text`` as HTML, safe in element content and in quoted attributes."""
    return html.escape(str(text), quote=True)


def fmt_number(v: Any) -> str:
    """4 significant digits for floats, '–' for a missing or non-finite value, str() otherwise."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def slug(name: str) -> str:
    """A file-name-safe, collision-free name for a layer."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
    return f"{base}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def unit_page(atlas: str | Path, layer: str, unit: int) -> Path:
    """The atlas page of one unit: ``units/<slug>/<unit>.html`` under the atlas directory."""
    return Path(atlas) / "units" / slug(layer) / f"{int(unit)}.html"
