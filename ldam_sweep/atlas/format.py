"""How the atlas and the compare report write values into HTML: escaped text, short numbers."""

from __future__ import annotations

import html
import math
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
