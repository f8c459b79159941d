"""The report's tables say what results.csv says: every number shown is a released estimate of
results.csv, and every withheld estimate is shown as withheld (a mark), never as a number.

Results come from the analyses' own ``combine`` over the three test nodes, one of which withholds
its small counts through ``privacy.disclosure.protect`` (as its gate would): the pooled groups it
withheld are withheld in results.csv (no partial pools), and the report must agree.
"""

from __future__ import annotations

from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from test_analyses_gated import SPECS, _run, _withhold_small, cdms  # noqa: F401 - a fixture

from coordinator.plots import with_values
from coordinator.report import _table_rows, estimates_table, format_estimate, write_report
from studies.results import bind_results, read_results, write_results

MIN_CELL = 60
"""Node 1's gate threshold: high enough that it withholds some groups of every kind."""


class _Cells(HTMLParser):
    """(css class, text) of every estimate cell (``<td class=...>``) of the tables read."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str]] = []
        self._css: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "td":
            css = dict(attrs).get("class")
            self._css = css if css in ("num", "suppressed") else None
            if self._css is not None:
                self.cells.append((self._css, ""))

    def handle_data(self, data: str) -> None:
        if self._css is not None:
            css, text = self.cells[-1]
            self.cells[-1] = (css, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._css = None


def _cells(page: str) -> list[tuple[str, str]]:
    parser = _Cells()
    parser.feed(page)
    return parser.cells


@pytest.mark.parametrize("kind", ["counts", "incidence", "characterization"])
def test_table_cells_are_the_results_rows(cdms, kind: str) -> None:  # noqa: F811
    result = _run(SPECS[kind], cdms(), _withhold_small(MIN_CELL))
    rows = _table_rows(result.filter(pl.col("estimate_name") != "nodes_contributing"))
    rows = rows.filter(pl.col("estimate_name") != "nodes_withheld")
    marked = with_values(rows, MIN_CELL)
    shown = _cells(estimates_table(rows, MIN_CELL, by_variable=kind == "counts"))
    numbers = Counter(text for css, text in shown if css == "num")
    marks = sum(css == "suppressed" for css, _ in shown)
    released = marked.filter(~pl.col("suppressed"))
    expected = Counter(
        format_estimate(r["estimate_value"], None, r["estimate_name"])[0]
        for r in released.iter_rows(named=True)
    )
    assert numbers == expected  # every number shown is a released estimate, and each once
    assert marks == marked["suppressed"].sum() > 0  # and every withheld one is a mark
    withheld_counts = marked.filter(
        (pl.col("estimate_value") == "NA") & (pl.col("estimate_type") == "integer")
    )
    assert withheld_counts["suppressed"].all()  # a withheld count never reads as a number


def test_the_report_shows_no_number_results_csv_withholds(cdms, tmp_path: Path) -> None:  # noqa: F811
    """The whole report of a gated counts result: the cells of the counts table, marks and
    numbers, match results.csv read back from disk."""
    result = _run(SPECS["counts"], cdms(), _withhold_small(MIN_CELL))
    setting = {"result_type": "counts", "analysis_id": "n", "min_cell_count": MIN_CELL}
    write_results(tmp_path, *bind_results([(result, setting)]))
    page = write_report(tmp_path).read_text("utf-8")
    on_disk, _ = read_results(tmp_path)
    counts = on_disk.filter(pl.col("estimate_name") == "count")
    shown = _cells(page)
    numbers = {text for css, text in shown if css == "num"}
    released = {f"{int(float(v)):,}" for v in counts["estimate_value"] if v != "NA"}
    assert released <= numbers
    assert sum(css == "suppressed" for css, _ in shown) >= (counts["estimate_value"] == "NA").sum()
