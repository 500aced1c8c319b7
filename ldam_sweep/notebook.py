"""How a store's tables and units look in a notebook.

``st.units()`` returns a ``pyarrow.Table``, which scripts keep using as one (``.to_pandas()``,
``.to_pylist()``, DuckDB, ``pyarrow.compute``). Its own repr is the full schema (60+ columns) before
any row, so the tables that ``SweepStore.units`` returns carry a mark in their schema metadata, and in
IPython/Jupyter (only there) a display formatter shows a marked table as a short HTML table of the
columns ``ldam-sweep query`` shows by default, with the row and column counts and how to get the rest.
Unmarked tables, and every table outside IPython, keep pyarrow's own display: the formatter returns
None for them, which IPython takes as "not mine". ``UnitView`` has its own ``_repr_html_``.
"""

from __future__ import annotations

import html
import sys
from typing import Any

import pyarrow as pa

MARK_KEY, MARK = b"ldam_sweep", b"units"
MAX_ROWS = 20


def mark(table: pa.Table) -> pa.Table:
    """``table`` marked as a units table (schema metadata; the data is not copied)."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), MARK_KEY: MARK})


def is_marked(table: Any) -> bool:
    return isinstance(table, pa.Table) and (table.schema.metadata or {}).get(MARK_KEY) == MARK


def shown_columns(table: pa.Table) -> list[str]:
    """The columns a units table shows: ``query``'s defaults that it has (``status`` too when it holds
    several), else its first 8 (a table the user already narrowed with ``.select``)."""
    from ldam_sweep.store.schema import QUERY_COLUMNS

    names = table.column_names
    cols = [c for c in QUERY_COLUMNS if c in names]
    if "status" in names and len(set(table["status"].to_pylist())) > 1:
        cols.insert(min(2, len(cols)), "status")
    return cols if len(cols) >= 2 else names[:8]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _footer(table: pa.Table, cols: list[str], rows: int) -> str:
    more = []
    if table.num_rows > rows:
        more.append(f"first {rows} shown")
    if table.num_columns > len(cols):
        more.append(f"{len(cols)} of {table.num_columns} columns shown; every column: .to_pandas(), "
                    f".select([...]) or ldam-sweep query --columns all")
    return f"{table.num_rows} units" + (f" ({'; '.join(more)})" if more else "")


def units_html(table: pa.Table, max_rows: int = MAX_ROWS) -> str:
    """An HTML table of ``table``'s first ``max_rows`` rows in ``shown_columns``, every cell escaped."""
    cols = shown_columns(table)
    rows = table.slice(0, max_rows).select(cols).to_pylist()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f"<td style='text-align:{'right' if isinstance(r[c], (int, float)) else 'left'}'>{html.escape(_cell(r[c]))}</td>"
        for c in cols) + "</tr>" for r in rows)
    return (f"<table class='ldam-units'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p><small>{html.escape(_footer(table, cols, len(rows)))}</small></p>")


def units_text(table: pa.Table, max_rows: int = 10) -> str:
    """The same as plain text: aligned columns, then the footer."""
    cols = shown_columns(table)
    rows = [[_cell(v) for v in r.values()] for r in table.slice(0, max_rows).select(cols).to_pylist()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines + [_footer(table, cols, len(rows))])


def _html_formatter(table: pa.Table) -> str | None:
    return units_html(table) if is_marked(table) else None  # None: IPython falls back to the next format


def _plain_formatter(table: pa.Table, printer: Any, cycle: bool) -> None:
    printer.text(units_text(table) if is_marked(table) else repr(table))


def register(shell: Any = None) -> bool:
    """Install the display formatters in the running IPython shell (``shell``, else the current
    one); True when one was found. Called when ``ldam_sweep.store.query`` is imported; idempotent."""
    if shell is None:
        ipython = sys.modules.get("IPython")
        shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    if shell is None:
        return False
    formatters = shell.display_formatter.formatters
    if formatters["text/html"].type_printers.get(pa.Table) is not _html_formatter:
        formatters["text/html"].for_type(pa.Table, _html_formatter)
        formatters["text/plain"].for_type(pa.Table, _plain_formatter)
    return True


def unit_html(view: Any) -> str:
    """A ``UnitView`` as HTML: its picture (chains x snapshots) and a table of its main scores."""
    import base64

    png = base64.b64encode(view._repr_png_()).decode("ascii")
    names = ("label", "label_purity", "act_final_mean", "exemplar_max", "activation_ratio", "realism_final_mean",
             "pixel_diversity", "feature_diversity_ratio", "facets", "status")
    rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(_cell(view.scores[k]))}</td></tr>"
                   for k in names if view.scores.get(k) is not None)
    return (f"<div class='ldam-unit'><p><b>{html.escape(view.layer)} unit {view.unit}</b></p>"
            f"<img alt='{html.escape(view.layer)} unit {view.unit}' src='data:image/png;base64,{png}'>"
            f"<table>{rows}</table></div>")
