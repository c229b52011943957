"""What the MLflow mirror writes, so that the UI tells a study's story without the journal.

The mirror (study/mirror.py) owns when and how things reach MLflow; this module owns what they
say: the experiment marked as model training (MLflow 3 otherwise opens it in GenAI mode), a child
run per trial that starts and ends when the trial did, with its hypothesis as the description, its
training-loss curve, and its diff against the baseline in formats the artifact viewer previews
(MLflow shows `.txt` and `.html`, not `.diff`). Metric names carry their unit (`_s` for seconds
since the study started).
"""
from __future__ import annotations

import difflib
import hashlib
import math
from pathlib import Path
from typing import Any, Mapping

from study.changes import knob_changes
from study.progress import parse_step_line
from study.records import Result, Trial
from train.contract import LOG_FILE, STEPS_FILE, TRAIN_FILE, read_tail

MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000
# MLflow 3's UI reads this experiment tag to choose between its GenAI and its training views.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
DESCRIPTION_TAG = "mlflow.note.content"  # the UI's "Description" of an experiment or a run
EXPERIMENT_DESCRIPTION = (
    "autoresearch-arena: each parent run is one study (a searcher proposing edits to a small GPT's "
    "train.py); each child run is one trial, trained for the study's fixed budget and scored in "
    "val_bpb (lower is better) by the fixed harness. Parent metric `best_val_bpb` is the running best "
    "by finished-trial index (its timestamps give it by study time); a child's `train_loss` is its "
    "training curve and `train_diff.html` its change against the baseline.")
# The study-clock times of a trial, with the unit in the name.
TIME_METRICS = {"t_submitted": "t_submitted_s", "t_started": "t_started_s", "t_finished": "t_finished_s"}
DIFF_TEXT, DIFF_HTML, LOG_TAIL = "train_diff.txt", "train_diff.html", "run_tail.txt"


def experiment_tags() -> dict[str, str]:
    return {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION}


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
    reason = " ".join((result.reason or result.error or "").split())
    lines += ["", f"Result: {outcome}" + (f": {reason[:500]}" if reason and not result.ok else "")]
    return "\n".join(lines)[:MAX_TAG_LEN]


def trial_tags(trial: Trial, result: Result, study_id: str, searcher: str,
               baseline_knobs: Mapping[str, Any]) -> dict[str, str]:
    tags = {
        "arena.kind": "trial",
        "arena.study_id": study_id,
        "arena.trial_id": trial.trial_id,
        "status": result.status,
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
    if result.reason:
        tags["reason"] = result.reason[:MAX_TAG_LEN]
    if result.error:
        tags["error"] = result.error[-MAX_TAG_LEN:]
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


def trial_metrics(trial: Trial, result: Result, times: Mapping[str, float | None]) -> dict[str, float]:
    metrics = result.numbers()
    for key in ("started_at", "finished_at"):
        metrics.pop(key, None)  # replaced by the study-relative t_*_s below
    metrics.update({TIME_METRICS.get(k, k): float(v) for k, v in times.items() if v is not None})
    metrics["trial_index"] = float(trial.index)
    fraction = trial.candidate.budget_fraction
    if fraction is not None:  # a successive-halving rung (searchers/rungs.py)
        metrics["budget_fraction"] = float(fraction)
        metrics["rung"] = float(trial.candidate.meta.get("rung", 0))
        if not trial.candidate.full_budget and "val_bpb" in metrics:
            # A screening score is not a result of the study: under its own name, analysis and the
            # UI's best never mistake it for one, and its slot-time still counts as spent.
            metrics["rung_val_bpb"] = metrics.pop("val_bpb")
    for k, v in trial.candidate.meta.items():
        if k.startswith("agent_") and isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics[k] = float(v)
    return metrics


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


def running_best(history: list[tuple[Trial, Result]]) -> list[tuple[int, float, str, float | None]]:
    """(finished-trial index, best val_bpb so far, its trial, study seconds) at every index from
    the first success on: a staircase the UI draws as one, not as slopes between improvements."""
    out, best = [], None
    for i, (trial, result) in enumerate(history):
        if result.ok and trial.candidate.full_budget and (best is None or result.val_bpb < best[0]):
            best = (result.val_bpb, trial.trial_id)
        if best is not None:
            out.append((i, best[0], best[1], result.finished_at))
    return out


def write_trial_artifacts(folder: Path, trial: Trial, baseline_source: str, tail_lines: int = 200) -> None:
    """train.py, its diff against the baseline (unified as text, side by side as HTML) and the
    end of the run log, all in formats the MLflow artifact viewer previews."""
    source = trial.candidate.source
    (folder / TRAIN_FILE).write_text(source)
    (folder / DIFF_TEXT).write_text(unified_diff(baseline_source, source) or "(identical to the baseline)\n")
    (folder / DIFF_HTML).write_text(side_by_side_diff(baseline_source, source))
    (folder / LOG_TAIL).write_text(_tail(Path(trial.directory) / LOG_FILE, tail_lines) if trial.directory else "")


def unified_diff(baseline: str, source: str) -> str:
    return "".join(difflib.unified_diff(
        baseline.splitlines(keepends=True), source.splitlines(keepends=True),
        fromfile="baseline/train.py", tofile="candidate/train.py"))


def side_by_side_diff(baseline: str, source: str) -> str:
    """The changed lines with 3 lines of context, the baseline left, the candidate right, wrapped
    and sized so that both sides fit MLflow's artifact preview (about 600 pixels wide)."""
    page = difflib.HtmlDiff(wrapcolumn=42).make_file(
        baseline.splitlines(), source.splitlines(), "baseline train.py", "candidate train.py",
        context=True, numlines=3)
    return page.replace("</head>", "<style>table.diff {font-size: 11px}</style>\n</head>", 1)


def _tail(path: Path, lines: int) -> str:
    return read_tail(path, lines)
