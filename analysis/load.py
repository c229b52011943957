"""MLflow -> two tidy pandas tables: one row per study, one row per trial.

Everything downstream (curves, speedups, tables) works on these two frames only, so a study logged
to a local sqlite file, a remote `mlflow server` or Databricks reads the same. Times come from the
trial metrics `t_submitted_s`, `t_started_s`, `t_finished_s` (seconds on the study's own clock:
active study time, virtual under the simulated launcher), never from MLflow's run timestamps,
which record when the mirror wrote, not when the trial ran. What a comparison is cut at comes from
the parent run's params (the flattened study config): the budget kind, study.max_trials,
study.max_hours and the experiment's `compare` settings (analysis.budget).
"""
from __future__ import annotations

import json

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from study.records import RESULT_NUMBERS

# Study tags read from the parent run, and the column each one becomes.
STUDY_TAGS = ("searcher", "launcher", "slots", "objective", "seed", "git_sha", "time_mode", "device_kinds")
# Trial tags read from the child run.
TRIAL_TAGS = ("status", "device", "device_kind", "host", "slot", "reason", "source_sha", "role", "proposer",
              "budget_kind")
# Parent-run params (the flattened config) and the study column each becomes; "None" is null.
STUDY_PARAMS = {
    "objective.budget_kind": "budget_kind",
    "study.max_trials": "max_trials",
    "study.max_hours": "max_hours",
    "compare.measure": "compare_measure",
    "compare.at": "compare_at",
}
TRIAL_PARAMS = ("parent_trial", "hypothesis", "seed", "trial_index")
KNOB_PREFIX = "knob."


class AnalysisError(ValueError):
    """The requested studies are not in the tracking store, or lack what the analysis needs."""


