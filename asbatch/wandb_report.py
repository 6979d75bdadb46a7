"""A W&B Report for a sweep (wandb-workspaces): the paper's tables and panels over the sweep's runs.

Built only when W&B is online (it is saved to the W&B server); offline, `asbatch report` writes the same
tables and plots as a static page (asbatch.plots.build_static_report).
"""

from __future__ import annotations

from typing import Any


def build_wandb_report(sweep: str, project: str, entity: str | None, tables_md: str) -> Any:
    """The report object (not yet saved): title, the tables as markdown, and panels over the runs whose
    config.sweep is this sweep (what asbatch.tracking logs: history per global step, evaluation summary)."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(entity=entity or "", project=project, name=sweep, filters=f"Config('sweep') = '{sweep}'",
                       groupby=["config.adversarial.lam"])
    panels = [
        wr.LinePlot(title="Test accuracy, mean weights", x="Step", y=["test_acc_mean"]),
        wr.LinePlot(title="Test accuracy, one weight sample", x="Step", y=["test_acc_sample"]),
        wr.LinePlot(title="Training loss", x="Step", y=["train_loss"]),
        wr.BarPlot(title="Lowest / highest / ensembled accuracy",
                   metrics=["evaluation/lowest_accuracy", "evaluation/highest_accuracy",
                            "evaluation/ensemble_accuracy"]),
        wr.BarPlot(title="Calibration", metrics=["evaluation/ece", "evaluation/nll", "evaluation/brier"]),
    ]
    kwargs = {"entity": entity} if entity else {}  # otherwise W&B's default entity of the logged-in user
    return wr.Report(
        project=project, title=f"asbatch sweep {sweep}"[:128],
        description="Adversarial Sampling for Bayesian neural networks: runs grouped by lambda.",
        blocks=[
            wr.H1(text=f"Sweep {sweep}"),
            wr.P(text="Tables: mean ± std over seeds; the better of AS / no AS in bold (asbatch table)."),
            wr.MarkdownBlock(text=tables_md),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],
        **kwargs,
    )
