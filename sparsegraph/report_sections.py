"""Extra report sections that passes contribute (e.g. `sensitivity`, `owl`).

A pass calls `add_section(ctx, ReportSection(...))`; `sparsegraph.report` then puts
`data` under `report[key]` in `report.json`, renders `markdown` (lines) as a `## title`
section of `report.md`, and, when `figure` names a PNG, draws it with the plotter
registered for `key` (`register_plotter`) into the output folder beside the report (and
lists it under `files`). A later section with the same key replaces the earlier one.
Keys must not collide with the report's own keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTIONS_KEY = "report_sections"
RESERVED = {"model", "recipe", "seed", "totals", "ops", "validation", "passes", "files", "sections"}
_PLOTTERS: dict[str, Callable[[Any, Path], Any]] = {}


@dataclass
class ReportSection:
    key: str  # report.json key holding `data`
    title: str  # report.md heading
    data: Any  # JSON-serialisable
    markdown: list[str]  # lines of the report.md section body
    figure: str | None = None  # PNG file name, drawn by the plotter registered for `key`


def add_section(ctx: Any, section: ReportSection) -> None:
    if section.key in RESERVED:
        raise ValueError(f"report section key {section.key!r} is reserved")
    ctx.extras.setdefault(SECTIONS_KEY, {})[section.key] = section


def register_plotter(key: str, plotter: Callable[[Any, Path], Any]) -> None:
    """`plotter(data, path)` draws the figure of sections with this key."""
    _PLOTTERS[key] = plotter


def for_report(ctx: Any) -> dict[str, Any]:
    """The keys `report.json` gets from the sections in `ctx` (each `data`, plus `sections`)."""
    sections = list(ctx.extras.get(SECTIONS_KEY, {}).values())
    if not sections:
        return {}
    out: dict[str, Any] = {s.key: s.data for s in sections}
    out["sections"] = [
        {"key": s.key, "title": s.title, "markdown": s.markdown, "figure": s.figure} for s in sections
    ]
    return out


def markdown(report: dict[str, Any]) -> list[str]:
    """report.md lines of the sections in `report`."""
    lines: list[str] = []
    for s in report.get("sections", []):
        lines += ["", f"## {s['title']}", "", *s["markdown"]]
        if s.get("figure"):
            lines += ["", f"![{s['title']}]({s['figure']})"]
    return lines


def write_figures(report: dict[str, Any], folder: Path) -> None:
    """Draw the sections' figures into `folder`; add them to `report["files"]`."""
    for s in report.get("sections", []):
        plotter = _PLOTTERS.get(s["key"])
        if not s.get("figure") or plotter is None:
            continue
        path = Path(folder) / s["figure"]
        plotter(report[s["key"]], path)
        report.setdefault("files", {})[s["figure"]] = path.stat().st_size
