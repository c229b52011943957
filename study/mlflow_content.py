"""What the MLflow mirror writes, so that the UI tells a study's story without the journal.

The mirror (study/mirror.py) owns when and how things reach MLflow; this module owns what they
say: the experiment marked as model training, a saved runs-table view per study (its trials ranked
by val_bpb, with status, changed knobs and hypothesis as columns: the link a study prints opens it),
a child run per trial named `<study>/t0003` that starts and ends when the trial did, with its
hypothesis as the description, its training-loss curve first on its metrics page, and its diff
against the baseline in formats the artifact viewer previews (MLflow shows `.txt` and `.html`, not
`.diff`). Metric names carry their unit (`_s` for study seconds, study/clock.py).

What the UI reads, looked up in MLflow 3.17's web app: a saved view is an experiment tag
`mlflow.sharedViewState.<id>` holding `{"name", "createdAt", "state"}`, opened by the URL
parameter `viewStateShareKey=<id>`; the GenAI or training sidebar comes from the URL parameter
`workflowType` (else a setting of the browser, GenAI by default: the experiment tag
`mlflow.experimentKind` is no longer read by 3.17's UI, but older UIs and the API read it); the run
page draws one chart per metric, alphabetically, in sections named by the metric's prefix before
`a/b`, each prefixed section above the unprefixed "Model metrics"; a line chart joins the points
of a metric in (step, timestamp) order.
"""
from __future__ import annotations

import difflib
import hashlib
import html
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from study.changes import knob_changes, summary
from study.progress import parse_step_line
from study.records import Result, Trial
from train.contract import LOG_FILE, RESULT_FILE, STEPS_FILE, TRAIN_FILE, read_tail

MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000
# Older MLflow 3 UIs read this experiment tag to choose between their GenAI and training views.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
DESCRIPTION_TAG = "mlflow.note.content"  # the UI's "Description" of an experiment or a run
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # a saved runs-table view of the experiment page
LOSS_CURVE = "train/loss"  # its own chart section, which the run page shows above the single values
EXPERIMENT_DESCRIPTION = (
    "autoresearch-arena: each parent run is one study (a searcher proposing edits to a small GPT's "
    "train.py); each child run `<study>/tNNNN` is one trial, trained for the study's fixed budget and "
    "scored in val_bpb (lower is better) by the fixed harness. The Views menu holds each study's trials "
    "ranked by val_bpb. Parent metric `best_val_bpb` is the running best by finished-trial index "
    "(`best_val_bpb_by_time`: by study second); a child's `train/loss` is its training curve and "
    "`train_diff.html` its change against the baseline.")
# The study-clock times of a trial, with the unit in the name.
TIME_METRICS = {"t_submitted": "t_submitted_s", "t_started": "t_started_s", "t_finished": "t_finished_s"}
# The numbers of a trial that stay metrics: what analysis/ reads by name and the runs table sorts
# by. Every other number is one value a chart shows no better than a table: a tag of the same name
# (and in the run's result.json), so that the run's metrics page leads with its loss curve instead
# of a wall of single-bar charts.
METRIC_NUMBERS = frozenset({"val_bpb", "rung_val_bpb", "budget_fraction", "rung", "agent_usd", *TIME_METRICS.values()})
DIFF_TEXT, DIFF_HTML, LOG_TAIL = "train_diff.txt", "train_diff.html", "run_tail.txt"


def experiment_tags() -> dict[str, str]:
    return {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION}


def trial_run_name(study_name: str, trial_id: str) -> str:
    """`tpe-local-cpu-s0/t0003`: a bare `t0003` is ambiguous in an experiment shared by studies."""
    return f"{study_name}/{trial_id}"


def view_key(study_name: str) -> str:
    """The id of a study's saved view: URL- and tag-safe."""
    return "arena-" + re.sub(r"[^A-Za-z0-9_-]+", "_", study_name)


# The columns of a study's view, in order, with their widths in pixels: all four fit beside the run
# name in a 1440-pixel window with MLflow's assistant panel open (a cell shows its whole text on hover).
VIEW_COLUMNS = {"metrics.`val_bpb`": 86, "tags.`status`": 64, "tags.`changes`": 170, "params.`hypothesis`": 150,
                "tags.`reason`": 240}


