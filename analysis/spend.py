"""Where each arm's compute went: new candidates, shortened screening runs (rungs), or the evidence
a keep rule asks for (baseline noise seeds, confirmations, re-runs), and how much ended without a
score. An agent that confirms every near-win spends slots that a sampler spends on search, so a
comparison at equal GPU-hours should show the split beside the scores.

A trial's purpose comes from its `role` tag (the Claude searcher's baseline/agent/confirm/rerun)
and its `budget_fraction` metric (a rung shorter than the whole budget); everything else is search.
"""
from __future__ import annotations

import pandas as pd

PURPOSES = ("search", "screen", "baseline", "confirm", "rerun")
EVIDENCE_ROLES = ("baseline", "confirm", "rerun")


def purposes(trials: pd.DataFrame) -> pd.Series:
    out = pd.Series("search", index=trials.index, dtype=object)
    if "budget_fraction" in trials:
        out[pd.to_numeric(trials["budget_fraction"], errors="coerce").fillna(1.0) < 1.0] = "screen"
    if "role" in trials:
        for role in EVIDENCE_ROLES:
            out[trials["role"] == role] = role
    return out


def by_purpose(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: its slot-hours over all seeds, each purpose's share of them (the purposes no
    arm used are left out, search never), and the share spent on trials that ended without a score."""
    hours = trials["slot_seconds"].fillna(0.0) / 3600.0
    t = trials.assign(purpose=purposes(trials), hours=hours)
    total = t.groupby("arm")["hours"].sum()
    spent = total.where(total > 0)  # an arm that spent nothing has no shares, not a division by zero
    shares = t.pivot_table(index="arm", columns="purpose", values="hours", aggfunc="sum", fill_value=0.0)
    shares = shares.reindex(columns=[p for p in PURPOSES if p == "search" or p in shares.columns], fill_value=0.0)
    unscored = t[t["status"] != "ok"].groupby("arm")["hours"].sum().reindex(total.index, fill_value=0.0)
    out = shares.div(spent, axis=0).add_suffix("_share")
    out.insert(0, "slot_hours", total)
    out["no_score_share"] = unscored / spent
    out.columns.name = None
    return out
