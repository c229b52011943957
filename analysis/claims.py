"""The claims table: each sentence about two arms that the data supports, and "no difference
detected" for every other pair, so a report never lets a reader read a ranking into noise.

A difference is claimed only when all three hold:
- the seed-matched one-sided test is significant after Holm's correction over all pairs;
- |Δ| is at least the measured noise floor (σ of val_bpb of one train.py over seeds), when known:
  a "gain" smaller than what re-running the same code gives is not a finding;
- at least one seed pair exists (n is printed either way; missing seeds are named).
"""
from __future__ import annotations

import math

import pandas as pd

from analysis import stats

# The equal-budget cuts a comparison is made at: per_study column -> how a sentence names it.
BUDGETS = {"best_at_equal_gpu_h": "equal {unit}", "best_at_equal_wall": "equal wall-clock"}


def claims(per_study: pd.DataFrame, noise_floor: float | None = None, alpha: float = stats.ALPHA,
           test: str = "wilcoxon", unit: str = "GPU-h") -> pd.DataFrame:
    """One row per pair of arms and budget: the numbers and the sentence. `per_study` has one row
    per study (arm, seed and the budget columns, see tables.per_study)."""
    rows = []
    for column, budget in BUDGETS.items():
        if column not in per_study:
            continue
        budget = budget.format(unit=unit)
        values = per_study[["arm", "seed", column]].rename(columns={column: "value"})
        pairs = stats.pairwise(values, test=test)
        for _, r in pairs.iterrows():
            verdict, reason = judge(r, noise_floor, alpha)
            rows.append({"budget": budget, **r.to_dict(), "supported": verdict, "reason": reason,
                         "claim": sentence(r, budget, verdict, reason)})
    return pd.DataFrame(rows)


def judge(r: pd.Series, noise_floor: float | None, alpha: float) -> tuple[bool, str]:
    """(supported, why not) for one pair."""
    if r["n"] == 0:
        return False, "no seed has a result in both arms"
    if r["delta"] == 0:
        return False, "identical on every seed"
    if r["p_holm"] >= alpha:
        smallest = 0.5 ** r["n"]
        if smallest >= alpha:
            return False, f"n = {r['n']} seed pairs cannot reach p < {alpha:g} (smallest possible p = {smallest:.3g})"
        return False, f"not significant (Holm {p_text(r['p_holm'])}, not < {alpha:g})"
    if noise_floor is not None and abs(r["delta"]) < noise_floor:
        return False, f"|Δ| = {abs(r['delta']):.4f} is below the noise floor σ = {noise_floor:.4f}"
    return True, ""


def sentence(r: pd.Series, budget: str, supported: bool, reason: str) -> str:
    missing = f", {r['n_missing']} seed(s) missing from one arm (no study or no ok result)" if r["n_missing"] else ""
    interval = (f"[{signed(r['delta_lo'])}, {signed(r['delta_hi'])}]" if not math.isnan(r["delta_lo"])
                else "(no CI from one pair)")
    numbers = (f"Δ = {signed(r['delta'])} {interval}, "
               f"{p_text(r['p_holm'])} (Holm), n = {r['n']}{missing}")
    if supported:
        return f"{r['a']} < {r['b']} at {budget}: {numbers}"
    return f"no difference detected between {r['a']} and {r['b']} at {budget}: {numbers}; {reason}"


def signed(x: float) -> str:
    """−0.0017 with a real minus sign, as a paper prints it."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:+.4f}".replace("-", "−")


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"