def view_tag(study_name: str, study_id: str) -> tuple[str, str]:
    """The experiment tag of a study's saved runs-table view: its trials (not the parent run, which
    has no score) sorted by val_bpb, best first, with the score, status, changed knobs and
    hypothesis as columns. MLflow's Views menu lists it by name."""
    state = {
        "searchFilter": f"tags.`arena.study_id` = '{study_id}' and tags.`arena.kind` = 'trial'",
        "orderByKey": "metrics.`val_bpb`",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": list(VIEW_COLUMNS),
        "columnOrder": list(VIEW_COLUMNS),  # the score first, not grouped params-metrics-tags
        "columnWidths": dict(VIEW_COLUMNS),
        "runsHiddenMode": "SHOW_ALL",
    }
    envelope = {"name": f"{study_name}: trials by val_bpb", "createdAt": int(time.time() * 1000),
                "state": json.dumps(state)}
    return VIEW_TAG_PREFIX + view_key(study_name), json.dumps(envelope)


def view_link(base_url: str, experiment_id: str, study_name: str) -> str:
    """The page a study prints: its trials ranked, in the training (not GenAI) sidebar."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={view_key(study_name)}"
            "&workflowType=machine_learning")


def source_sha(source: str) -> str:
    """Identifies a candidate's code across trials and device kinds (for hardware comparisons)."""
    return hashlib.sha1(source.encode()).hexdigest()[:12]


def trial_description(trial: Trial, result: Result, baseline_knobs: Mapping[str, Any]) -> str:
    """The run's Description in the UI (markdown): the hypothesis, what changed, what came of it."""
    lines = [trial.candidate.hypothesis or "(no hypothesis)"]
    changes = knob_changes(trial.candidate.knobs, baseline_knobs)
    if changes:
        lines += ["", "Changes against the baseline: " + ", ".join(f"`{c}`" for c in changes)]
    if trial.candidate.parent:
        lines += ["", f"Parent trial: {trial.candidate.parent}"]
    outcome = f"val_bpb **{result.val_bpb:.4f}**" if result.ok else f"**{result.status}**"
    reason = result.why()
    lines += ["", f"Result: {outcome}" + (f": {reason[:500]}" if reason and not result.ok else "")]
    return "\n".join(lines)[:MAX_TAG_LEN]


def trial_tags(trial: Trial, result: Result, study_id: str, searcher: str,
               baseline_knobs: Mapping[str, Any], times: Mapping[str, float | None] | None = None) -> dict[str, str]:
    tags = {
        "arena.kind": "trial",
        "arena.study_id": study_id,
        "arena.trial_id": trial.trial_id,
        "status": result.status,
        "changes": summary(trial.candidate, baseline_knobs)[:MAX_TAG_LEN],  # knobs, else the hypothesis
        "device": result.device or "",
        "device_kind": result.device_kind or trial.device_kind or "",
        "host": result.host or "",
        "searcher": searcher,
        "slot": result.slot or trial.slot or "",
        "source_sha": source_sha(trial.candidate.source),
        "budget_kind": str(result.budget_kind or trial.objective.get("budget_kind", "")),
        DESCRIPTION_TAG: trial_description(trial, result, baseline_knobs),
    }
    # why the trial ran (searcher=claude: baseline, agent, confirm, rerun); who proposed it (hybrid)
    for key, tag in (("role", "role"), ("hybrid_side", "proposer"), ("code_base", "code_base")):
        if key in trial.candidate.meta:
            tags[tag] = str(trial.candidate.meta[key])
    if not result.ok and result.why():
        tags["reason"] = result.why()[:MAX_TAG_LEN]
    if result.error:
        tags["error"] = result.error[-MAX_TAG_LEN:]
    numbers = trial_numbers(trial, result, times or {})
    tags.update({k: _number_text(v) for k, v in numbers.items() if k not in METRIC_NUMBERS and k not in tags})
    return tags


def trial_params(trial: Trial) -> dict[str, str]:
    """Knob values exactly as they ran (the searcher wrote them into train.py as they are here)."""
    params = {f"knob.{k}": str(v) for k, v in sorted(trial.candidate.knobs.items())}
    params.update({
        "parent_trial": trial.candidate.parent or "",
        "hypothesis": trial.candidate.hypothesis or "",
        "seed": str(trial.seed if trial.candidate.seed is None else trial.candidate.seed),
        "trial_index": str(trial.index),
    })
    return {k: v[:MAX_PARAM_LEN] for k, v in params.items()}


