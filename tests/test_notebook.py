"""How a store looks in a notebook: a units table as a short HTML table, a unit as picture + scores."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

import ldam_sweep as ls
from ldam_sweep.store.schema import QUERY_COLUMNS


@pytest.mark.fast
def test_units_display_in_ipython_as_a_short_table_and_other_tables_are_left_alone(exemplar_store):
    """In a real IPython shell: ``st.units()`` displays as an HTML table of query's default columns
    (one row per unit, the count, how to get every column), its text form is a few lines, not the
    schema dump; the table is still a pyarrow Table for scripts; a plain pyarrow table keeps pyarrow's display."""
    interactiveshell = pytest.importorskip("IPython.core.interactiveshell")
    shell = interactiveshell.InteractiveShell.instance()
    try:
        st = ls.open_store(exemplar_store)
        from ldam_sweep.notebook import register

        assert register(shell)
        table = st.units()
        assert isinstance(table, pa.Table) and table.num_rows > 20
        bundle, _ = shell.display_formatter.format(table)
        page = bundle["text/html"]
        assert re.findall(r"<th>([^<]*)</th>", page) == list(QUERY_COLUMNS)
        assert page.count("<tr>") == 1 + 20  # header + the first 20 units
        assert f"{table.num_rows} units (first 20 shown; 6 of {table.num_columns} columns shown" in page
        first = table.slice(0, 1).to_pylist()[0]
        assert f">{first['layer']}</td>" in page and f">{first['unit']}</td>" in page
        text = bundle["text/plain"]
        assert len(text.splitlines()) == 12 and "pyarrow.Table" not in text and "data_hist" not in text
        plain = pa.table({"a": [1, 2]})
        bundle, _ = shell.display_formatter.format(plain)
        assert "text/html" not in bundle and bundle["text/plain"].startswith("pyarrow.Table")
        narrowed = st.units("fc2").select(["unit", "pixel_diversity"])  # the user's own columns are shown
        assert re.findall(r"<th>([^<]*)</th>", shell.display_formatter.format(narrowed)[0]["text/html"]) == \
            ["unit", "pixel_diversity"]
    finally:
        interactiveshell.InteractiveShell.clear_instance()


@pytest.mark.fast
def test_a_unit_displays_as_its_picture_and_scores(exemplar_store):
    st = ls.open_store(exemplar_store)
    view = st.unit("fc2", 3)
    page = view._repr_html_()
    assert "<b>fc2 unit 3</b>" in page and "src='data:image/png;base64," in page
    assert re.search(r"<th[^>]*>act_final_mean</th><td>([^<]+)</td>", page).group(1) == f"{view.scores['act_final_mean']:.4g}"
    assert f"<td>{view.scores['label']}</td>" in page
