"""Reading finished runs (run dirs or W&B) into records, aggregating them over seeds, and the paper's tables.

Flow: `records_from_run_dirs(sweep_dir)` or `records_from_wandb(api, path, sweep)` -> `list[Record]` (one per
finished run; both sources give identical records for the same runs) -> `aggregate(records)` -> `list[Group]`
(mean, sample std and n of every metric over the runs of a group, by default over seeds) ->
`paper_tables(groups, fmt)` -> text (Markdown, LaTeX, CSV or HTML).

Units: in a `Record` the accuracies (lowest, highest, mean_acc, ensemble, retained_*, sample_accuracies) are
in %, as in the paper; ece, nll, brier, aurc and ood_auroc stay as `evaluate` computes them (fractions / nats).

W&B key scheme: a run's evaluation is stored in its W&B summary under `evaluation/<name>`, nested dicts and
lists flattened with "/" (`evaluation/retained_accuracy/0.2`, `evaluation/sample_accuracies/0`); see
`flatten_evaluation` (writer: asbatch.tracking) and `unflatten_evaluation` (reader: here).
"""

from __future__ import annotations

import csv
import html
import io
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from rich.table import Table

RETAINED = ("0.2", "0.4", "0.6", "0.8")


def load_results(run_dir: Path) -> dict[str, Any] | None:
    """The run's results.json, or None while it has not finished."""
    path = Path(run_dir) / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_table(results: Iterable[dict[str, Any]], title: str = "runs") -> Table:
    """Per-run table: lowest / highest / ensembled accuracy and accuracy on the X% most certain data."""
    table = Table(title=title)
    for col in ("run", "model", "lambda", "seed", "lowest", "highest", "ensembled",
                *(f"{int(float(f) * 100)}% kept" for f in RETAINED)):
        table.add_column(col, justify="left" if col in ("run", "model") else "right", no_wrap=True)
    for r in map(record_from_results, results):
        lam = f"{r.lam:g}" if r.bayesian else "-"
        table.add_row(r.run_id, r.model, lam, str(r.seed), f"{r.lowest:.2f}", f"{r.highest:.2f}",
                      f"{r.ensemble:.2f}", *(f"{getattr(r, m):.2f}" for m in RETAINED_METRICS))
    return table


# ------------------------------------------------------------------------------------------- records

RETAINED_METRICS = tuple(f"retained_{round(100 * float(f))}" for f in RETAINED)  # retained_20 .. retained_80
PERCENT_METRICS = ("lowest", "highest", "mean_acc", "ensemble", *RETAINED_METRICS)
OTHER_METRICS = ("ece", "nll", "brier", "aurc", "ood_auroc")
METRICS = PERCENT_METRICS + OTHER_METRICS
LOWER_IS_BETTER = frozenset({"ece", "nll", "brier", "aurc"})
DEFAULT_BY = ("data", "model", "as_on", "fine_tuned")


