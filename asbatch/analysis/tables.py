"""The paper's tables: one builder (sections of rows of cells), one small style per format (md, LaTeX, HTML, CSV).

`paper_tables(groups, fmt)` builds `Section`s, format-free: columns, and rows whose cells are plain text, a row
label (`Label`) or a metric's statistic (`Value`, bold or not). A `Style` says how one format writes them:
escaping, the ± sign, bold, the missing value, λ, and the lines around a section. The metrics, their headers,
decimals and bolding direction come from the registry (asbatch.analysis.metrics).
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from rich.table import Table

from asbatch.analysis.aggregate import DEFAULT_BY, Group, Stat, aggregate, default_grouping
from asbatch.analysis.configs import show_value
from asbatch.analysis.metrics import PAPER_TABLES, Metric, run_table_metrics, table_metrics
from asbatch.analysis.records import Record, record_from_results
from asbatch.names import dataset_title, model_title, sort_key

FORMATS = ("md", "latex", "csv", "html")
NOTE = "mean ± 1 std over n seeds; the better of AS / no AS in bold"
SPLIT_NOTE = "; [key=value]: the config keys in which rows differ (runs of different configs are never pooled)"
_IDENTITY = ("data", "model", "fine_tuned", "as_on", "lam")  # grouping fields a row label shows by itself

# ---------------------------------------------------------------------------------------------- escaping

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (\\ & % $ # _ { } ~ ^) in plain text."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def md_escape(text: str) -> str:
    """Escape characters that would break or restyle a Markdown table cell."""
    return "".join("\\" + c if c in "\\|*_`" else c for c in str(text))


# ------------------------------------------------------------------------------------------------- model


class Math(NamedTuple):
    """A symbol set as math where the format has math (LaTeX's `$n$`)."""

    text: str


class Label(NamedTuple):
    """The label of a group's row: "ResNet20" / "ResNet20 + AS", the lambdas when they must be shown, and any
    other grouping fields."""

    group: Group
    show_lam: bool


class Value(NamedTuple):
    """A metric's statistic over a group: "mean ± std" with the metric's decimals."""

    stat: Stat
    metric: Metric
    bold: bool


Cell = str | Math | Label | Value  # str: plain text, escaped by the style


class Column(NamedTuple):
    head: Cell
    left: bool = False  # text column (aligned left); numbers are aligned right


class Row(NamedTuple):
    cells: tuple[Cell, ...]
    new_block: bool = False  # the first row of a data set after another one (LaTeX draws a rule)


class Section(NamedTuple):
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    note: str = NOTE  # after the title, in parentheses


# ------------------------------------------------------------------------------------------------ styles


@dataclass(frozen=True)
class Style:
    """How one format writes a `Section`."""

    escape: Callable[[str], str]
    open: Callable[[Section, list[str]], list[str]]  # the lines before the rows, given the rendered header
    row: Callable[[Sequence[str]], str]
    close: tuple[str, ...] = ()
    rule: str | None = None  # the line between two data sets
    pm: str = " ± "
    missing: str = "\N{EN DASH}"
    bold: str = "**{}**"
    lam: str = "λ"
    math: str = "{}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_open(section: Section, head: list[str]) -> list[str]:
    return [f"**{md_escape(section.title)}** ({md_escape(section.note)})", "", _md_row(head),
            _md_row([":--" if c.left else "--:" for c in section.columns])]


def _latex_row(cells: Sequence[str]) -> str:
    return " & ".join(cells) + r" \\"


def _latex_open(section: Section, head: list[str]) -> list[str]:
    note = latex_escape(section.note).replace("±", r"$\pm$")
    return [r"\begin{table}[ht]", r"\centering", rf"\caption{{{latex_escape(section.title)}; {note}.}}",
            r"\begin{tabular}{" + "".join("l" if c.left else "r" for c in section.columns) + "}", r"\toprule",
            _latex_row(head), r"\midrule"]


def _html_row(cells: Sequence[str]) -> str:
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _html_open(section: Section, head: list[str]) -> list[str]:
    caption = f"<caption><b>{html.escape(section.title)}</b> ({html.escape(section.note)})</caption>"
    return ['<table class="paper">', caption,
            "<thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>", "<tbody>"]


def _csv_row(cells: Sequence[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()[:-1]


STYLES: dict[str, Style] = {
    "md": Style(md_escape, _md_open, _md_row),
    "latex": Style(latex_escape, _latex_open, _latex_row, close=(r"\bottomrule", r"\end{tabular}", r"\end{table}"),
                   rule=r"\midrule", pm=r" $\pm$ ", missing="--", bold=r"\textbf{{{}}}", lam=r"$\lambda$",
                   math="${}$"),
    "html": Style(html.escape, _html_open, _html_row, close=("</tbody>", "</table>"), pm=" &plusmn; ",
                  missing="&ndash;", bold="<b>{}</b>"),
    "csv": Style(str, lambda section, head: [_csv_row(head)], _csv_row, lam="lambda"),
}


def _label_text(label: Label, style: Style) -> str:
    group = label.group
    text = style.escape(model_title(str(group.get("model"))))
    if group.get("as_on"):
        text += " + AS"
        if label.show_lam:
            text += f" ({style.lam} = {', '.join(f'{v:g}' for v in group.lams)})"
    extra = [*(f"{k}={v}" for k, v in group.key.items() if k not in _IDENTITY),
             *(f"{k}={show_value(v)}" for k, v in group.differs.items())]
    if extra:
        text += " [" + style.escape(", ".join(extra)) + "]"
    return text


def _cell_text(cell: Cell, style: Style) -> str:
    if isinstance(cell, Value):
        if cell.stat.mean is None:
            return style.missing
        dp = cell.metric.decimals
        text = f"{cell.stat.mean:.{dp}f}{style.pm}{cell.stat.std:.{dp}f}"
        return style.bold.format(text) if cell.bold else text
    if isinstance(cell, Label):
        return _label_text(cell, style)
    if isinstance(cell, Math):
        return style.math.format(cell.text)
    return style.escape(cell)


def render(section: Section, style: Style) -> str:
    """One section as text in a style (no trailing newline)."""
    lines = style.open(section, [_cell_text(c.head, style) for c in section.columns])
    for row in section.rows:
        if style.rule is not None and row.new_block:
            lines.append(style.rule)
        lines.append(style.row([_cell_text(c, style) for c in row.cells]))
    return "\n".join([*lines, *style.close])


# ------------------------------------------------------------------------------------------ paper tables


def best_cells(groups: Sequence[Group], metric: Metric) -> set[int]:
    """Indices (into `groups`, which are rows to compare with each other) of the strictly better cells of
    `metric`, comparing means rounded as displayed, in the metric's direction (`higher_is_better`).
    Empty when fewer than two rows have a value or when they are all equal (nothing is better)."""
    values = {i: round(g[metric.name].mean, metric.decimals) for i, g in enumerate(groups)
              if g[metric.name].mean is not None}
    if len(values) < 2 or len(set(values.values())) == 1:
        return set()
    best = (max if metric.higher_is_better else min)(values.values())
    return {i for i, v in values.items() if v == best}


def _pair_key(group: Group) -> tuple:
    """Rows compared for bolding: same key except as_on and lam, and the same values of the differing keys."""
    return (group.family, tuple((k, repr(v)) for k, v in group.differs.items()))


def _row_order(group: Group) -> tuple:
    extras = tuple(sort_key(k, v) for k, v in [*group.key.items(), *group.differs.items()] if k not in _IDENTITY)
    return (sort_key("data", group.get("data")), sort_key("model", group.get("model")), extras,
            bool(group.get("as_on")), group.lams)


def _bold_cells(rows: Sequence[Group], metrics: Sequence[Metric]) -> set[tuple[int, str]]:
    pairs: dict[tuple, list[int]] = {}
    for i, g in enumerate(rows):
        pairs.setdefault(_pair_key(g), []).append(i)
    bold = set()
    for members in pairs.values():
        for metric in metrics:
            bold |= {(members[j], metric.name) for j in best_cells([rows[i] for i in members], metric)}
    return bold


def _show_lam(rows: Sequence[Group]) -> set[int]:
    """Rows whose lambda must be shown: AS rows sharing their pair with another AS row."""
    counts: dict[tuple, int] = {}
    for g in rows:
        if g.get("as_on"):
            counts[_pair_key(g)] = counts.get(_pair_key(g), 0) + 1
    return {i for i, g in enumerate(rows) if g.get("as_on") and counts[_pair_key(g)] > 1}


def _has_values(groups: Iterable[Group], metric: Metric) -> bool:
    return any(g[metric.name].mean is not None for g in groups)


def _paper_section(title: str, groups: Sequence[Group], metrics: Sequence[Metric]) -> Section:
    bold, show = _bold_cells(groups, metrics), _show_lam(groups)
    columns = (Column("Dataset", left=True), Column("Model", left=True), Column(Math("n")),
               *(Column(m.header) for m in metrics))
    rows, previous = [], None
    for i, g in enumerate(groups):
        data = dataset_title(str(g.get("data")))
        cells = (data if data != previous else "", Label(g, i in show), str(g.n),
                 *(Value(g[m.name], m, (i, m.name) in bold) for m in metrics))
        rows.append(Row(cells, new_block=previous is not None and data != previous))
        previous = data
    return Section(title, columns, tuple(rows), NOTE + (SPLIT_NOTE if any(g.differs for g in groups) else ""))


def _paper_sections(groups: Sequence[Group]) -> list[Section]:
    """One section per paper table and fine-tune setting (scratch first), columns without any value dropped."""
    settings = sorted({g.get("fine_tuned") for g in groups}, key=lambda v: (v is not None, bool(v)))
    sections = []
    for table in PAPER_TABLES:
        for setting in settings:
            rows = sorted((g for g in groups if g.get("fine_tuned") == setting), key=_row_order)
            metrics = [m for m in table_metrics(table.name) if _has_values(rows, m)]
            if not rows or not metrics:
                continue
            suffix = {True: ", Bayesian fine-tune", False: ", trained from scratch"}.get(setting, "")
            sections.append(_paper_section(table.title + suffix, rows, metrics))
    return sections


def _csv_metrics(groups: Sequence[Group]) -> list[Metric]:
    return [m for table in PAPER_TABLES for m in table_metrics(table.name) if _has_values(groups, m)]


def csv_columns(groups: Sequence[Group]) -> list[str]:
    """The header of `paper_tables(groups, "csv")`."""
    extra = list(dict.fromkeys([*(k for g in groups for k in g.key if k not in _IDENTITY),
                                *(k for g in groups for k in g.differs)]))
    return ["dataset", "model", "fine_tuned", "as_on", "lambda", *extra, "n",
            *(f"{m.name}_{s}" for m in _csv_metrics(groups) for s in ("mean", "std"))]


def _csv_section(groups: Sequence[Group]) -> Section:
    """One row per group, every metric as full-precision mean and std columns, no bold."""
    columns, metrics = csv_columns(groups), _csv_metrics(groups)
    rows = []
    for g in sorted(groups, key=lambda g: (sort_key("fine_tuned", g.get("fine_tuned")), _row_order(g))):
        row: dict[str, Any] = {"dataset": dataset_title(str(g.get("data"))), "model": model_title(str(g.get("model"))),
                               "fine_tuned": g.get("fine_tuned", ""), "as_on": g.get("as_on"),
                               "lambda": ";".join(f"{v:g}" for v in g.lams), "n": g.n}
        row.update({k: v for k, v in g.key.items() if k not in _IDENTITY})
        row.update({k: show_value(v) for k, v in g.differs.items()})
        for m in metrics:
            for which in ("mean", "std"):
                value = getattr(g[m.name], which)
                row[f"{m.name}_{which}"] = "" if value is None else repr(value)
        rows.append(Row(tuple("" if row.get(c) is None else str(row[c]) for c in columns)))
    return Section("", tuple(Column(c) for c in columns), tuple(rows))


def _check_groups(groups: Sequence[Group]) -> None:
    for name in ("data", "model", "as_on"):
        if any(name not in g.key for g in groups):
            raise ValueError(f"paper_tables needs groups keyed by {name!r} (aggregate(records, by=...) "
                             f"must include it; the default {DEFAULT_BY} does)")


def paper_tables(groups: Sequence[Group], fmt: str = "md") -> str:
    """The paper's tables for aggregated groups (`aggregate(records)`), as text.

    md / latex / html: one table per paper table of the registry ((1) lowest / highest / ensembled accuracy,
    (2) accuracy at 20/40/60/80 % data retained, (3) ECE, NLL, Brier, AURC and, when any run has it, OOD
    AUROC), each once per fine-tune setting present (trained from scratch, Bayesian fine-tune). Rows: dataset
    (on its first row), "ResNet20" and "ResNet20 + AS", n runs; cells "mean ± std". Within each (data, model,
    fine_tuned) the better of AS vs no AS is bold (in each metric's direction; compared as displayed, ties:
    none). LaTeX needs \\usepackage{booktabs}.
    csv: one table, a row per group, every metric as <metric>_mean and <metric>_std columns (full precision,
    no bold); header: `csv_columns(groups)`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    groups = list(groups)
    if not groups:
        return "" if fmt == "csv" else "(no finished Bayesian runs)\n"
    _check_groups(groups)
    sections = [_csv_section(groups)] if fmt == "csv" else _paper_sections(groups)
    return "\n\n".join(render(s, STYLES[fmt]) for s in sections) + "\n"


def sweep_tables(records: Sequence[Record], fmt: str = "md") -> str:
    """What `asbatch table` prints: `paper_tables(aggregate(records, by=default_grouping(records)), fmt)`
    (one row per lambda where a sweep has several)."""
    return paper_tables(aggregate(records, by=default_grouping(records)), fmt)


def run_table(results: Iterable[dict[str, Any]], title: str = "runs") -> Table:
    """Per-run table (rich) of `asbatch run`: the run-table metrics of the registry (lowest / highest /
    ensembled accuracy and accuracy on the X% most certain data)."""
    metrics = run_table_metrics()
    table = Table(title=title)
    for col in ("run", "model", "lambda", "seed"):
        table.add_column(col, justify="left" if col in ("run", "model") else "right", no_wrap=True)
    for m in metrics:
        table.add_column(m.short, justify="right", no_wrap=True)
    for r in map(record_from_results, results):
        lam = f"{r.lam:g}" if r.bayesian else "-"
        table.add_row(r.run_id, r.model, lam, str(r.seed),
                      *(f"{r.metrics[m.name]:.{m.decimals}f}" for m in metrics))
    return table
