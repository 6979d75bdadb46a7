"""Finished runs as flat records, read from a sweep's run dirs or from its W&B runs (both give the same records).

Flow: `records_from_run_dirs(sweep_dir)` or `records_from_wandb(api, path, sweep)` -> `RecordList` (one
`Record` per finished run of the sweep, sorted by run id; `.unfinished` names the others, `.foreign` the run
dirs of another sweep found in the dir, which are ignored). A record carries the metrics of the registry
(asbatch.analysis.metrics) scaled as it says: accuracies in %, as in the paper; ece, nll, brier, aurc and
ood_auroc as `evaluate` computes them (fractions / nats); its resolved config (flat, dotted keys) and its
train summary (the last epoch's row: from the run dir's per-epoch metrics, or the W&B summary, which holds
the last value logged of every key).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asbatch.analysis.configs import flatten_config
from asbatch.analysis.metrics import BY_NAME, METRICS, SAMPLE_ACCURACIES
from asbatch.rundir import RunDir, RunDirError, SweepDir, damaged, read_json
from asbatch.tracking.keys import EVAL_PREFIX, unflatten_evaluation

DEFAULT_WANDB_PROJECT = "asbatch"


@dataclass(frozen=True, init=False)
class Record:
    """One finished run, flat. Metrics by name in `metrics` and as attributes (`record.ensemble`); `config`:
    the resolved config as {dotted key: value} ({} when built without one); `train`: the train summary (the
    last epoch's row); `history` (the per-epoch rows) only when asked for; `reliability`: the reliability
    diagram's bins (run dirs only: W&B keeps the diagram as an image; not compared)."""

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
    config: dict[str, Any]
    train: dict[str, Any]
    reliability: dict[str, list] | None = field(compare=False)

    def __init__(self, *, run_id: str, sweep: str, stage: str, data: str, model: str, bayesian: bool, lam: float,
                 as_on: bool, fine_tuned: bool, seed: int, variant: str = "paper",
                 sample_accuracies: Iterable[float] = (), history: Iterable[Mapping[str, Any]] | None = None,
                 config: Mapping[str, Any] | None = None, train: Mapping[str, Any] | None = None,
                 reliability: Mapping[str, list] | None = None,
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
                  "history": None if history is None else tuple(dict(row) for row in history),
                  "config": flatten_config(config or {}), "train": dict(train or {}),
                  "reliability": None if reliability is None else dict(reliability)}
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields: the metrics
        metrics = self.__dict__.get("metrics")
        if metrics is None or name not in metrics:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return metrics[name]


class RecordList(list):
    """A list of `Record`s that also says which runs were skipped: `unfinished` (run ids) and `foreign` (run id
    -> sweep: run dirs of another sweep found in the sweep's dir, e.g. copied there; never read as its runs)."""

    def __init__(self, records: Iterable[Record] = (), unfinished: Iterable[str] = (),
                 foreign: Mapping[str, str] | None = None):
        super().__init__(records)
        self.unfinished: tuple[str, ...] = tuple(unfinished)
        self.foreign: dict[str, str] = dict(foreign or {})


def record_from_results(results: Mapping[str, Any], history: Sequence[Mapping[str, Any]] | None = None,
                        train: Mapping[str, Any] | None = None) -> Record:
    """The `Record` of one results dict (what a run dir's results hold: run_id, sweep, stage, config,
    evaluation); `train`: its train summary (default: the last row of `history`, if given)."""
    cfg, ev = results["config"], results["evaluation"]
    lam = float(cfg["adversarial"]["lam"])
    if train is None and history:
        train = history[-1]
    return Record(
        run_id=results["run_id"], sweep=results["sweep"], stage=results["stage"],
        data=cfg["data"]["name"], model=cfg["model"]["name"], bayesian=bool(cfg["model"]["bayesian"]),
        lam=lam, as_on=lam > 0, fine_tuned=cfg["model"].get("init_from") is not None, seed=int(cfg["seed"]),
        variant=str(cfg["adversarial"].get("variant", "paper")),
        sample_accuracies=SAMPLE_ACCURACIES.read_all(ev), history=history, config=cfg, train=train,
        reliability=ev.get("reliability"), **{m.name: m.read(ev) for m in METRICS},
    )


def sweep_name(sweep_dir: str | Path) -> str:
    """The sweep a sweep dir holds: the one its manifest names (if submitted), else the dir's name."""
    sweep = SweepDir(sweep_dir)
    if sweep.is_submitted():
        try:
            data = read_json(sweep.manifest_file)
        except RunDirError:
            return sweep.name  # reading its submissions names the damage
        named = data.get("sweep") if isinstance(data, dict) else None
        return named if isinstance(named, str) and named else sweep.name
    return sweep.name


def _started_sweep(run: RunDir, default: str) -> str:
    """The sweep an unfinished run's written config names (`default` before it has one; a damaged one is a
    RunDirError naming it)."""
    return str((run.read_config() or {}).get("sweep", default))


def _record_of(run: RunDir, results: dict[str, Any], history: bool) -> Record:
    """The run's `Record`; results whose config or evaluation lack what a record needs are damaged."""
    rows = run.read_metrics()
    try:
        return record_from_results(results, rows if history else None, train=rows[-1] if rows else {})
    except KeyError as err:
        raise damaged(run.results_file, "results", f"no {err} where a record needs it") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise damaged(run.results_file, "results", f"config or evaluation: {' '.join(str(err).split())}") from None


def records_from_run_dirs(sweep_dir: str | Path, history: bool = False, sweep: str | None = None) -> RecordList:
    """One `Record` per finished run of the sweep under `sweep_dir` (`<runs_root>/<sweep>`), sorted by run id.

    Only runs whose config names the sweep (`sweep`, default `sweep_name(sweep_dir)`) are read; run dirs of
    another sweep are listed in `.foreign`. Unfinished run dirs are skipped and listed in `.unfinished`, as
    are runs the sweep's manifest (if it has one) records as submitted that have no run dir yet.
    `history=True` also keeps each run's per-epoch rows (the last one is the train summary either way).
    """
    sweep_dir = SweepDir(sweep_dir)
    if not sweep_dir.path.is_dir():
        raise FileNotFoundError(f"no sweep dir at {sweep_dir.path}")
    sweep = sweep or sweep_name(sweep_dir.path)
    records, unfinished, foreign = [], [], {}
    for run in sweep_dir.runs():
        results = run.read_results()
        owner = (results or {}).get("sweep") or _started_sweep(run, sweep)
        if owner != sweep:
            foreign[run.run_id] = owner
        elif results is None:
            unfinished.append(run.run_id)
        else:
            records.append(_record_of(run, results, history))
    seen = {r.run_id for r in records} | set(unfinished) | set(foreign)
    unfinished += [run_id for run_id in sweep_dir.submitted_run_ids() if run_id not in seen]
    return RecordList(sorted(records, key=lambda r: r.run_id), unfinished, foreign)


def _summary_dict(summary: Any) -> dict[str, Any]:
    return {k: summary[k] for k in summary.keys()}  # noqa: SIM118 - a W&B summary is not a dict


def records_from_wandb(api: Any, path: str, sweep: str, history: bool = False) -> RecordList:
    """One `Record` per finished W&B run of `sweep`: `api.runs(path, filters={"group": sweep})` (path is
    "entity/project" or "project"; `api` a `wandb.Api()`), sorted by run id.

    A run is finished when its summary holds the evaluation (`evaluation/ensemble_accuracy`); the others are
    listed in `.unfinished`, runs whose config names another sweep in `.foreign`. The W&B run id is the run
    id, group = sweep, job_type = stage, config = the resolved RunConfig dict (as asbatch.tracking writes
    them). The train summary is the rest of the summary (the last value of every per-epoch key; W&B's own
    "_" keys dropped). `history=True` also reads the per-epoch rows (those with an "epoch" key) with
    `run.scan_history()`.
    """
    records, unfinished, foreign = [], [], {}
    for run in api.runs(path, filters={"group": sweep}):
        summary = _summary_dict(run.summary)
        evaluation = unflatten_evaluation(summary)
        config = json.loads(json.dumps(dict(run.config), sort_keys=True))  # keys in the run dir's order
        if config.get("sweep", sweep) != sweep:
            foreign[run.id] = config["sweep"]
            continue
        if "ensemble_accuracy" not in evaluation:
            unfinished.append(run.id)
            continue
        results = {"run_id": run.id, "sweep": getattr(run, "group", None) or config.get("sweep", sweep),
                   "stage": getattr(run, "job_type", None) or config.get("stage"),
                   "config": config, "evaluation": evaluation}
        rows = None
        if history:
            rows = [_as_written(row) for row in run.scan_history() if "epoch" in row]
        train = _as_written({k: v for k, v in summary.items() if not k.startswith(EVAL_PREFIX)})
        records.append(record_from_results(results, rows, train=train))
    return RecordList(sorted(records, key=lambda r: r.run_id), unfinished, foreign)


_COUNTERS = ("epoch", "global_step")  # the per-epoch keys that are integers; every other one is a float


def _as_written(row: Mapping[str, Any]) -> dict[str, Any]:
    """A per-epoch row as W&B serves it, made equal to the run dir's line: W&B's internal `_` keys dropped,
    keys sorted (the run dir's metrics are written sorted), and floats that W&B's JSON turned into ints (an lr of
    0.0 comes back as 0) floats again, so a frame from W&B has the run dirs' columns and dtypes."""
    return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) and k not in _COUNTERS else v
            for k, v in sorted(row.items()) if not k.startswith("_")}