@dataclass(frozen=True)
class Record:
    """One finished run, flat. Accuracies in %; `history` (metrics.jsonl rows) only when asked for."""

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
    lowest: float
    highest: float
    mean_acc: float
    ensemble: float
    retained_20: float
    retained_40: float
    retained_60: float
    retained_80: float
    ece: float
    nll: float
    brier: float
    aurc: float
    ood_auroc: float | None = None
    sample_accuracies: tuple[float, ...] = ()
    history: tuple[dict[str, Any], ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class RecordList(list):
    """A list of `Record`s that also says which runs were skipped as unfinished (`unfinished`: run ids)."""

    def __init__(self, records: Iterable[Record] = (), unfinished: Iterable[str] = ()):
        super().__init__(records)
        self.unfinished: tuple[str, ...] = tuple(unfinished)


def record_from_results(results: Mapping[str, Any], history: Sequence[Mapping[str, Any]] | None = None) -> Record:
    """The `Record` of one results dict (results.json: run_id, sweep, stage, config, evaluation)."""
    cfg, ev = results["config"], results["evaluation"]
    lam = float(cfg["adversarial"]["lam"])
    retained = ev["retained_accuracy"]
    ood = ev.get("ood_auroc")
    return Record(
        run_id=results["run_id"], sweep=results["sweep"], stage=results["stage"],
        data=cfg["data"]["name"], model=cfg["model"]["name"], bayesian=bool(cfg["model"]["bayesian"]),
        lam=lam, as_on=lam > 0, fine_tuned=cfg["model"].get("init_from") is not None, seed=int(cfg["seed"]),
        lowest=100 * ev["lowest_accuracy"], highest=100 * ev["highest_accuracy"],
        mean_acc=100 * ev["mean_accuracy"], ensemble=100 * ev["ensemble_accuracy"],
        **{m: 100 * retained[f] for m, f in zip(RETAINED_METRICS, RETAINED)},
        ece=ev["ece"], nll=ev["nll"], brier=ev["brier"], aurc=ev["aurc"],
        ood_auroc=None if ood is None else float(ood),
        sample_accuracies=tuple(100 * a for a in ev["sample_accuracies"]),
        history=None if history is None else tuple(dict(row) for row in history),
    )


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _manifest_run_ids(sweep_dir: Path) -> list[str]:
    """Run ids the sweep's manifest.json (written by asbatch.launch) records as submitted, if it has one."""
    path = sweep_dir / "manifest.json"
    if not path.is_file():
        return []
    return list(dict.fromkeys(r["run_id"] for r in json.loads(path.read_text()).get("submissions", [])))


def _looks_like_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("results.json", "config.yaml", "checkpoints"))


def records_from_run_dirs(sweep_dir: str | Path, history: bool = False) -> RecordList:
    """One `Record` per finished run under `sweep_dir` (`<runs_root>/<sweep>`), sorted by run id.

    Run dirs without results.json are skipped and listed in `.unfinished`, as are runs named in the sweep's
    manifest.json (if present) that have no run dir yet. `history=True` also reads each run's metrics.jsonl.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep dir at {sweep_dir}")
    records, unfinished = [], []
    for run_dir in sorted(p for p in sweep_dir.iterdir() if _looks_like_run_dir(p)):
        results = load_results(run_dir)
        if results is None:
            unfinished.append(run_dir.name)
            continue
        records.append(record_from_results(results, _read_history(run_dir) if history else None))
    seen = {r.run_id for r in records} | set(unfinished)
    unfinished += [run_id for run_id in _manifest_run_ids(sweep_dir) if run_id not in seen]
    return RecordList(sorted(records, key=lambda r: r.run_id), unfinished)


# ----------------------------------------------------------------------------------------------- W&B

EVAL_PREFIX = "evaluation/"
NOT_IN_SUMMARY = frozenset({"reliability"})  # bulky per-bin lists; the tracker logs the diagram as an image


def flatten_evaluation(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B summary entries of an evaluation dict: `evaluation/<name>` for every scalar; nested dicts and
    lists are flattened with "/" (`evaluation/retained_accuracy/0.2`, `evaluation/sample_accuracies/0`), so
    every summary value is a plain scalar (W&B keeps them exactly). `reliability` is left out."""
    out: dict[str, Any] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{key}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{key}/{i}", v)
        else:
            out[key] = value

    for name, value in evaluation.items():
        if name not in NOT_IN_SUMMARY:
            walk(EVAL_PREFIX + name, value)
    return out


class _Node(dict):
    """A container built by `unflatten_evaluation` (so that a dict-valued leaf is not mistaken for one)."""