def trial_numbers(trial: Trial, result: Result, times: Mapping[str, float | None]) -> dict[str, float]:
    """Every number of a trial, under the name analysis/ and the journal use."""
    numbers = result.numbers()
    for key in ("started_at", "finished_at"):
        numbers.pop(key, None)  # replaced by the study-relative t_*_s below
    numbers.update({TIME_METRICS.get(k, k): float(v) for k, v in times.items() if v is not None})
    numbers["trial_index"] = float(trial.index)
    fraction = trial.candidate.budget_fraction
    if fraction is not None:  # a successive-halving rung (searchers/rungs.py)
        numbers["budget_fraction"] = float(fraction)
        numbers["rung"] = float(trial.candidate.meta.get("rung", 0))
        if not trial.candidate.full_budget and "val_bpb" in numbers:
            # A screening score is not a result of the study: under its own name, analysis and the
            # UI's best never mistake it for one, and its slot-time still counts as spent.
            numbers["rung_val_bpb"] = numbers.pop("val_bpb")
    for k, v in trial.candidate.meta.items():
        if k.startswith("agent_") and isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers[k] = float(v)
    return numbers


def trial_metrics(trial: Trial, result: Result, times: Mapping[str, float | None]) -> dict[str, float]:
    """The numbers that stay metrics (METRIC_NUMBERS); the rest are tags (`trial_tags`)."""
    return {k: v for k, v in trial_numbers(trial, result, times).items() if k in METRIC_NUMBERS}


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def run_span_ms(result: Result) -> tuple[int | None, int | None]:
    """The trial's real start and end as MLflow wants them (epoch ms); None under a simulated
    clock, whose times are not dates."""
    def ms(t):
        return int(t * 1000) if t is not None and t > 1e9 else None

    return ms(result.started_at), ms(result.finished_at)


def loss_curve(trial: Trial) -> list[tuple[int, float, float]]:
    """(step, loss, training seconds) from the harness's step lines (steps.log)."""
    if not trial.directory:
        return []
    try:
        text = (Path(trial.directory) / STEPS_FILE).read_text(errors="replace")  # not run.log: the candidate prints there
    except OSError:
        return []
    curve = []
    for line in text.splitlines():
        v = parse_step_line(line)
        if "step" in v and "loss" in v and math.isfinite(v["loss"]):
            curve.append((int(v["step"]), v["loss"], v.get("training_seconds", 0.0)))
    return curve


@dataclass
class BestPoint:
    """One point of the parent's running-best metrics: `offset_ms` orders two points at one step."""

    key: str
    value: float
    step: int
    study_seconds: float | None
    offset_ms: int = 0


class RunningBest:
    """The running best as points that draw as steps. MLflow's line chart joins a metric's points
    in (step, timestamp) order, so a best logged once per trial slopes from one improvement to the
    next. Where a trial improves the best, both the old and the new best are logged at its step
    (the new one a millisecond later): the line runs flat, then drops straight down. Kept
    incrementally: a 10,000-trial study adds each point in constant time. Trials are told in the
    order their results are collected, which is not always the order they finished in (two slots,
    one polled later): a point never goes back in time, or a trial told late that finished early
    would sort before the improvement it follows and draw a slope."""

    def __init__(self):
        self.best: float | None = None
        self.index = -1
        self.latest_seconds: float | None = None

    def add(self, trial: Trial, result: Result, study_seconds: float | None) -> list[BestPoint]:
        self.index += 1
        if study_seconds is not None:
            if self.latest_seconds is not None:
                study_seconds = max(study_seconds, self.latest_seconds)
            self.latest_seconds = study_seconds
        previous = self.best
        if result.ok and trial.candidate.full_budget and (self.best is None or result.val_bpb < self.best):
            self.best = result.val_bpb
        if self.best is None:
            return []
        points = []
        steps = [("best_val_bpb", self.index)]
        if study_seconds is not None:
            steps.append(("best_val_bpb_by_time", int(round(study_seconds))))
        for key, step in steps:
            if previous is not None and previous != self.best:
                points.append(BestPoint(key, previous, step, study_seconds))
                points.append(BestPoint(key, self.best, step, study_seconds, offset_ms=1))
            else:
                points.append(BestPoint(key, self.best, step, study_seconds))
        return points


