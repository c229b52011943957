"""The claims table: each sentence about two arms that the data supports, and "no difference
detected" for every other pair, so a report never lets a reader read a ranking into noise.

A difference is claimed only when all of these hold:
- the seed-matched one-sided test is significant after Holm's correction over all ordered pairs;
- the mean difference Δ points the same way (a rank test can favour A on most seeds while one seed
  pulls the mean to 0 or past it: that pair reads "conflicting evidence", not a claim, and not
  "no difference" either);
- |Δ| is at least the measured noise floor (σ of val_bpb of one train.py over seeds), when known:
  a "gain" smaller than what re-running the same code gives is not a finding;
- at least one seed pair exists.
Every sentence names n per arm and the missing seeds by number.
"""
from __future__ import annotations

import math

import pandas as pd

from analysis import stats

VERDICTS = ("claimed", "no difference detected", "conflicting evidence")


def claims(per_study: pd.DataFrame, noise_floor: float | None = None, alpha: float = stats.ALPHA,
           test: str = "wilcoxon", unit: str = "GPU-h", unmatched_ok: bool = False) -> pd.DataFrame:
    """One row per pair of arms and budget: the numbers and the sentence. `per_study` has one row
    per study (arm, seed and a best_at_<measure> column per budget in per_study.attrs['budgets'],
    see tables.per_study)."""
    rows = []
    for b in per_study.attrs.get("budgets", []):
        where = b.title(unit)
        values = per_study[["arm", "seed", b.column]].rename(columns={b.column: "value"})
        if "study_id" in per_study:
            values["study_id"] = per_study["study_id"]
        pairs = stats.pairwise(values, test=test, unmatched_ok=unmatched_ok)
        for _, r in pairs.iterrows():
            verdict, reason = judge(r, noise_floor, alpha)
            rows.append({"budget": where, "measure": b.measure, "at": b.at, **r.to_dict(), "verdict": verdict,
                         "supported": verdict == "claimed", "reason": reason,
                         "claim": sentence(r, where, verdict, reason, test)})
    return pd.DataFrame(rows)


def judge(r: pd.Series, noise_floor: float | None, alpha: float) -> tuple[str, str]:
    """(verdict, why) for one pair oriented as a < b (tables from stats.pairwise)."""
    if r["n"] == 0:
        return "no difference detected", "no seed has a result in both arms"
    if r["tied"] == r["n"]:
        return "no difference detected", "identical on every seed"
    favoured = r["p_holm"] < alpha
    reverse = r.get("p_holm_reverse", 1.0) < alpha
    if reverse or (favoured and not r["delta"] < 0):
        winner = r["b"] if reverse else r["a"]
        p = r["p_holm_reverse"] if reverse else r["p_holm"]
        return "conflicting evidence", (f"the test favours {winner} (Holm {p_text(p)}) but the mean difference is "
                                        f"{signed(r['delta'])}: one direction on most seeds, the other (or none) "
                                        "on average")
    if not favoured:
        smallest = stats.smallest_holm_p(int(r["n"]), int(r.get("family", 2)))
        if smallest >= alpha:
            return "no difference detected", (
                f"n = {r['n']} seed pairs cannot reach Holm p < {alpha:g} over {int(r.get('family', 2))} ordered "
                f"comparisons (smallest possible Holm p = {smallest:.3g})")
        return "no difference detected", f"not significant (Holm {p_text(r['p_holm'])}, not < {alpha:g})"
    if noise_floor is not None and abs(r["delta"]) < noise_floor:
        return "no difference detected", f"|Δ| = {abs(r['delta']):.4f} is below the noise floor σ = {noise_floor:.4f}"
    return "claimed", ""


def arm_counts(r: pd.Series) -> str:
    """'A: n = 8; B: n = 7, missing seed 7 (no result)'."""
    def one(arm, n, missing):
        return f"{arm}: n = {n}" + (f", missing seed {missing}" if missing else "")
    return f"{one(r['a'], r['n_a'], r['missing_a'])}; {one(r['b'], r['n_b'], r['missing_b'])}"


def sentence(r: pd.Series, budget: str, verdict: str, reason: str, test: str = "wilcoxon") -> str:
    interval = (f"[{signed(r['delta_lo'])}, {signed(r['delta_hi'])}]" if not math.isnan(r["delta_lo"])
                else "(no CI from one pair)")
    numbers = (f"Δ = {signed(r['delta'])} {interval}, {test} {p_text(r['p_holm'])} (Holm), "
               f"{r['n']} seed pairs ({arm_counts(r)})")
    if verdict == "claimed":
        return f"{r['a']} < {r['b']} at {budget}: {numbers}"
    if verdict == "conflicting evidence":
        return f"conflicting evidence between {r['a']} and {r['b']} at {budget}: {numbers}; {reason}"
    return f"no difference detected between {r['a']} and {r['b']} at {budget}: {numbers}; {reason}"


def signed(x: float) -> str:
    """−0.0017 with a real minus sign, as a paper prints it."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:+.4f}".replace("-", "−")


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"
