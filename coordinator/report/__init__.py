"""The study report: one self-contained HTML page and PNG plots from a results folder.

``write_report(results_dir)`` reads ``results.csv`` and ``settings.csv`` (DARWIN EU
summarised_result and its settings table) and writes ``report.html`` (CSS inline, plots embedded
as base64 PNG, so it opens offline and can be mailed as one file) and ``plots/*.png``.

A report is for a reader, so it never fails on the data it is given: a plot whose rows are
missing or suppressed is skipped with a note, and a folder with any subset of analysis kinds
renders. Suppressed cells are shown as ``<N`` (never as 0).

What it reads besides the summarised_result (every part optional):
- settings (one row per ``result_id``): ``result_type`` (the analysis kind, which picks the
  plots), ``analysis_id`` (names the section), ``study_name``, ``study_hash``, ``permit_id``,
  ``package_name``, ``package_version``, ``min_cell_count``; node lists ``nodes_contributing``
  / ``cdm_names`` and ``nodes_missing`` (``node (status)`` or ``node: reason`` separated by
  ``;``), or ``nodes_<status>`` columns; ``epsilon_spent`` and ``epsilon_permitted`` as a
  number, ``node=value; ...`` or a JSON object.
- ``federation.json`` (the coordinator's record: per node and analysis its status, reason and
  the gate's reply settings ``suppressed_cells``, ``rho_charged``, ``epsilon_charged``,
  ``delta``), else ``nodes.csv``: who contributed, what each gate suppressed and charged. The
  privacy spend per node composes the gates' rho charges (zCDP) and converts once to epsilon.
"""

from __future__ import annotations

from coordinator.report.federation import federation_html, node_records, privacy_budget
from coordinator.report.page import render_page, write_report
from coordinator.report.reading import (
    RESULT_COLUMNS,
    kind_of,
    min_cell_count_of,
    per_node_numbers,
    read_summarised,
    settings_by_result,
    split_nodes,
)
from coordinator.report.sections import Section, _table_rows, analysis_sections, study_summary
from coordinator.report.tables import (
    Figure,
    draw,
    estimates_table,
    figure_html,
    format_estimate,
    frame_table,
    key_value_table,
)

__all__ = [
    "Figure",
    "RESULT_COLUMNS",
    "Section",
    "_table_rows",
    "analysis_sections",
    "draw",
    "estimates_table",
    "federation_html",
    "figure_html",
    "format_estimate",
    "frame_table",
    "key_value_table",
    "kind_of",
    "min_cell_count_of",
    "node_records",
    "per_node_numbers",
    "privacy_budget",
    "read_summarised",
    "render_page",
    "settings_by_result",
    "split_nodes",
    "study_summary",
    "write_report",
]
