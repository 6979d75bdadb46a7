"""Analysis of finished runs: records (run dirs or W&B) -> aggregation over seeds -> tables, figures and reports.

    records = load_records(sweep_dir)                 # or records_from_wandb(wandb.Api(), "entity/project", sweep)
    groups = aggregate(records)                       # mean, std and n seeds of every metric per experiment
    print(paper_tables(groups, "latex"))              # md, latex, html or csv
    build_static_report(sweep_dir)                    # <sweep>/report/report.{md,html} with the figures

Every metric is one entry of the registry in `asbatch.analysis.metrics`; which config keys make an experiment
(runs of different configs are never pooled as seeds) is said once, in `asbatch.analysis.configs`.
"""

from asbatch.analysis.aggregate import DEFAULT_BY, Group, Stat, aggregate, default_grouping, experiments, per_seed, stat
from asbatch.analysis.configs import NOT_SCIENCE, experiment_config, flatten_config
from asbatch.analysis.curves import pooled_reliability, reliability_figure, training_curves_figure
from asbatch.analysis.metrics import METRICS, PAPER_TABLES, RETAINED, SAMPLE_ACCURACIES, Metric, PaperTable
from asbatch.analysis.plots import (
    ANALYSIS_PLOTS,
    lambda_influence_figure,
    plot_lambda_influence,
    plot_reliability,
    plot_retained_curves,
    plot_sample_accuracy_distribution,
    plot_training_curves,
    retained_curves_figure,
    sample_accuracy_distribution_figure,
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
    sweep_name,
)
from asbatch.analysis.report import build_static_report, build_wandb_report
from asbatch.analysis.tables import FORMATS, csv_columns, latex_escape, md_escape, paper_tables, run_table, sweep_tables

__all__ = [
    "ANALYSIS_PLOTS", "DEFAULT_BY", "FORMATS", "METRICS", "NOT_SCIENCE", "PAPER_TABLES", "RETAINED",
    "SAMPLE_ACCURACIES", "Group", "Metric", "PaperTable", "Record", "RecordList", "Stat", "aggregate",
    "build_static_report",
    "build_wandb_report", "csv_columns", "default_grouping", "default_wandb_path", "describe", "experiment_config",
    "experiments", "flatten_config", "lambda_influence_figure", "latex_escape", "load_records", "md_escape",
    "paper_tables", "per_seed", "plot_lambda_influence", "plot_reliability", "plot_retained_curves",
    "plot_sample_accuracy_distribution", "plot_training_curves", "pooled_reliability", "record_from_results",
    "records_from_run_dirs", "records_from_wandb", "reliability_figure", "retained_curves_figure", "run_table",
    "sample_accuracy_distribution_figure", "stat", "sweep_name", "sweep_tables", "training_curves_figure",
    "write_plots",
]
