"""The reports of a sweep: the static report (report.md / report.html with tables and figures) and the W&B Report.

`build_static_report(sweep_dir)` writes into the sweep's report dir and works offline. `build_wandb_report`
builds a W&B Report (wandb-workspaces) with the same tables and panels over the sweep's runs; it is saved to
the W&B server, so only when W&B is online.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asbatch.analysis.aggregate import experiments
from asbatch.analysis.configs import INIT_FROM, NOT_SCIENCE, differing_keys, experiment_id
from asbatch.analysis.metrics import PAPER_TABLES, table_metrics
from asbatch.analysis.plots import ANALYSIS_PLOTS, write_plots
from asbatch.analysis.records import Record, describe, records_from_run_dirs
from asbatch.analysis.tables import sweep_tables
from asbatch.rundir import SweepDir

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table.paper{border-collapse:collapse;margin:1.5em 0;font-size:14px}
table.paper caption{text-align:left;margin-bottom:.4em}
table.paper th,table.paper td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
table.paper th:nth-child(-n+2),table.paper td:nth-child(-n+2){text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}"""


GROUPING = ("Runs are grouped by their resolved config without the seed and the keys that do not change the "
            f"science ({', '.join(NOT_SCIENCE)}): n is the number of seeds, every ± and every error bar or band "
            "is ± 1 sample std over those seeds, and rows of different configs name the keys in which they differ.")


def shown_name(name: str) -> str:
    """A file name as text a UTF-8 file can hold: bytes that are not UTF-8 (a surrogate in the str) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def build_static_report(sweep_dir: str | Path, out_dir: str | Path | None = None,
                        records: Sequence[Record] | None = None) -> Path:
    """Write report.md and report.html (tables + figures) for the sweep into `out_dir` (default: the sweep's
    report dir), next to the figures' PNGs; report.html is self-contained (PNGs embedded).
    `records` defaults to `records_from_run_dirs(sweep_dir, history=True)` (the training curves need the
    per-epoch rows). Returns the path of report.html."""
    sweep = SweepDir(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep.report_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if records is None:
        records = records_from_run_dirs(sweep.path, history=True)
    pngs = write_plots(records, out_dir)
    title = f"Sweep {shown_name(sweep.name)}"
    summary = describe(records)

    md = [f"# {title}", "", summary + ".", "", GROUPING, "", "## Tables", "", sweep_tables(records, "md").rstrip(),
          "", "## Figures", ""]
    for name, path in pngs.items():
        md += [f"### {ANALYSIS_PLOTS[name][0]}", "", f"![{name}]({path.name})", ""]
    (out_dir / "report.md").write_text("\n".join(md))

    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary)}.</p>", f"<p>{html.escape(GROUPING)}</p>",
            "<h2>Tables</h2>",
            sweep_tables(records, "html"), "<h2>Figures</h2>"]
    for name, path in pngs.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body += [f"<h3>{html.escape(ANALYSIS_PLOTS[name][0])}</h3>",
                 f'<img alt="{name}" src="data:image/png;base64,{data}">']
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    report = out_dir / "report.html"
    report.write_text(page)
    return report


def wandb_groupby(records: Sequence[Record]) -> list[str]:
    """How the W&B Report groups the sweep's runs: by every config key in which its experiments differ (as
    `config.<dotted key>`), so that a W&B panel, like the tables, never averages runs of different configs;
    by lambda where there is nothing else. (A fine-tune's upstream recipe is not a W&B config key: fine-tunes
    are grouped by their own config.)"""
    configs = {experiment_id(c): c for c in experiments(list(records))}
    keys = [k for k in differing_keys(configs.values()) if not k.startswith(INIT_FROM + ".") and k != INIT_FROM]
    return [f"config.{k}" for k in keys] or ["config.adversarial.lam"]


def build_wandb_report(sweep: str, project: str, entity: str | None, tables_md: str,
                       records: Sequence[Record] = ()) -> Any:
    """The W&B Report (not yet saved): title, the tables as markdown, and panels over the runs whose
    config.sweep is this sweep, grouped by `wandb_groupby(records)`: the training history (per global step)
    and a bar panel per paper table that has one (`PaperTable.wandb_panel`) over the evaluation summary."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(entity=entity or "", project=project, name=sweep, filters=f"Config('sweep') = '{sweep}'",
                       groupby=wandb_groupby(records))
    panels = [
        wr.LinePlot(title="Test accuracy, mean weights", x="Step", y=["test_acc_mean"]),
        wr.LinePlot(title="Test accuracy, one weight sample", x="Step", y=["test_acc_sample"]),
        wr.LinePlot(title="Training loss", x="Step", y=["train_loss"]),
        *(wr.BarPlot(title=table.wandb_panel, metrics=[m.wandb_key for m in table_metrics(table.name)])
          for table in PAPER_TABLES if table.wandb_panel),
    ]
    kwargs = {"entity": entity} if entity else {}  # otherwise W&B's default entity of the logged-in user
    return wr.Report(
        project=project, title=f"asbatch sweep {sweep}"[:128],
        description="Adversarial Sampling for Bayesian neural networks: runs grouped by the config keys in which "
                    "they differ.",
        blocks=[
            wr.H1(text=f"Sweep {sweep}"),
            wr.P(text="Tables: mean ± 1 std over n seeds (runs of different configs never pooled); the better of "
                        "AS / no AS in bold (asbatch table)."),
            wr.MarkdownBlock(text=tables_md),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],
        **kwargs,
    )
