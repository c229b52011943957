"""The trials that moved the best, and what they changed: the story of a study (what the SkyPilot
write-up reconstructed by hand from 910 trials), read from the knob params and hypotheses."""
from __future__ import annotations

import pandas as pd

from analysis.load import KNOB_PREFIX, knob_columns


def improvements(trials: pd.DataFrame) -> pd.DataFrame:
    """One study's trials that beat the best so far (in finishing order), each with the knobs it
    changed against the trial it dethroned."""
    done = trials[trials["t_finished"].notna()].sort_values(["t_finished", "trial_index"])
    knobs = knob_columns(done)
    rows, best = [], None
    for _, trial in done.iterrows():
        if pd.isna(trial["val_bpb"]) or (best is not None and trial["val_bpb"] >= best["val_bpb"]):
            continue
        rows.append(
            {
                "t_finished": trial["t_finished"],
                "trial_index": trial["trial_index"],
                "trial_id": trial["trial_id"],
                "val_bpb": trial["val_bpb"],
                "gain": None if best is None else best["val_bpb"] - trial["val_bpb"],
                "changes": "(first result)" if best is None else knob_changes(best, trial, knobs),
                "hypothesis": trial.get("hypothesis"),
                "parent_trial": trial.get("parent_trial"),
                "device_kind": trial.get("device_kind"),
            }
        )
        best = trial
    return pd.DataFrame(rows)


def knob_changes(before: pd.Series, after: pd.Series, knobs: list[str]) -> str:
    """'DEPTH 2->3, MATRIX_LR 0.02->0.04' for the knobs whose values differ."""
    changed = [
        f"{k[len(KNOB_PREFIX):]} {_show(before[k])}->{_show(after[k])}"
        for k in knobs
        if not (pd.isna(before[k]) and pd.isna(after[k])) and before[k] != after[k]
    ]
    return ", ".join(changed) or "(no knob changed)"


def _show(value) -> str:
    return "unset" if pd.isna(value) else f"{value:.4g}" if isinstance(value, float) else str(value)