def unflatten_evaluation(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_evaluation`: the evaluation dict from a W&B summary (other keys are ignored).

    A level whose keys are all digits becomes a list. Where a key is both a value and a prefix of other keys
    (e.g. a W&B Table logged as `evaluation/sample_accuracies` beside `evaluation/sample_accuracies/0`), the
    flattened entries win."""
    root = _Node()
    for key in sorted(k for k in summary.keys() if isinstance(k, str) and k.startswith(EVAL_PREFIX)):
        parts = key[len(EVAL_PREFIX):].split("/")
        node = root
        for part in parts[:-1]:
            if not isinstance(node.get(part), _Node):
                node[part] = _Node()  # replaces a leaf that also served as a prefix
            node = node[part]
        if not isinstance(node.get(parts[-1]), _Node):
            node[parts[-1]] = summary[key]

    def plain(value: Any) -> Any:
        if not isinstance(value, _Node):
            return value
        if value and all(k.isdigit() for k in value):
            return [plain(value[k]) for k in sorted(value, key=int)]
        return {k: plain(v) for k, v in value.items()}

    return plain(root)


def _summary_dict(summary: Any) -> dict[str, Any]:
    return {k: summary[k] for k in summary.keys()}


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
    sweep_dir = Path(sweep_dir)
    if sweep_dir.is_dir():
        for run_dir in sorted(sweep_dir.iterdir()):
            results = load_results(run_dir) if run_dir.is_dir() else None
            tracking = (results or {}).get("config", {}).get("tracking")
            if tracking is None and (run_dir / "config.yaml").is_file():
                import yaml

                tracking = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("tracking")
            if tracking:
                project = tracking.get("project") or "asbatch"
                return f"{tracking['entity']}/{project}" if tracking.get("entity") else project
    return "asbatch"


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


# ----------------------------------------------------------------------------------------- aggregate


class Stat(NamedTuple):
    """A metric over the runs of a group: mean, sample std (ddof=1; 0.0 for one run), number of runs that
    have it (mean and std are None when none does)."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class Group:
    """The runs sharing the values of the `by` fields (`key`), and their metric statistics."""

    key: dict[str, Any]
    n: int
    run_ids: tuple[str, ...]
    lams: tuple[float, ...]  # the distinct lambdas among the runs, ascending
    stats: dict[str, Stat]
    sample_accuracies: tuple[float, ...] = field(default=())  # every run's per-sample accuracies, pooled (%)

    def __getitem__(self, metric: str) -> Stat:
        return self.stats[metric]

    def get(self, name: str, default: Any = None) -> Any:
        return self.key.get(name, default)


DATA_ORDER = ("cifar10", "cifar100", "svhn", "digits", "synthetic")
MODEL_ORDER = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg11", "vgg13", "vgg16", "vgg19",
               "mlp")
_ORDERS = {"data": DATA_ORDER, "model": MODEL_ORDER}


def _sort_value(name: str, value: Any) -> tuple:
    order = _ORDERS.get(name, ())
    if value in order:
        return (0, order.index(value), "")
    if isinstance(value, (bool, int, float)):
        return (1, float(value), "")
    return (2, 0, "" if value is None else str(value))


def stat(values: Sequence[float | None]) -> Stat:
    """`Stat` of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


def aggregate(records: Iterable[Record], by: Sequence[str] = DEFAULT_BY, bayesian_only: bool = True) -> list[Group]:
    """Group records by the values of the `by` fields and compute each metric's mean, std (ddof=1) and n.

    Deterministic runs (e.g. the pretrain stage of a fine-tune sweep) are left out unless `bayesian_only` is
    False: the paper's tables compare Bayesian networks. Groups are ordered by `by` (data sets and models in
    the paper's order, False before True)."""
    buckets: dict[tuple, list[Record]] = {}
    for r in records:
        if bayesian_only and not r.bayesian:
            continue
        buckets.setdefault(tuple(getattr(r, f) for f in by), []).append(r)
    groups = []
    for key in sorted(buckets, key=lambda k: tuple(_sort_value(f, v) for f, v in zip(by, k))):
        rs = buckets[key]
        groups.append(Group(
            key=dict(zip(by, key)), n=len(rs), run_ids=tuple(r.run_id for r in rs),
            lams=tuple(sorted({r.lam for r in rs})),
            stats={m: stat([getattr(r, m) for r in rs]) for m in METRICS},
            sample_accuracies=tuple(a for r in rs for a in r.sample_accuracies)))
    return groups


# ---------------------------------------------------------------------------------------------- tables

DATA_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "digits": "Digits",
              "synthetic": "Synthetic"}


def model_display_name(name: str) -> str:
    """resnet20 -> ResNet20, vgg16 -> VGG16, mlp -> MLP; anything else unchanged."""
    if name.startswith("resnet"):
        return "ResNet" + name[len("resnet"):]
    if name.startswith("vgg"):
        return "VGG" + name[len("vgg"):]
    return "MLP" if name == "mlp" else name


def data_display_name(name: str) -> str:
    """cifar10 -> CIFAR-10, cifar100 -> CIFAR-100, digits -> Digits; anything else unchanged."""
    return DATA_NAMES.get(name, name)


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    columns: tuple[tuple[str, str], ...]  # (metric, header)


TABLES = (
    TableSpec("accuracy", "Lowest, highest and ensembled accuracy (%)",
              (("lowest", "Lowest Accuracy"), ("highest", "Highest Accuracy"), ("ensemble", "Ensembled Accuracy"))),
    TableSpec("retained", "Ensembled accuracy (%) on the most certain part of the test data",
              tuple((m, f"{m.split('_')[1]} % data retained") for m in RETAINED_METRICS)),
    TableSpec("calibration", "Calibration, selective prediction and OOD detection",
              (("ece", "ECE"), ("nll", "NLL"), ("brier", "Brier"), ("aurc", "AURC"), ("ood_auroc", "OOD AUROC"))),
)
FORMATS = ("md", "latex", "csv", "html")
_IDENTITY = ("data", "model", "fine_tuned", "as_on", "lam")


def decimals(metric: str) -> int:
    """Digits shown for a metric: 2 for accuracies (%), 4 for the rest."""
    return 2 if metric in PERCENT_METRICS else 4


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (\\ & % $ # _ { } ~ ^) in plain text."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def md_escape(text: str) -> str:
    """Escape characters that would break or restyle a Markdown table cell."""
    return "".join("\\" + c if c in "\\|*_`" else c for c in str(text))


def best_cells(groups: Sequence[Group], metric: str) -> set[int]:
    """Indices (into `groups`, which are rows to compare with each other) of the strictly better cells of
    `metric`, comparing means rounded as displayed: higher is better except for ECE, NLL, Brier and AURC.
    Empty when fewer than two rows have a value or when they are all equal (nothing is better)."""
    dp = decimals(metric)
    values = {i: round(g[metric].mean, dp) for i, g in enumerate(groups) if g[metric].mean is not None}
    if len(values) < 2 or len(set(values.values())) == 1:
        return set()
    best = (min if metric in LOWER_IS_BETTER else max)(values.values())
    return {i for i, v in values.items() if v == best}


def _lam_text(values: Sequence[float], fmt: str) -> str:
    sym = {"latex": r"$\lambda$", "csv": "lambda"}.get(fmt, "λ")
    shown = ", ".join(f"{v:g}" for v in values)
    return f"{sym} = {shown}" if len(values) == 1 else f"{sym} in {{{shown}}}"


def row_label(group: Group, fmt: str = "md", show_lam: bool = False) -> str:
    """ "ResNet20" / "ResNet20 + AS", plus the lambdas when asked for or when an AS group mixes several, and
    any other grouping fields; escaped for `fmt`."""
    esc = {"latex": latex_escape, "md": md_escape, "html": html.escape}.get(fmt, str)
    label = esc(model_display_name(str(group.get("model"))))
    if group.get("as_on"):
        label += " + AS"
        if show_lam or len(group.lams) > 1:
            label += f" ({_lam_text(group.lams, fmt)})"
    extra = [f"{k}={v}" for k, v in group.key.items() if k not in _IDENTITY]
    if extra:
        label += " [" + esc(", ".join(extra)) + "]"
    return label


def _pair_key(group: Group) -> tuple:
    """Rows compared for bolding: same key except as_on and lam."""
    return tuple((k, v) for k, v in group.key.items() if k not in ("as_on", "lam"))


def _row_order(group: Group) -> tuple:
    extras = tuple(_sort_value(k, v) for k, v in group.key.items() if k not in _IDENTITY)
    return (_sort_value("data", group.get("data")), _sort_value("model", group.get("model")), extras,
            bool(group.get("as_on")), group.lams)


def _cell(s: Stat, metric: str, fmt: str, bold: bool) -> str:
    if s.mean is None:
        return {"latex": "--", "html": "&ndash;"}.get(fmt, "–")
    dp = decimals(metric)
    pm = {"latex": r" $\pm$ ", "html": " &plusmn; "}.get(fmt, " ± ")
    text = f"{s.mean:.{dp}f}{pm}{s.std:.{dp}f}"
    if not bold:
        return text
    return {"latex": rf"\textbf{{{text}}}", "html": f"<b>{text}</b>"}.get(fmt, f"**{text}**")


class _Section(NamedTuple):
    title: str
    columns: tuple[tuple[str, str], ...]
    rows: list[Group]


def _check_groups(groups: Sequence[Group]) -> None:
    for name in ("data", "model", "as_on"):
        if any(name not in g.key for g in groups):
            raise ValueError(f"paper_tables needs groups keyed by {name!r} (aggregate(records, by=...) "
                             f"must include it; the default {DEFAULT_BY} does)")


def _sections(groups: Sequence[Group], specs: Sequence[TableSpec] = TABLES) -> list[_Section]:
    """One section per table kind and fine-tune setting (scratch first), columns without any value dropped."""
    settings = sorted({g.get("fine_tuned") for g in groups}, key=lambda v: (v is not None, bool(v)))
    sections = []
    for spec in specs:
        for setting in settings:
            rows = sorted((g for g in groups if g.get("fine_tuned") == setting), key=_row_order)
            columns = tuple((m, h) for m, h in spec.columns if any(g[m].mean is not None for g in rows))
            if not rows or not columns:
                continue
            suffix = {True: ", Bayesian fine-tune", False: ", trained from scratch"}.get(setting, "")
            sections.append(_Section(spec.title + suffix, columns, rows))
    return sections


def _bold_map(rows: Sequence[Group], columns: Sequence[tuple[str, str]]) -> set[tuple[int, str]]:
    pairs: dict[tuple, list[int]] = {}
    for i, g in enumerate(rows):
        pairs.setdefault(_pair_key(g), []).append(i)
    bold = set()
    for members in pairs.values():
        for metric, _ in columns:
            bold |= {(members[j], metric) for j in best_cells([rows[i] for i in members], metric)}
    return bold


def _show_lam(rows: Sequence[Group]) -> set[int]:
    """Rows whose lambda must be shown: AS rows sharing their pair with another AS row."""
    counts: dict[tuple, int] = {}
    for g in rows:
        if g.get("as_on"):
            counts[_pair_key(g)] = counts.get(_pair_key(g), 0) + 1
    return {i for i, g in enumerate(rows) if g.get("as_on") and counts[_pair_key(g)] > 1}


NOTE = "mean ± std over n runs (seeds); the better of AS / no AS in bold"


def _format_md(section: _Section) -> str:
    bold, show = _bold_map(section.rows, section.columns), _show_lam(section.rows)
    head = ["Dataset", "Model", "n", *(h for _, h in section.columns)]
    lines = [f"**{section.title}** ({NOTE})", "", "| " + " | ".join(head) + " |",
             "| :-- | :-- | --: |" + " --: |" * len(section.columns)]
    previous = None
    for i, g in enumerate(section.rows):
        data = data_display_name(str(g.get("data")))
        cells = [md_escape(data) if data != previous else "", row_label(g, "md", i in show), str(g.n),
                 *(_cell(g[m], m, "md", (i, m) in bold) for m, _ in section.columns)]
        previous = data
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_latex(section: _Section) -> str:
    bold, show = _bold_map(section.rows, section.columns), _show_lam(section.rows)
    head = ["Dataset", "Model", "$n$", *(latex_escape(h) for _, h in section.columns)]
    note = NOTE.replace("±", r"$\pm$")
    lines = [r"\begin{table}[ht]", r"\centering",
             rf"\caption{{{latex_escape(section.title)}; {note}.}}",
             r"\begin{tabular}{ll" + "r" * (1 + len(section.columns)) + "}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule"]
    previous = None
    for i, g in enumerate(section.rows):
        data = data_display_name(str(g.get("data")))
        if previous is not None and data != previous:
            lines.append(r"\midrule")
        cells = [latex_escape(data) if data != previous else "", row_label(g, "latex", i in show), str(g.n),
                 *(_cell(g[m], m, "latex", (i, m) in bold) for m, _ in section.columns)]
        previous = data
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def _format_html(section: _Section) -> str:
    bold, show = _bold_map(section.rows, section.columns), _show_lam(section.rows)
    head = ["Dataset", "Model", "n", *(html.escape(h) for _, h in section.columns)]
    lines = ['<table class="paper">', f"<caption><b>{html.escape(section.title)}</b> ({html.escape(NOTE)})"
             "</caption>", "<thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    previous = None
    for i, g in enumerate(section.rows):
        data = data_display_name(str(g.get("data")))
        cells = [html.escape(data) if data != previous else "", row_label(g, "html", i in show), str(g.n),
                 *(_cell(g[m], m, "html", (i, m) in bold) for m, _ in section.columns)]
        previous = data
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def csv_columns(groups: Sequence[Group]) -> list[str]:
    """The header of `paper_tables(groups, "csv")`."""
    extra = list(dict.fromkeys(k for g in groups for k in g.key if k not in _IDENTITY))
    metrics = [m for spec in TABLES for m, _ in spec.columns if any(g[m].mean is not None for g in groups)]
    return ["dataset", "model", "fine_tuned", "as_on", "lambda", *extra, "n",
            *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))]


