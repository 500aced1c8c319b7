"""Terminal tables that never cut a name. Every header and cell is shown whole, on one line. A table
wider than the console folds: its columns are split greedily, in order, into stacked tables that each
repeat the key columns (so every row stays identifiable); each fold after the first is titled
"<title> (continued: col_a, col_b)". Notes (long detail that would repeat on every row) print under
the tables as plain text. Only a column too wide to fit even alone with the keys (a long path) has
its cells broken across lines, whole, never ellipsised."""

from __future__ import annotations

from typing import Iterable, Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def mark(n: int) -> str:
    """Note marker ``n`` as superscript digits: 1 -> '¹', 12 -> '¹²'."""
    return str(n).translate(_SUPERSCRIPT)


def table_width(widths: Iterable[int]) -> int:
    """Width of a rich Table (default box and padding) whose columns' contents are ``widths`` wide:
    each column adds 1 space of padding either side and a rule, and one rule closes the table."""
    return sum(w + 3 for w in widths) + 1


def folds(columns: Sequence[str], widths: Sequence[int], keys: Iterable[str], width: int) -> list[list[int]]:
    """Column indices of each fold: the key columns, then the others greedily, in order, while the
    fold is at most ``width`` wide. A column too wide even alone with the keys gets a fold of its own."""
    keys = set(keys)
    key_idx = [i for i, c in enumerate(columns) if c in keys]
    parts: list[list[int]] = [[]]
    for i in (i for i in range(len(columns)) if i not in key_idx):
        if parts[-1] and table_width(widths[j] for j in key_idx + parts[-1] + [i]) > width:
            parts.append([])
        parts[-1].append(i)
    return [sorted(key_idx + part) for part in parts]


def print_table(console: Console, title: str, columns: Sequence[str], rows: Iterable[Sequence[object]], *,
                keys: Iterable[str] = (), right: Iterable[str] = (), notes: Iterable[str] = ()) -> None:
    """Print ``rows`` (cells: str or anything str() shows) under ``columns`` on ``console``, folded to
    ``console.width`` (see the module docstring): ``keys`` repeat in every fold, ``right`` columns are
    right-justified, and each of ``notes`` is one plain-text line under the table(s)."""
    keys, right = set(keys) & set(columns), set(right)
    rows = [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(cell_len(line) for text in (c, *(r[i] for r in rows)) for line in text.split("\n"))
              for i, c in enumerate(columns)]
    for n, part in enumerate(folds(columns, widths, keys, console.width)):
        rest = [columns[i] for i in part if columns[i] not in keys]
        table = Table(title=Text(title if n == 0 else f"{title} (continued: {', '.join(rest)})", style="table.title"))
        keys_fit = table_width(widths[i] for i in part if columns[i] in keys) + 4 <= console.width
        too_wide = table_width(widths[i] for i in part) > console.width
        for i in part:
            whole = not too_wide or (columns[i] in keys and keys_fit)  # else: fold its cells, never cut them
            table.add_column(columns[i], justify="right" if columns[i] in right else "left", no_wrap=whole,
                             min_width=widths[i] if whole else None, overflow="ellipsis" if whole else "fold")
        for r in rows:
            table.add_row(*(Text(r[i]) for i in part))
        console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)
