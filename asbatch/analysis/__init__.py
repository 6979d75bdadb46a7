"""Analysis of finished runs: records (run dirs or W&B) -> aggregation over seeds -> tables, figures and reports.

    records = load_records(sweep_dir)                 # or records_from_wandb(wandb.Api(), "entity/project", sweep)
    groups = aggregate(records)                       # mean, std and n of every metric per configuration
    print(paper_tables(groups, "latex"))              # md, latex, html or csv
    build_static_report(sweep_dir)                    # <sweep>/report/report.{md,html} with the figures

Every metric is one entry of the registry in `asbatch.analysis.metrics`.
"""

from asbatch.analysis.aggregate import DEFAULT_BY, Group, Stat, aggregate, default_grouping, stat
from asbatch.analysis.metrics import METRICS, PAPER_TABLES, RETAINED, SAMPLE_ACCURACIES, Metric, PaperTable
from asbatch.analysis.plots import (
    ANALYSIS_PLOTS,
    plot_lambda_influence,
    plot_retained_curves,
    plot_sample_accuracy_distribution,
    write_plots,
)
from asbatch.analysis.records import (
    Record,
    RecordList,
    default_wandb_path,
    describe,
    load_records,
    record_from_results,
    records_from_run_dirs,
    records_from_wandb,
)
from asbatch.analysis.report import build_static_report, build_wandb_report
from asbatch.analysis.tables import FORMATS, csv_columns, latex_escape, md_escape, paper_tables, run_table, sweep_tables

__all__ = [
    "ANALYSIS_PLOTS", "DEFAULT_BY", "FORMATS", "METRICS", "PAPER_TABLES", "RETAINED", "SAMPLE_ACCURACIES", "Group",
    "Metric", "PaperTable", "Record", "RecordList", "Stat", "aggregate", "build_static_report", "build_wandb_report",
    "csv_columns", "default_grouping", "default_wandb_path", "describe", "latex_escape", "load_records", "md_escape",
    "paper_tables", "plot_lambda_influence", "plot_retained_curves", "plot_sample_accuracy_distribution",
    "record_from_results", "records_from_run_dirs", "records_from_wandb", "run_table", "stat", "sweep_tables",
    "write_plots",
]
