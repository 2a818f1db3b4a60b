"""The Keras-style summary: output shapes, parameters as Keras counts them, trainable or frozen, cost."""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

from rich import box
from rich.cells import cell_len, chop_cells
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from capas.spec.model import LayerInfo, ModelSpec


def readable_bytes(count: int) -> str:
    """Keras' memory figure: 4 bytes per float32 parameter, in 1024-based units with two decimals."""
    size = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):  # keras.src.utils.summary_utils.readable_memory_size
        if size < 1024 or unit == "PB":
            return f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(["None", *map(str, shape)]) + ")"


@dataclass(frozen=True)
class Summary:
    name: str
    rows: list[LayerInfo]

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows if not r.frozen)

    @property
    def non_trainable(self) -> int:
        return sum(r.non_trainable + (r.trainable if r.frozen else 0) for r in self.rows)

    @property
    def total(self) -> int:
        return self.trainable + self.non_trainable

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    def _cells(self) -> list[tuple[str, str, str, str, str, str]]:
        cells = []
        for r in self.rows:
            params = r.trainable + r.non_trainable
            state = "frozen" if r.frozen and params else ("yes" if r.trainable else "-")
            shape = _shape(r.output_shape)
            cells.append(
                (str(r.index), r.name, r.layer.type_name(), shape, f"{params:,}", state, f"{r.macs:,}")
            )
        return cells

    def table(self) -> Table:
        # names are the user's, printed as written: '[bold]' is not markup here
        table = Table(box=box.HEAVY_HEAD)  # the model's name goes above it, on a line of its own (print)
        table.add_column("#", justify="right")
        table.add_column("Layer (type)", no_wrap=True)
        table.add_column("Output Shape", no_wrap=True)
        table.add_column("Param #", justify="right")
        table.add_column("Trainable")
        table.add_column("Mult-adds", justify="right")
        for index, name, kind, shape, params, state, macs in self._cells():
            table.add_row(index, f"{escape(name)} ({kind})", shape, params, state, macs)
        return table

    def compact(self, width: int, rule: str = "─") -> str:
        """The table for narrow terminals and pipes: the layer's type under its name, no rules between
        columns. Numbers and shapes are never wrapped or cut; only names longer than fits fold."""
        cells = self._cells()
        headers = ("#", "Layer (type)", "Output Shape", "Param #", "Trainable", "Mult-adds")
        # in terminal cells: a CJK character or an emoji takes two
        widths = [
            max(cell_len(h), *(cell_len(c[i]) for c in cells))
            for i, h in zip((0, 1, 3, 4, 5, 6), headers, strict=True)
        ]
        widths[1] = max(widths[1], *(cell_len(c[2]) + 2 for c in cells))
        # two spaces between columns when everything fits, else one; then the layer column gives way
        sep = "  " if sum(widths) + 2 * (len(widths) - 1) <= width else " "
        others = sum(widths) - widths[1] + len(sep) * (len(widths) - 1)
        widths[1] = max(12, min(widths[1], width - others))
        right = (True, False, False, True, False, True)

        def line(values: list[str]) -> str:
            padded = (
                " " * (w - cell_len(v)) + v if r else v + " " * (w - cell_len(v))
                for v, w, r in zip(values, widths, right, strict=True)
            )
            return sep.join(padded).rstrip()

        def fold(text: str) -> list[str]:
            return chop_cells(text, widths[1]) or [""]

        out = [f'Model: "{self.name}"', line(list(headers)), rule * cell_len(line(list(headers)))]
        for index, name, kind, shape, params, state, macs in cells:
            names = fold(name) + fold(f"({kind})")
            out.append(line([index, names[0], shape, params, state, macs]))
            out += [line(["", extra, "", "", "", ""]) for extra in names[1:]]
        return "\n".join(out)

    def totals(self) -> str:
        return (
            f" Total params: {self.total:,} ({readable_bytes(4 * self.total)})\n"
            f" Trainable params: {self.trainable:,} ({readable_bytes(4 * self.trainable)})\n"
            f" Non-trainable params: {self.non_trainable:,} ({readable_bytes(4 * self.non_trainable)})\n"
            f" Forward cost: {self.macs:,} multiply-adds per image ({self.macs / 1e6:,.2f} M)"
        )

    def print(self, console: Console | None = None) -> None:
        """The table on `console` (default: stdout). On a stream whose encoding lacks a character (a
        pipe or terminal in an ISO-8859-1 locale) names show '?' for it and rules are ASCII, as Rich
        draws the table's borders there: stdout itself is the caller's, never reconfigured."""
        console = console or Console(emoji=False)

        def shown(text: str) -> str:
            return text.encode(console.encoding, "replace").decode(console.encoding)

        summary = Summary(shown(self.name), [replace(row, name=shown(row.name)) for row in self.rows])
        table = summary.table()
        natural = console.measure(table, options=console.options.update_width(10_000)).maximum
        if natural > console.width:  # too wide for the terminal (a pipe counts as 80 columns)
            compact = summary.compact(console.width, "─" if shown("─") == "─" else "-")
            console.print(compact, highlight=False, markup=False, soft_wrap=True)
        else:  # the name on its own line, as Keras prints it: a table's title wraps at the table's width
            console.print(f'Model: "{summary.name}"', highlight=False, markup=False, soft_wrap=True)
            console.print(table)
        console.print(self.totals(), highlight=False, soft_wrap=True)

    def text(self) -> str:
        """The summary as plain text (summary.txt in run directories)."""
        buffer = io.StringIO()
        self.print(Console(file=buffer, width=120, color_system=None, emoji=False))
        return buffer.getvalue()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "total_params": self.total,
            "trainable_params": self.trainable,
            "non_trainable_params": self.non_trainable,
            "macs": self.macs,
            "layers": [
                {
                    "index": r.index,
                    "name": r.name,
                    "type": r.layer.type_name(),
                    "output_shape": list(r.output_shape),
                    "params": r.trainable + r.non_trainable,
                    "trainable": not r.frozen and r.trainable > 0,
                    "macs": r.macs,
                }
                for r in self.rows
            ],
        }


def summarize(spec: ModelSpec) -> Summary:
    """The summary of a spec; the counts come from the layer registry and match Keras' exactly."""
    return Summary(spec.name, spec.layer_infos())
