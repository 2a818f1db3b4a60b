"""Renderers of a study report (capas.study.report): Markdown, one HTML template, the terminal."""

from __future__ import annotations

from pathlib import Path

from capas import atomic
from capas.study.plots import plots
from capas.study.render.html import html_page
from capas.study.render.markdown import markdown
from capas.study.render.terminal import print_report, terminal_table
from capas.study.render.text import HEADERS, document, sentence, table_rows
from capas.study.report import StudyReport


def write_report(report: StudyReport, out: Path) -> tuple[Path, Path]:
    """Write plots/*.png, report.md and report.html into the study directory (each file atomically)."""
    images = plots(report)
    for name, (_, png) in images.items():
        atomic.write_with(out / "plots" / name, lambda tmp, png=png: tmp.write_bytes(png))
    doc = document(report, [(name, caption) for name, (caption, _) in images.items()])
    md = atomic.write_text(out / "report.md", markdown(doc))
    page = atomic.write_text(
        out / "report.html", html_page(doc, {name: png for name, (_, png) in images.items()})
    )
    return md, page


__all__ = ["HEADERS", "print_report", "sentence", "table_rows", "terminal_table", "write_report"]