def write_trial_artifacts(folder: Path, trial: Trial, result: Result, baseline_source: str,
                          tail_lines: int = 200) -> None:
    """train.py, its diff against the baseline (unified as text, side by side as HTML), the result
    with every number, and the end of the run log, all in formats the MLflow artifact viewer previews."""
    source = trial.candidate.source
    (folder / TRAIN_FILE).write_text(source)
    (folder / DIFF_TEXT).write_text(unified_diff(baseline_source, source) or "(identical to the baseline)\n")
    (folder / DIFF_HTML).write_text(side_by_side_diff(baseline_source, source))
    (folder / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=1, sort_keys=True, default=str) + "\n")
    (folder / LOG_TAIL).write_text(_tail(Path(trial.directory) / LOG_FILE, tail_lines) if trial.directory else "")


def unified_diff(baseline: str, source: str) -> str:
    return "".join(difflib.unified_diff(
        baseline.splitlines(keepends=True), source.splitlines(keepends=True),
        fromfile="baseline/train.py", tofile="candidate/train.py"))


DIFF_STYLE = """
body {margin: 0; font: 12px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: #1f272d}
table {width: 100%; border-collapse: collapse; table-layout: fixed}
col.n {width: 3.2em} col.t {width: calc(50% - 3.2em)}
th {font: bold 12px sans-serif; text-align: left; padding: 4px 6px; background: #f2f4f6}
td {vertical-align: top; padding: 0 6px; white-space: pre-wrap; overflow-wrap: anywhere}
td.n {color: #8396a5; text-align: right; user-select: none}
tr.gap td {background: #f2f4f6; color: #8396a5; text-align: center}
td.del {background: #fde8e8} td.add {background: #e6f6ea}
del {background: #f7b9b9; text-decoration: none} ins {background: #a8e2b7; text-decoration: none}
"""


def side_by_side_diff(baseline: str, source: str, context: int = 3) -> str:
    """The changed lines with `context` lines around them, the baseline left and the candidate right,
    the changed characters marked. Lines wrap at the width the page is given (table-layout fixed,
    pre-wrap) rather than at a fixed column, so both sides stay readable in MLflow's artifact
    preview, whose width depends on the window."""
    old, new = baseline.splitlines(), source.splitlines()
    rows = []
    groups = difflib.SequenceMatcher(None, old, new, autojunk=False).get_grouped_opcodes(context)
    for g, group in enumerate(groups):
        if g or group[0][1] > 0:
            rows.append('<tr class="gap"><td colspan="4">⋯</td></tr>')
        for tag, i1, i2, j1, j2 in group:
            left, right = old[i1:i2], new[j1:j2]
            for k in range(max(len(left), len(right))):
                a = left[k] if k < len(left) else None
                b = right[k] if k < len(right) else None
                if tag == "equal":
                    rows.append(_row(i1 + k + 1, html.escape(a), "", j1 + k + 1, html.escape(b), ""))
                    continue
                a_html, b_html = _marked(a or "", b or "") if a is not None and b is not None else (
                    html.escape(a or ""), html.escape(b or ""))
                rows.append(_row(i1 + k + 1 if a is not None else "", a_html, "del" if a is not None else "",
                                 j1 + k + 1 if b is not None else "", b_html, "add" if b is not None else ""))
    if not rows:
        rows.append('<tr class="gap"><td colspan="4">identical to the baseline</td></tr>')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>train.py against the baseline</title>"
            f"<style>{DIFF_STYLE}</style></head><body><table>"
            '<colgroup><col class="n"><col class="t"><col class="n"><col class="t"></colgroup>'
            "<tr><th></th><th>baseline train.py</th><th></th><th>candidate train.py</th></tr>\n"
            + "\n".join(rows) + "\n</table></body></html>\n")


def _row(old_no, old_html: str, old_cls: str, new_no, new_html: str, new_cls: str) -> str:
    return (f'<tr><td class="n">{old_no}</td><td class="{old_cls}">{old_html}</td>'
            f'<td class="n">{new_no}</td><td class="{new_cls}">{new_html}</td></tr>')


def _marked(a: str, b: str) -> tuple[str, str]:
    """Both lines with the characters that differ between them marked."""
    left, right = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        x, y = html.escape(a[i1:i2]), html.escape(b[j1:j2])
        if tag == "equal":
            left.append(x)
            right.append(y)
        else:
            left.append(f"<del>{x}</del>" if x else "")
            right.append(f"<ins>{y}</ins>" if y else "")
    return "".join(left), "".join(right)


def _tail(path: Path, lines: int) -> str:
    return read_tail(path, lines)
