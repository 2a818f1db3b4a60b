"""The report as Markdown (report.md), laid out from the same Document as the HTML template."""

from __future__ import annotations

import re

from capas.study.render.text import Document, Table

# '<' opening what a Markdown viewer renders as an HTML tag, comment or declaration: variant names and
# errors come from users' files and runs (report.html escapes them alike)
HTML_START = re.compile(r"<(?=[A-Za-z/!?])")
# what Markdown reads as emphasis, code, strikethrough or a link in the same text: a backslash, '*', '`',
# '~', '](' and a '_' at either end of a word ('_' inside a word, as in conv2d_1, emphasises nothing)
MARKS = re.compile(r"[\\*`~]|\](?=\()|(?<![^\W_])_|_(?![^\W_])")


def _text(text: str) -> str:
    """Text from the Document (names from users' files, errors from runs) that shows as written."""
    return MARKS.sub(r"\\\g<0>", text)


def _table(table: Table) -> str:
    def clean(cell: str) -> str:
        return _text(cell).replace("|", "\\|")

    lines = [
        "| " + " | ".join(clean(h) for h in table.headers) + " |",
        "|" + "|".join("---" for _ in table.headers) + "|",
    ]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def markdown(doc: Document) -> str:
    parts = [f"# {_text(doc.title)}", ""]
    if doc.warnings:
        parts += [
            f"> **Warning:** {_text(line)}" + ("  " if i < len(doc.warnings) - 1 else "")
            for i, line in enumerate(doc.warnings)
        ]
        parts.append("")
    parts += [*[f"- {_text(line)}" for line in doc.header], ""]
    parts += ["## Results", "", _table(doc.results), ""]
    parts += ["## In plain words", "", *[f"- {_text(s)}" for s in doc.sentences], ""]
    parts += ["## Per seed", "", _table(doc.per_seed), ""]
    if doc.compression is not None:
        parts += [
            "## Compression",
            "",
            _table(doc.compression),
            "",
            *[f"- {_text(s)}" for s in doc.compression_sentences],
            "",
        ]
    parts += ["## Plots", "", *[f"![{caption}](plots/{name})" for name, caption in doc.plots], ""]
    parts += ["## Architecture differences from the base", ""]
    for diff in doc.diffs:
        parts += [f"### {_text(diff.name)}", ""]
        if diff.table is not None:
            parts += [_table(diff.table), ""]
        parts += [f"- {_text(line)}" for line in diff.settings] + ([""] if diff.settings else [])
        if diff.table is None and not diff.settings:
            parts += ["No difference in layers or settings.", ""]
    return HTML_START.sub(r"\\<", "\n".join(parts))