def default_wandb_path(sweep_dir: str | Path) -> str:
    """"entity/project" (or "project") from the tracking section of any run of the sweep dir; "asbatch" if
    there is none."""
    for run in SweepDir(sweep_dir).runs():
        tracking = (run.read_results() or {}).get("config", {}).get("tracking")
        if tracking is None:
            tracking = (run.read_config() or {}).get("tracking")
        if isinstance(tracking, dict) and tracking:
            project = tracking.get("project") or DEFAULT_WANDB_PROJECT
            return f"{tracking['entity']}/{project}" if tracking.get("entity") else project
    return DEFAULT_WANDB_PROJECT


class WandbUnavailable(RuntimeError):
    """W&B could not be asked (no API key, no network, no such project): its reason, in one line."""


@contextlib.contextmanager
def asking_wandb(what: str) -> Iterator[None]:
    """Turn whatever wandb raises while `what` into one asbatch message (wandb's own types and wording vary)."""
    try:
        yield
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise WandbUnavailable(f"W&B: {what} failed: {reason}") from err


def load_records(sweep_dir: str | Path, source: str = "local", wandb_path: str | None = None, api: Any = None,
                 history: bool = False) -> RecordList:
    """Records of a sweep from its run dirs (`source="local"`) or from W&B (`source="wandb"`: the sweep name
    is the dir's name, `wandb_path` defaults to `default_wandb_path(sweep_dir)`, `api` to `wandb.Api()`)."""
    if source == "local":
        return records_from_run_dirs(sweep_dir, history=history)
    if source == "wandb":
        path = wandb_path or default_wandb_path(sweep_dir)
        with asking_wandb(f"reading the runs of {path}"):
            if api is None:
                import wandb

                api = wandb.Api()
            return records_from_wandb(api, path, Path(sweep_dir).name, history=history)
    raise ValueError(f"source must be 'local' or 'wandb', got {source!r}")


def describe(records: RecordList | Sequence[Record]) -> str:
    """One line: how many runs were read, how many of them Bayesian, how many are unfinished, and which run
    dirs of other sweeps were ignored."""
    unfinished, foreign = getattr(records, "unfinished", ()), getattr(records, "foreign", {})
    bayes = sum(r.bayesian for r in records)
    line = f"{len(records)} finished runs ({bayes} Bayesian, {len(records) - bayes} deterministic)"
    line += f", {len(unfinished)} unfinished (skipped)" if unfinished else ""
    if foreign:
        sweeps = ", ".join(f"{s!r}: {sum(v == s for v in foreign.values())}" for s in sorted(set(foreign.values())))
        line += f", {len(foreign)} run dir(s) of another sweep ignored ({sweeps})"
    return line
