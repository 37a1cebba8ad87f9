"""Benchmark tables: rows (models or rules) x columns (benchmarks + their average) of
``value ± stderr``, written as Markdown and JSON, each atomically (temp file + ``os.replace``).

The average over ``B`` benchmarks is ``mean_b v_b`` with standard error
``sqrt(sum_b se_b^2) / B`` (benchmarks treated as independent); it is left empty for a row
that misses any benchmark.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opd_jax.eval.accuracy import Estimate
from opd_jax.files import atomic_write_text

AVERAGE = "average"
Cell = dict[str, float] | None  # {"value", "stderr"} or missing


def _cell(estimate: Estimate | Mapping[str, float] | None) -> Cell:
    if estimate is None:
        return None
    if isinstance(estimate, Estimate):
        return estimate.to_dict()
    return {"value": float(estimate["value"]), "stderr": float(estimate["stderr"])}


def average(cells: Sequence[Cell]) -> Cell:
    """``{"value": mean_b v_b, "stderr": sqrt(sum_b se_b^2) / B}``; None if any is missing."""
    if not cells or any(c is None for c in cells):
        return None
    count = len(cells)
    return {
        "value": sum(c["value"] for c in cells) / count,
        "stderr": math.sqrt(sum(c["stderr"] ** 2 for c in cells)) / count,
    }


def benchmark_table(
    results: Mapping[str, Mapping[str, Estimate | Mapping[str, float]]],
    benchmarks: Sequence[str] | None = None,
    *,
    metric: str = "",
    row_label: str = "model",
) -> dict[str, Any]:
    """The table of ``results[row][benchmark]`` (an :class:`Estimate` or ``{"value",
    "stderr"}``) as a JSON-ready dict ``{"metric", "row_label", "columns", "rows"}``.

    ``columns`` are ``benchmarks`` (default: every benchmark in first-seen order) and
    ``"average"``; ``rows[row][column]`` is ``{"value", "stderr"}`` or None if missing.
    """
    if benchmarks is None:
        benchmarks = list(dict.fromkeys(b for row in results.values() for b in row))
    rows = {}
    for name, row in results.items():
        cells = {b: _cell(row.get(b)) for b in benchmarks}
        rows[name] = {**cells, AVERAGE: average(list(cells.values()))}
    return {
        "metric": metric,
        "row_label": row_label,
        "columns": [*benchmarks, AVERAGE],
        "rows": rows,
    }


def format_cell(cell: Cell, scale: float = 100.0, digits: int = 1) -> str:
    """``"42.0 ± 1.3"`` (values times ``scale``), or ``"–"`` when missing."""
    if cell is None:
        return "–"
    return f"{cell['value'] * scale:.{digits}f} ± {cell['stderr'] * scale:.{digits}f}"


def to_markdown(table: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """A GitHub Markdown table; values are shown times ``scale`` (percent by default)."""
    unit = " (%)" if scale == 100.0 else ""
    header = [f"{table['row_label']}"] + list(table["columns"])
    lines = [
        f"{table['metric']}{unit}, value ± standard error over problems" if table["metric"] else "",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" + "---:|" * len(table["columns"]),
    ]
    for name, row in table["rows"].items():
        cells = [format_cell(row[c], scale, digits) for c in table["columns"]]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines if table["metric"] else lines[2:]) + "\n"


def write_table(
    table: Mapping[str, Any], directory: str | os.PathLike, name: str = "table"
) -> tuple[Path, Path]:
    """Writes ``directory/{name}.md`` and ``directory/{name}.json``, each atomically."""
    directory = Path(directory)
    markdown = atomic_write_text(directory / f"{name}.md", to_markdown(table))
    data = atomic_write_text(directory / f"{name}.json", json.dumps(table, indent=2) + "\n")
    return markdown, data
