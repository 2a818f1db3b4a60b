"""The report in a terminal: warnings, a table that fits the console's width, one sentence per variant.

Columns are added in order of importance while the table still fits (80 columns when piped); a
column is left out whole rather than wrapped or cut, so no number is ever split or shortened. When
even the essential columns do not fit, each variant gets a compact block of lines instead.
"""

from __future__ import annotations

from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from capas.study.render.text import HEADERS, adaptive_line, document, sentence, table_rows
from capas.study.report import StudyReport
from capas.study.stats import ADJUSTMENT, CONFIDENCE, TEST_NAME

# (column in HEADERS, its terminal header), most important first; the first three are essential.
COLUMNS = (
    ("variant", "variant"),
    ("test acc %", "test acc %"),
    ("Δ test acc pp (95% CI)", "Δ pp (95% CI)"),
    (f"p ({ADJUSTMENT})", f"p {ADJUSTMENT}"),
    ("notes", "notes"),
    ("params", "params"),
    ("seeds", "seeds"),
    ("p", "p raw"),
    ("val acc %", "val acc %"),
    ("train s", "train s"),
    ("test loss", "test loss"),
    ("best epoch", "best epoch"),
    ("mult-adds", "mult-adds"),
)
ESSENTIAL = 3


def _lettered(report: StudyReport, rows: list[list[str]]) -> tuple[list[list[str]], list[str]]:
    """Each distinct note flag as a letter in the notes column (narrow), with the legend's lines."""
    flags = list(dict.fromkeys(note.flag for result in report.variants for note in result.notes))
    letters = {flag: chr(ord("a") + i) for i, flag in enumerate(flags)}
    column = HEADERS.index("notes")
    lettered = [
        [*row[:column], ",".join(letters[n.flag] for n in result.notes), *row[column + 1 :]]
        for row, result in zip(rows, report.variants, strict=True)
    ]
    return lettered, [f"{letter}: {flag}" for flag, letter in letters.items()]


def _table(report: StudyReport, rows: list[list[str]], keep: list[int]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), show_edge=False)
    for i in keep:
        header = COLUMNS[i][1]
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    index = [HEADERS.index(COLUMNS[i][0]) for i in keep]
    for row in rows:
        table.add_row(*(escape(row[j]) for j in index))  # names and errors are text, not markup
    return table


def _fits(console: Console, table: Table, width: int) -> bool:
    return console.measure(table, options=console.options.update_width(10_000)).maximum <= width


def terminal_table(report: StudyReport, width: int = 80, console: Console | None = None) -> RenderableType:
    """The results table with the columns that fit in `width` (report.md has them all)."""
    console = console or Console(width=10_000, emoji=False)
    rows, legend = _lettered(report, table_rows(report))
    keep = list(range(ESSENTIAL))
    if not _fits(console, _table(report, rows, keep), width):
        return _compact(report, table_rows(report))
    for i in range(ESSENTIAL, len(COLUMNS)):
        if _fits(console, _table(report, rows, sorted([*keep, i])), width):
            keep.append(i)
    keep.sort()
    left_out = [COLUMNS[i][1] for i in range(len(COLUMNS)) if i not in keep]
    caption = (
        f"mean ± {CONFIDENCE:.0%} CI over seeds (unadjusted for Δ); p: {TEST_NAME}, {ADJUSTMENT}-adjusted"
    )
    if legend and COLUMNS.index(("notes", "notes")) in keep:
        caption += f"; notes: {'; '.join(legend)}"
    if left_out:
        caption += f"; not shown at this width: {', '.join(left_out)} (see report.md)"
    return Group(
        Text(f"study {report.study.name}", style="bold"),
        _table(report, rows, keep),
        Text(caption, style="dim"),
    )


def _compact(report: StudyReport, rows: list[list[str]]) -> Group:
    """One block per variant, one figure per line: for consoles narrower than the essential columns."""
    lines = [Text(f"study {report.study.name} (mean ± {CONFIDENCE:.0%} CI over seeds)", style="bold")]
    for row in rows:
        lines.append(Text(row[0], style="bold"))
        for name, label in COLUMNS[1:]:
            value = row[HEADERS.index(name)]
            if value:
                lines.append(Text(f"  {label}: {value}"))
    return Group(*lines)


def print_report(report: StudyReport, console: Console) -> None:
    """Warnings first, then the table fitted to the console, then one sentence per variant and per
    compressed model, and how adaptive seeds were chosen (which the intervals do not allow for)."""
    for line in report.warnings:
        console.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    console.print(terminal_table(report, console.width, console))
    for result in report.variants[1:]:
        console.print(f"- {sentence(report, result)}", highlight=False, markup=False, soft_wrap=True)
    for line in document(report, []).compression_sentences:
        console.print(f"- {line}", highlight=False, markup=False, soft_wrap=True)
    if line := adaptive_line(report):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