def _format_csv(groups: Sequence[Group]) -> str:
    columns = csv_columns(groups)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for g in sorted(groups, key=lambda g: (_sort_value("fine_tuned", g.get("fine_tuned")), _row_order(g))):
        row: dict[str, Any] = {"dataset": data_display_name(str(g.get("data"))),
                               "model": model_display_name(str(g.get("model"))),
                               "fine_tuned": g.get("fine_tuned", ""), "as_on": g.get("as_on"),
                               "lambda": ";".join(f"{v:g}" for v in g.lams), "n": g.n}
        row.update({k: v for k, v in g.key.items() if k not in _IDENTITY})
        for col in columns:
            metric, _, which = col.rpartition("_")
            if which in ("mean", "std") and metric in METRICS:
                value = getattr(g[metric], which)
                row[col] = "" if value is None else repr(value)
        writer.writerow(row)
    return out.getvalue()


def paper_tables(groups: Sequence[Group], fmt: str = "md") -> str:
    """The paper's tables for aggregated groups (`aggregate(records)`), as text.

    md / latex / html: (1) lowest / highest / ensembled accuracy, (2) accuracy at 20/40/60/80 % data retained,
    (3) ECE, NLL, Brier, AURC and (when any run has it) OOD AUROC; each once per fine-tune setting present
    (trained from scratch, Bayesian fine-tune). Rows: dataset (on its first row), "ResNet20" and
    "ResNet20 + AS", n runs; cells "mean ± std". Within each (data, model, fine_tuned) the better of AS vs no
    AS is bold (higher accuracy / AUROC, lower ECE / NLL / Brier / AURC; compared as displayed, ties: none).
    LaTeX needs \\usepackage{booktabs}.
    csv: one table, a row per group, every metric as <metric>_mean and <metric>_std columns (full precision,
    no bold); header: `csv_columns(groups)`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    groups = list(groups)
    if not groups:
        return "" if fmt == "csv" else "(no finished Bayesian runs)\n"
    _check_groups(groups)
    if fmt == "csv":
        return _format_csv(groups)
    render = {"md": _format_md, "latex": _format_latex, "html": _format_html}[fmt]
    return "\n\n".join(render(s) for s in _sections(groups)) + "\n"


def default_grouping(records: Iterable[Record]) -> tuple[str, ...]:
    """`DEFAULT_BY`, plus "lam" when some (data, model, fine-tune) has Bayesian AS runs with different lambdas
    (a lambda sweep): averaging over lambdas would mix different methods."""
    lams: dict[tuple, set[float]] = {}
    for r in records:
        if r.bayesian and r.as_on:
            lams.setdefault((r.data, r.model, r.fine_tuned), set()).add(r.lam)
    return DEFAULT_BY + ("lam",) if any(len(v) > 1 for v in lams.values()) else DEFAULT_BY


def sweep_tables(records: Sequence[Record], fmt: str = "md") -> str:
    """What `asbatch table` prints: `paper_tables(aggregate(records, by=default_grouping(records)), fmt)`
    (one row per lambda where a sweep has several)."""
    return paper_tables(aggregate(records, by=default_grouping(records)), fmt)
