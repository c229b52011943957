"""The searcher comparison a paper prints: per arm (searcher x slots x preset), mean +- std over
seeds (analysis.stats adds the confidence intervals and tests).

"Best at equal GPU-hours" and "at equal wall-clock" cut every study at the smallest budget any
compared study used, so a study that simply ran longer gets no credit for it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.curves import best_at, staircase
from analysis.load import compute_unit
from analysis.speedup import throughput
from train.contract import HARNESS_STATUSES

# Harness outcomes that count as the candidate failing (infra statuses are not its fault).
FAILURES = tuple(s for s in HARNESS_STATUSES if s != "ok")


def per_study(trials: pd.DataFrame, studies: pd.DataFrame) -> pd.DataFrame:
    """One row of numbers per study, with the equal-budget cut-offs shared by all of them. A study
    that finished no trial (killed during its first) still gets its row, with no values, so the
    tables count it as a seed without a result instead of forgetting it."""
    spans = trials.groupby("study_id")["t_finished"].max().dropna()
    gpu_h = trials.groupby("study_id")["slot_seconds"].sum().loc[spans.index] / 3600.0
    equal_gpu_h, equal_wall = gpu_h.min(), spans.min()
    rows = []
    by_study = dict(tuple(trials.groupby("study_id")))
    for study_id in studies["study_id"]:
        s = studies.set_index("study_id").loc[study_id]
        g = by_study.get(study_id, trials.iloc[0:0])
        done = g[g["t_finished"].notna()]
        if done.empty:
            rows.append({"study_id": study_id, "arm": s["arm"], "seed": s["seed"], "time_mode": s["time_mode"],
                         "device_kinds": "", "trials": 0})
            continue
        row = {
            "study_id": study_id,
            "arm": s["arm"],
            "seed": s["seed"],
            "time_mode": s["time_mode"],
            "device_kinds": ",".join(sorted(done["device_kind"].dropna().unique())),
            "trials": len(done),
            "best_val_bpb": done["val_bpb"].min(),
            "best_at_equal_gpu_h": best_at(staircase(g, "gpu_hours"), [equal_gpu_h])[0],
            "best_at_equal_wall": best_at(staircase(g, "wall"), [equal_wall])[0],
            "gpu_hours": gpu_h[study_id],
            "wall_hours": spans[study_id] / 3600.0,
            "trials_per_h": throughput(g),
            "failure_rate": done["status"].isin(FAILURES).mean(),
            "agent_usd": s["agent_usd_total"] if pd.notna(s["agent_usd_total"]) else g["agent_usd"].sum(min_count=1),
        }
        for status in sorted(set(done["status"]) - {"ok"}):
            row[f"rate_{status}"] = (done["status"] == status).mean()
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(equal_gpu_h=equal_gpu_h, equal_wall_h=equal_wall / 3600.0, unit=compute_unit(trials))
    return out


def searcher_table(per_study_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(numbers, display) per arm: the numeric mean/std, and the same as 'mean ± std' strings."""
    labels = {
        "best_val_bpb": ("best val_bpb", 4),
        "best_at_equal_gpu_h": (f"best @ {per_study_df.attrs['equal_gpu_h']:.3g} {per_study_df.attrs.get('unit', 'GPU-h')}", 4),
        "best_at_equal_wall": (f"best @ {per_study_df.attrs['equal_wall_h']:.3g} h wall", 4),
        "trials": ("trials", 1),
        "trials_per_h": ("trials/h", 1),
        "failure_rate": ("failure rate", 3),
        "agent_usd": ("agent USD", 2),
    }
    labels.update({c: (c.replace("rate_", "") + " rate", 3) for c in per_study_df if c.startswith("rate_")})
    numbers, display = mean_std_table(per_study_df, "arm", labels)
    kinds = per_study_df.groupby("arm")["device_kinds"].agg(lambda k: ",".join(sorted(set(",".join(k).split(",")) - {""})))
    display.insert(1, "device kinds", kinds)
    return numbers, display


def mean_std_table(df: pd.DataFrame, by: str, labels: dict[str, tuple[str, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Group rows (seeds) by `by`; `labels` maps column -> (display name, decimals). Columns that
    are all NaN (no agent, so no dollars) are left out of the display; a figure that only some
    seeds have says from how many (n=...)."""
    grouped = df.groupby(by)
    cols = [c for c in labels if c in df]
    stats = grouped[cols].agg(["mean", "std", "count"])
    display = pd.DataFrame({"seeds": grouped.size()})
    for col in cols:
        if stats[(col, "mean")].notna().any():
            name, digits = labels[col]
            parts = zip(stats[(col, "mean")], stats[(col, "std")], stats[(col, "count")], display["seeds"])
            display[name] = [_mean_std(m, s, c, n, digits) for m, s, c, n in parts]
    stats.columns = [f"{c}_{agg}" for c, agg in stats.columns]
    return stats, display


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
    the seeds that have no value (failed, or never reached) beside it."""
    display = pd.DataFrame(index=summary.index)
    display["n"] = summary["n"].astype(int)
    display["missing"] = summary["n_missing"].astype(int)
    for agg in ("mean", "median", "iqm"):
        display[f"{agg.upper() if agg == 'iqm' else agg} [95% CI]"] = [
            "-" if np.isnan(v) else f"{v:.{digits}f} (one seed: no CI)" if np.isnan(lo)
            else f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
            for v, lo, hi in zip(summary[agg], summary[f"{agg}_lo"], summary[f"{agg}_hi"])]
    return display
