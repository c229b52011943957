"""Time to target across seeds: when each seed of each arm first reached a val_bpb, as an ECDF
over seeds with censoring.

A seed that never reached the target is censored at its study's end: it stays in the
denominator, so an arm that got there on 3 of 8 seeds tops out at 3/8 instead of looking as good
as one that got there on all 8. Dropping such seeds is the usual way time-to-target flatters.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import stats
from analysis.curves import arm_styles, staircase, time_unit


def common_target(per_study: pd.DataFrame) -> float:
    """A target worth asking about: the median of the studies' final best val_bpb, so about half
    of all seeds reach it and an arm's lead shows as more of its seeds getting there sooner."""
    return float(np.nanmedian(per_study["best_val_bpb"]))


def times_to_target(trials: pd.DataFrame, target: float, x: str = "wall") -> pd.DataFrame:
    """One row per study: arm, seed, time (x units; inf if never), reached, and its study's end
    (where a censored seed stopped being watched)."""
    rows = []
    for study_id, g in trials.groupby("study_id"):
        stair = staircase(g, x)
        hit = stair[stair["best"] <= target]
        rows.append({"study_id": study_id, "arm": g["arm"].iloc[0], "seed": g["study_seed"].iloc[0],
                     "time": float(hit["x"].iloc[0]) if len(hit) else math.inf, "reached": bool(len(hit)),
                     "censored_at": float(stair["x"].max()) if len(stair) else math.nan})
    return pd.DataFrame(rows)


def ecdf_table(times: pd.DataFrame) -> pd.DataFrame:
    """Per arm: n seeds, how many reached, the Kaplan-Meier median time (inf when fewer than half
    did; each unreached seed censored at its study's end) with its 95% CI (stats.km_median)."""
    rows = []
    for arm, g in times.groupby("arm"):
        t = g["time"].to_numpy(dtype=float)
        median, lo, hi = stats.km_median(t, g["censored_at"].to_numpy(dtype=float))
        rows.append({"arm": arm, "n": len(t), "reached": int(np.isfinite(t).sum()),
                     "censored": int((~np.isfinite(t)).sum()), "median_time": median,
                     "median_lo": lo, "median_hi": hi})
    return pd.DataFrame(rows).set_index("arm")


def plot_ecdf(times: pd.DataFrame, target: float, x: str = "wall", unit: str = "GPU-h",
              simulated: bool = False) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    finite = times.loc[np.isfinite(times["time"]), "time"]
    end = float(np.nanmax(times["censored_at"])) if len(times) else 1.0
    scale, label_unit = 1.0, unit
    if x == "wall":
        label_unit, scale = time_unit(end)
    grid = np.unique(np.concatenate([[0.0], finite.to_numpy(), [end]]))
    styles = arm_styles(times["arm"])
    for arm, g in times.groupby("arm"):
        st = styles[arm]
        ecdf = stats.censored_ecdf(g["time"], grid)
        reached = int(np.isfinite(g["time"]).sum())
        ax.step(grid / scale, ecdf, where="post", color=st["color"], ls=st["ls"], lw=st["lw"],
                label=f"{arm}: {reached}/{len(g)} seeds reached")
        ax.plot(g.loc[np.isfinite(g["time"]), "time"] / scale, np.zeros(reached) - 0.03, st["marker"],
                color=st["color"], ms=4, alpha=0.7)  # each seed's time, visible
    ax.set_ylim(-0.06, 1.04)
    axis = {"wall": "active study time", "trials": "trials finished"}.get(x, "compute used")
    ax.set_xlabel(f"{axis} [{label_unit}]" + (" (SIMULATED clock)" if simulated else ""))
    ax.set_ylabel("fraction of seeds at or below target")
    ax.set_title(f"Time to val_bpb <= {target:.4f}: ECDF over seeds, unreached seeds censored (kept in n)"
                 + ("\nSIMULATED clock" if simulated else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
