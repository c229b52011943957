"""The searcher comparison a paper prints: per arm (searcher x slots x preset), mean +- std over
seeds (analysis.stats adds the confidence intervals and tests).

Every study is cut at the comparison's budgets (analysis.budget): one point per measure, the same
for every study, each study credited with its own best among the trials finished by then.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import budget as budgets_
from analysis import stats
from analysis.load import compute_unit
from analysis.speedup import throughput
from train.contract import HARNESS_STATUSES

# Harness outcomes that count as the candidate failing (infra statuses are not its fault).
FAILURES = tuple(s for s in HARNESS_STATUSES if s != "ok")


def per_study(trials: pd.DataFrame, studies: pd.DataFrame, budgets: list[budgets_.Budget]) -> pd.DataFrame:
    """One row of numbers per study: its best at each budget (best_at_<measure>), the trials that
    cut kept (kept_<measure>) and whether it reached the budget (reached_<measure>). A study that
    finished no trial (killed during its first) still gets its row, with no values, so the tables
    count it as a seed without a result instead of forgetting it."""
    rows = []
    by_study = dict(tuple(trials.groupby("study_id")))
    spans = trials.groupby("study_id")["t_finished"].max()
    for study_id in studies["study_id"]:
        s = studies.set_index("study_id").loc[study_id]
        g = by_study.get(study_id, trials.iloc[0:0])
        done = g[g["t_finished"].notna()]
        row = {"study_id": study_id, "arm": s["arm"], "seed": s["seed"], "time_mode": s["time_mode"],
               "device_kinds": ",".join(sorted(done["device_kind"].dropna().unique())), "trials": len(done)}
        for b in budgets:
            at = budgets_.cut(g, b) if len(done) else {"best": np.nan, "kept": 0, "reached": False}
            row.update({b.column: at["best"], f"kept_{b.measure}": at["kept"], f"reached_{b.measure}": at["reached"]})
        if not done.empty:
            row.update({
                "best_val_bpb": done["val_bpb"].min(),
                "gpu_hours": done["slot_seconds"].sum() / 3600.0,
                "wall_hours": spans[study_id] / 3600.0,
                "trials_per_h": throughput(g),
                "failure_rate": done["status"].isin(FAILURES).mean(),
                "agent_usd": s["agent_usd_total"] if pd.notna(s["agent_usd_total"]) else g["agent_usd"].sum(min_count=1),
            })
            for status in sorted(set(done["status"]) - {"ok"}):
                row[f"rate_{status}"] = (done["status"] == status).mean()
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(budgets=list(budgets), unit=compute_unit(trials))
    return out


def searcher_table(per_study_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(numbers, display) per arm: the numeric mean/std, and the same as 'mean ± std' strings."""
    unit = per_study_df.attrs.get("unit", "GPU-h")
    labels = {"best_val_bpb": ("best val_bpb (all trials)", 4)}
    labels.update({b.column: (f"best at {b.title(unit)}", 4) for b in per_study_df.attrs.get("budgets", [])})
    labels.update({
        "trials": ("trials", 1),
        "gpu_hours": (f"{unit} used", 3),
        "trials_per_h": ("trials per active study hour", 1),
        "failure_rate": ("failure rate", 3),
        "agent_usd": ("agent USD", 2),
    })
    labels.update({c: (c.replace("rate_", "") + " rate", 3) for c in per_study_df if c.startswith("rate_")})
    numbers, display = mean_std_table(per_study_df, "arm", labels)
    kinds = per_study_df.groupby("arm")["device_kinds"].agg(lambda k: ",".join(sorted(set(",".join(k).split(",")) - {""})))
    display.insert(1, "device kinds", kinds)
    headline = per_study_df.attrs.get("budgets", [None])[0]
    if headline is not None:
        values = per_study_df[["arm", "seed", headline.column]].rename(columns={headline.column: "value"})
        expected = sorted(values["seed"].unique())
        display.insert(1, "missing seeds", [stats.missing_seeds(values, arm, expected) or "-" for arm in display.index])
    return numbers, display


def mean_std_table(df: pd.DataFrame, by: str, labels: dict[str, tuple[str, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Group rows (seeds) by `by`; `labels` maps column -> (display name, decimals). Columns that
    are all NaN (no agent, so no dollars) are left out of the display; a figure that only some
    seeds have says from how many (n=...)."""
    grouped = df.groupby(by)
    cols = [c for c in labels if c in df]
    numbers = grouped[cols].agg(["mean", "std", "count"])
    display = pd.DataFrame({"seeds": grouped.size()})
    for col in cols:
        if numbers[(col, "mean")].notna().any():
            name, digits = labels[col]
            parts = zip(numbers[(col, "mean")], numbers[(col, "std")], numbers[(col, "count")], display["seeds"])
            display[name] = [_mean_std(m, s, c, n, digits) for m, s, c, n in parts]
    numbers.columns = [f"{c}_{agg}" for c, agg in numbers.columns]
    return numbers, display


def markdown(display: pd.DataFrame) -> str:
    """The display table as Markdown, its strings kept as written (tabulate would reformat
    '3.00' as '3')."""
    return display.reset_index().to_markdown(index=False, disable_numparse=True)


def _mean_std(mean: float, std: float, count: int, seeds: int, digits: int) -> str:
    if np.isnan(mean):
        return "-"
    text = f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if count == seeds else f"{text} (n={count})"


def write_table(display: pd.DataFrame, numbers: pd.DataFrame, stem: str | Path, caption: str = "") -> list[Path]:
    """stem.md and stem.tex (booktabs) from the display table, stem.csv from the numbers."""
    stem = Path(stem)
    md, tex, csv = stem.with_suffix(".md"), stem.with_suffix(".tex"), stem.with_suffix(".csv")
    md.write_text(markdown(display) + "\n")
    latex = display.reset_index().to_latex(index=False, escape=True, caption=caption or None, label=f"tab:{stem.name}")
    for text, tex_text in (("±", r"$\pm$"), ("−", "$-$"), ("Δ", r"$\Delta$"), ("σ", r"$\sigma$"), ("≥", r"$\geq$")):
        latex = latex.replace(text, tex_text)
    tex.write_text(latex)
    numbers.to_csv(csv)
    return [md, tex, csv]


def ci_table(summary: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """analysis.stats.arm_summary as a display table: 'mean [lo, hi]' per aggregate, with n and
    the seeds that have no value (no result by the cut, or no study), by number, beside it."""
    display = pd.DataFrame(index=summary.index)
    display["n"] = summary["n"].astype(int)
    display["missing seeds"] = summary["missing_seeds"].replace("", "-")
    for agg in ("mean", "median", "iqm"):
        display[f"{agg.upper() if agg == 'iqm' else agg} [95% CI]"] = [
            "-" if np.isnan(v) else f"{v:.{digits}f} (one seed: no CI)" if np.isnan(lo)
            else f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
            for v, lo, hi in zip(summary[agg], summary[f"{agg}_lo"], summary[f"{agg}_hi"])]
    return display