def load(tracking_uri: str, experiment: str, studies: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(studies, trials) of one experiment, optionally only the named studies (study id or parent
    run name). Raises AnalysisError with one line when nothing matches."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise AnalysisError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
    parents = _search(client, exp.experiment_id, "tags.`arena.kind` = 'study'")
    study_rows = [_study_row(r) for r in parents]
    if studies:
        wanted = set(studies)
        study_rows = [s for s in study_rows if s["study_id"] in wanted or s["run_name"] in wanted]
        missing = wanted - {s["study_id"] for s in study_rows} - {s["run_name"] for s in study_rows}
        if missing:
            raise AnalysisError(f"studies not found in experiment {experiment!r}: {sorted(missing)}")
    if not study_rows:
        raise AnalysisError(f"experiment {experiment!r} holds no study runs (tag arena.kind=study)")
    study_df = pd.DataFrame(study_rows)
    ids = set(study_df["study_id"])
    children = _search(client, exp.experiment_id, "tags.`arena.kind` = 'trial'")
    trial_df = pd.DataFrame([_trial_row(r) for r in children if r.data.tags.get("arena.study_id") in ids])
    if not trial_df.empty:
        study_df["device_kinds"] = _device_kinds(study_df, trial_df)
    study_df["arm"] = arm_labels(study_df)
    return study_df, _tidy_trials(trial_df, study_df)


def arm_labels(studies: pd.DataFrame) -> pd.Series:
    """What seeds are averaged over, said in full: the same searcher on the same number of slots,
    objective preset and device kinds ("tpe x2 (cpu preset, cpu)"), and launcher when the loaded
    studies use more than one. A label without the preset let a cpu and a tiny study pass for one
    arm."""
    kinds = studies["device_kinds"].fillna("?") if "device_kinds" in studies else "?"
    label = (studies["searcher"].astype(str) + " x" + studies["slots"].astype(str)
             + " (" + studies["objective"].fillna("?").astype(str) + " preset, " + kinds)
    if studies["launcher"].nunique() > 1:
        label = label + ", " + studies["launcher"].astype(str)
    return label + ")"


def compute_unit(trials: pd.DataFrame) -> str:
    """What a slot-hour is called: GPU-h only when every trial ran on an accelerator kind; a CPU
    slot is not a GPU and its hours are not GPU-hours."""
    kinds = set(trials["device_kind"].dropna().str.lower()) - {""}
    if kinds and kinds <= {"cpu"}:
        return "CPU slot-h"
    return "slot-h" if "cpu" in kinds else "GPU-h"


def _device_kinds(studies: pd.DataFrame, trials: pd.DataFrame) -> pd.Series:
    """Per study, its slots' device kinds joined with '+': from the parent tag (what the launcher
    offered). Studies logged without the tag get the kinds that the trials of all their seeds ran
    on, so which slot a seed happened to draw does not split an arm."""
    group = ["searcher", "slots", "objective", "launcher"]
    with_group = trials.merge(studies[["study_id", *group]], on="study_id")
    seen = with_group.groupby(group, dropna=False)["device_kind"].agg(lambda k: "+".join(sorted(set(k.dropna()) - {""})))

    def kinds(row) -> str:
        tag = row.get("device_kinds")
        if isinstance(tag, str) and tag.startswith("{"):
            try:
                return "+".join(sorted(json.loads(tag)))
            except ValueError:
                pass
        return seen.get(tuple(row[g] for g in group)) or "?"

    return studies.apply(kinds, axis=1)


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _study_row(run: Run) -> dict:
    tags, metrics = run.data.tags, run.data.metrics
    row = {
        "study_id": tags.get("arena.study_id", run.info.run_id),
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
    }
    row.update({k: tags.get(k) for k in STUDY_TAGS})
    row["slots"] = int(row["slots"]) if row["slots"] not in (None, "") else None
    row["seed"] = int(row["seed"]) if row["seed"] not in (None, "") else None
    row["time_mode"] = row["time_mode"] or "real"
    for m in ("best_val_bpb", "n_trials", "wall_seconds", "agent_usd_total"):
        row[m] = metrics.get(m)
    for param, column in STUDY_PARAMS.items():
        row[column] = _param_value(run.data.params.get(param))
    return row


def _param_value(text: str | None):
    """A logged config value: None for a missing or null one, a number where it reads as one."""
    if text is None or text in ("", "None", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _trial_row(run: Run) -> dict:
    tags, params = run.data.tags, run.data.params
    row = {
        "study_id": tags.get("arena.study_id"),
        "trial_id": tags.get("arena.trial_id", run.info.run_id),
        "trial_run_id": run.info.run_id,
    }
    row.update({k: tags.get(k) for k in TRIAL_TAGS})
    row.update({k: params[k] for k in TRIAL_PARAMS if k in params})
    row.update({k: v for k, v in params.items() if k.startswith(KNOB_PREFIX)})
    row.update(run.data.metrics)
    # the mirror keeps a trial's single-value numbers as tags (study/mlflow_content.py): back as numbers
    row.update({k: float(tags[k]) for k in RESULT_NUMBERS if k in tags and k not in row})
    for unit_named in ("t_submitted_s", "t_started_s", "t_finished_s"):  # the mirror names the unit
        if unit_named in row:
            row[unit_named[:-2]] = row.pop(unit_named)
    return row


def _tidy_trials(trials: pd.DataFrame, studies: pd.DataFrame) -> pd.DataFrame:
    """Typed columns, the study's tags joined on, and slot-seconds derived from the study clock."""
    if trials.empty:
        raise AnalysisError("the selected studies have no trial runs (tag arena.kind=trial)")
    for col in ("t_submitted", "t_started", "t_finished", "val_bpb", "agent_usd"):
        if col not in trials:
            trials[col] = float("nan")
    missing_times = trials["t_finished"].isna() & trials["status"].ne("cancelled")
    if missing_times.all():
        raise AnalysisError("trial runs carry no t_finished metric: they were not logged by the arena mirror")
    trials["trial_index"] = pd.to_numeric(trials.get("trial_index"), errors="coerce")
    for col in [c for c in trials if c.startswith(KNOB_PREFIX)]:
        numeric = pd.to_numeric(trials[col], errors="coerce")
        if numeric.notna().sum() == trials[col].notna().sum():
            trials[col] = numeric
    # A failure has no score even if a number was logged under val_bpb.
    trials.loc[trials["status"] != "ok", "val_bpb"] = float("nan")
    trials["slot_seconds"] = (trials["t_finished"] - trials["t_started"]).clip(lower=0)
    study_cols = ["study_id", "arm", "searcher", "launcher", "slots", "time_mode", "objective", "seed", "device_kinds"]
    trials = trials.merge(studies[study_cols].rename(columns={"seed": "study_seed"}), on="study_id", how="left")
    return trials.sort_values(["study_id", "t_finished", "trial_index"]).reset_index(drop=True)


def knob_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c.startswith(KNOB_PREFIX)]
