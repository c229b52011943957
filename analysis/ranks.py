"""Ranks of arms across seeds: the average rank over the compute budget, and Demšar's
critical-difference diagram (Friedman + Nemenyi) for three or more arms.

Ranks ask a different question from means: not "by how much", but "how often first". They are
what a reviewer wants when several searchers are compared on few seeds, because one diverged seed
moves a mean but moves a rank by at most one place.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.curves import arm_styles, axis_name, seed_matrix, staircase
from analysis.stats import Friedman


def rank_over_time(trials: pd.DataFrame, x: str = "gpu_hours", points: int = 60, until: float | None = None) -> pd.DataFrame:
    """Average rank (1 = lowest best-so-far) of each arm at each point of x, over the seeds that
    every arm has, up to `until` (the comparison's budget, in x's unit: a study that stopped before
    it keeps its last best) or else the least x any study reached. An arm without an ok result yet
    ranks behind those with one (ties share the mean rank)."""
    ends = [staircase(g, x)["x"].max() for _, g in trials.groupby("study_id")]
    firsts = trials.groupby("study_id").apply(lambda g: staircase(g, x)["x"].min(), include_groups=False)
    grid = np.linspace(firsts.min(), min(ends) if until is None else max(until, firsts.min()), points)
    seeds_per_arm = trials.groupby("arm")["study_seed"].agg(set)
    seeds = sorted(set.intersection(*seeds_per_arm)) if len(seeds_per_arm) else []
    arms = sorted(seeds_per_arm.index)
    if not seeds:
        return pd.DataFrame(columns=["x", "arm", "avg_rank", "n_seeds"])
    per_seed = []
    for seed in seeds:
        cols = []
        for arm in arms:
            g = trials[(trials["arm"] == arm) & (trials["study_seed"] == seed)]
            cols.append(seed_matrix(g, x, grid)[1][:, 0])  # first study of that seed
        values = np.where(np.isnan(np.column_stack(cols)), np.inf, np.column_stack(cols))
        per_seed.append(pd.DataFrame(values, columns=arms).rank(axis=1, method="average").to_numpy())
    avg = np.mean(per_seed, axis=0)
    return pd.DataFrame([{"x": grid[i], "arm": arm, "avg_rank": avg[i, j], "n_seeds": len(seeds)}
                         for i in range(len(grid)) for j, arm in enumerate(arms)])


def plot_rank_over_time(ranks: pd.DataFrame, x: str = "gpu_hours", unit: str = "GPU-h",
                        simulated: bool = False) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = arm_styles(ranks["arm"])
    for arm, g in ranks.groupby("arm"):
        st = styles[arm]
        ax.plot(g["x"], g["avg_rank"], color=st["color"], ls=st["ls"], lw=st["lw"], label=arm)
    k = ranks["arm"].nunique()
    ax.set_ylim(k + 0.3, 0.7)  # rank 1 on top
    ax.set_yticks(range(1, k + 1))
    ax.set_xlabel(f"compute used [{unit}]" if x == "gpu_hours" else axis_name(x, unit)
                  + (" (SIMULATED clock)" if simulated and x != "trials" else ""))
    ax.set_ylabel(f"average rank over {ranks['n_seeds'].iloc[0]} seeds (1 = best)")
    ax.set_title("Average rank of best val_bpb so far" + ("\nSIMULATED clock" if simulated else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def cliques(avg_rank: dict[str, float], cd: float) -> list[list[str]]:
    """Maximal runs of arms (in rank order) whose average ranks lie within one critical
    difference: Nemenyi cannot tell the members of a run apart."""
    order = sorted(avg_rank, key=avg_rank.get)
    runs = []
    for i, first in enumerate(order):
        run = [a for a in order[i:] if avg_rank[a] - avg_rank[first] < cd]
        if len(run) > 1 and not any(set(run) <= set(r) for r in runs):
            runs.append(run)
    return runs


def plot_cd_diagram(f: Friedman, title: str) -> plt.Figure:
    """Demšar's diagram: arms on an axis of average rank (best on the left), a bar joining every
    group that is within the critical difference, the CD drawn to scale."""
    k = len(f.arms)
    order = sorted(f.arms, key=f.avg_rank.get)
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.32 * k))
    ax.set_xlim(0.5, k + 0.5)
    top = 0.0
    ax.hlines(top, 1, k, color="black", lw=1)
    for r in range(1, k + 1):
        ax.vlines(r, top, top + 0.08, color="black", lw=1)
        ax.text(r, top + 0.12, str(r), ha="center", va="bottom", fontsize=9)
    half = (k + 1) // 2
    for i, arm in enumerate(order):
        rank = f.avg_rank[arm]
        y = -0.35 - 0.3 * (i if i < half else k - 1 - i)
        x_text = 0.6 if i < half else k + 0.4
        ax.plot([rank, rank, x_text], [top, y, y], color="black", lw=0.8)
        ax.text(x_text, y, f"{arm} ({rank:.2f})", ha="left" if i >= half else "right", va="center", fontsize=8,
                transform=ax.transData)
    for j, run in enumerate(cliques(f.avg_rank, f.cd)):
        lo, hi = f.avg_rank[run[0]], f.avg_rank[run[-1]]
        ax.hlines(-0.15 - 0.07 * j, lo - 0.03, hi + 0.03, color="black", lw=3)
    ax.hlines(top + 0.45, 1, 1 + f.cd, color="black", lw=1.5)
    ax.text(1 + f.cd / 2, top + 0.5, f"CD = {f.cd:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(-0.45 - 0.3 * half, top + 0.8)
    ax.axis("off")
    dropped = f.dropped_text
    ax.set_title(f"{title}: critical-difference diagram (x: average rank, 1 = best)\n"
                 f"Friedman p = {f.p:.3g} over n = {f.n_blocks} seeds{dropped}\n"
                 "bars join arms that Nemenyi cannot tell apart (alpha 0.05)", fontsize=9)
    fig.tight_layout()
    return fig
