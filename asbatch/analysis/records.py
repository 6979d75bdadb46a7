"""Finished runs as flat records, read from a sweep's run dirs or from its W&B runs (both give the same records).

Flow: `records_from_run_dirs(sweep_dir)` or `records_from_wandb(api, path, sweep)` -> `RecordList` (one
`Record` per finished run, sorted by run id; `.unfinished` names the others). A record carries the metrics of
the registry (asbatch.analysis.metrics) scaled as it says: accuracies in %, as in the paper; ece, nll,
brier, aurc and ood_auroc as `evaluate` computes them (fractions / nats).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asbatch.analysis.metrics import BY_NAME, METRICS, SAMPLE_ACCURACIES
from asbatch.rundir import SweepDir
from asbatch.tracking.keys import unflatten_evaluation

DEFAULT_WANDB_PROJECT = "asbatch"


@dataclass(frozen=True, init=False)
class Record:
    """One finished run, flat. Metrics by name in `metrics` and as attributes (`record.ensemble`);
    `history` (the per-epoch rows) only when asked for."""

    run_id: str
    sweep: str
    stage: str
    data: str
    model: str
    bayesian: bool
    lam: float
    as_on: bool       # lam > 0: trained with Adversarial Sampling
    fine_tuned: bool  # model.init_from is set: a Bayesian fine-tune of a pretrained net
    seed: int
    variant: str      # adversarial.variant: "paper" or "reference"
    metrics: dict[str, float | None]  # every registry metric by name; None where the run has no value
    sample_accuracies: tuple[float, ...]
    history: tuple[dict[str, Any], ...] | None

    def __init__(self, *, run_id: str, sweep: str, stage: str, data: str, model: str, bayesian: bool, lam: float,
                 as_on: bool, fine_tuned: bool, seed: int, variant: str = "paper",
                 sample_accuracies: Iterable[float] = (), history: Iterable[Mapping[str, Any]] | None = None,
                 **metrics: float | None) -> None:
        unknown = sorted(set(metrics) - set(BY_NAME))
        missing = [m.name for m in METRICS if not m.optional and m.name not in metrics]
        if unknown or missing:
            raise TypeError(f"Record: unknown metrics {unknown}, missing metrics {missing}")
        values = {"run_id": run_id, "sweep": sweep, "stage": stage, "data": data, "model": model,
                  "bayesian": bayesian, "lam": lam, "as_on": as_on, "fine_tuned": fine_tuned, "seed": seed,
                  "variant": variant,
                  "metrics": {m.name: metrics.get(m.name) for m in METRICS},
                  "sample_accuracies": tuple(sample_accuracies),
                  "history": None if history is None else tuple(dict(row) for row in history)}
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields: the metrics
        metrics = self.__dict__.get("metrics")
        if metrics is None or name not in metrics:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return metrics[name]


class RecordList(list):
    """A list of `Record`s that also says which runs were skipped as unfinished (`unfinished`: run ids)."""

    def __init__(self, records: Iterable[Record] = (), unfinished: Iterable[str] = ()):
        super().__init__(records)
        self.unfinished: tuple[str, ...] = tuple(unfinished)


def record_from_results(results: Mapping[str, Any], history: Sequence[Mapping[str, Any]] | None = None) -> Record:
    """The `Record` of one results dict (what a run dir's results hold: run_id, sweep, stage, config,
    evaluation)."""
    cfg, ev = results["config"], results["evaluation"]
    lam = float(cfg["adversarial"]["lam"])
    return Record(
        run_id=results["run_id"], sweep=results["sweep"], stage=results["stage"],
        data=cfg["data"]["name"], model=cfg["model"]["name"], bayesian=bool(cfg["model"]["bayesian"]),
        lam=lam, as_on=lam > 0, fine_tuned=cfg["model"].get("init_from") is not None, seed=int(cfg["seed"]),
        variant=str(cfg["adversarial"].get("variant", "paper")),
        sample_accuracies=SAMPLE_ACCURACIES.read_all(ev), history=history,
        **{m.name: m.read(ev) for m in METRICS},
    )


def records_from_run_dirs(sweep_dir: str | Path, history: bool = False) -> RecordList:
    """One `Record` per finished run under `sweep_dir` (`<runs_root>/<sweep>`), sorted by run id.

    Unfinished run dirs are skipped and listed in `.unfinished`, as are runs the sweep's manifest (if it has
    one) records as submitted that have no run dir yet. `history=True` also reads each run's per-epoch rows.
    """
    sweep = SweepDir(sweep_dir)
    if not sweep.path.is_dir():
        raise FileNotFoundError(f"no sweep dir at {sweep.path}")
    records, unfinished = [], []
    for run in sweep.runs():
        results = run.read_results()
        if results is None:
            unfinished.append(run.run_id)
            continue
        records.append(record_from_results(results, run.read_metrics() if history else None))
    seen = {r.run_id for r in records} | set(unfinished)
    unfinished += [run_id for run_id in sweep.submitted_run_ids() if run_id not in seen]
    return RecordList(sorted(records, key=lambda r: r.run_id), unfinished)


def _summary_dict(summary: Any) -> dict[str, Any]:
    return {k: summary[k] for k in summary.keys()}  # noqa: SIM118 - a W&B summary is not a dict


def records_from_wandb(api: Any, path: str, sweep: str, history: bool = False) -> RecordList:
    """One `Record` per finished W&B run of `sweep`: `api.runs(path, filters={"group": sweep})` (path is
    "entity/project" or "project"; `api` a `wandb.Api()`), sorted by run id.

    A run is finished when its summary holds the evaluation (`evaluation/ensemble_accuracy`); the others are
    listed in `.unfinished`. The W&B run id is the run id, group = sweep, job_type = stage, config = the
    resolved RunConfig dict (as asbatch.tracking writes them). `history=True` also reads the per-epoch rows
    (those with an "epoch" key, W&B's own "_" keys dropped) with `run.scan_history()`.
    """
    records, unfinished = [], []
    for run in api.runs(path, filters={"group": sweep}):
        evaluation = unflatten_evaluation(_summary_dict(run.summary))
        if "ensemble_accuracy" not in evaluation:
            unfinished.append(run.id)
            continue
        config = dict(run.config)
        results = {"run_id": run.id, "sweep": getattr(run, "group", None) or config.get("sweep", sweep),
                   "stage": getattr(run, "job_type", None) or config.get("stage"),
                   "config": config, "evaluation": evaluation}
        rows = None
        if history:
            rows = [{k: v for k, v in row.items() if not k.startswith("_")}
                    for row in run.scan_history() if "epoch" in row]
        records.append(record_from_results(results, rows))
    return RecordList(sorted(records, key=lambda r: r.run_id), unfinished)


def default_wandb_path(sweep_dir: str | Path) -> str:
    """"entity/project" (or "project") from the tracking section of any run of the sweep dir; "asbatch" if
    there is none."""
    for run in SweepDir(sweep_dir).runs():
        tracking = (run.read_results() or {}).get("config", {}).get("tracking")
        if tracking is None:
            tracking = (run.read_config() or {}).get("tracking")
        if tracking:
            project = tracking.get("project") or DEFAULT_WANDB_PROJECT
            return f"{tracking['entity']}/{project}" if tracking.get("entity") else project
    return DEFAULT_WANDB_PROJECT


def load_records(sweep_dir: str | Path, source: str = "local", wandb_path: str | None = None, api: Any = None,
                 history: bool = False) -> RecordList:
    """Records of a sweep from its run dirs (`source="local"`) or from W&B (`source="wandb"`: the sweep name
    is the dir's name, `wandb_path` defaults to `default_wandb_path(sweep_dir)`, `api` to `wandb.Api()`)."""
    if source == "local":
        return records_from_run_dirs(sweep_dir, history=history)
    if source == "wandb":
        if api is None:
            import wandb

            api = wandb.Api()
        return records_from_wandb(api, wandb_path or default_wandb_path(sweep_dir), Path(sweep_dir).name,
                                  history=history)
    raise ValueError(f"source must be 'local' or 'wandb', got {source!r}")


def describe(records: RecordList | Sequence[Record]) -> str:
    """One line: how many runs were read, how many of them Bayesian, and how many are unfinished."""
    unfinished = getattr(records, "unfinished", ())
    bayes = sum(r.bayesian for r in records)
    line = f"{len(records)} finished runs ({bayes} Bayesian, {len(records) - bayes} deterministic)"
    return line + (f", {len(unfinished)} unfinished (skipped)" if unfinished else "")
