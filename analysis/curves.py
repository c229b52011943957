"""Best-so-far staircases: what a study had found by a given active study time, trial count or
amount of compute, per study and averaged over seeds.

A trial counts from the moment it finished (its result was known then, not when it started).
On the trials axis a screening rung (searchers/rungs.py) counts at its budget fraction: a quarter
run is a quarter of a trial's compute.
On the GPU-hours axis a trial's point is the slot-time of all trials finished so far, itself
included: what the results in hand cost, the usual sample-efficiency axis. (Slot-time committed
to trials still running shows on the time axis instead: a 16-slot study spends 16 GPU-hours
per hour whether or not its first results are in.)
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import stats

# The x axes a staircase can be drawn against, and how each is labelled ({unit}: GPU-h, or CPU
# slot-h when the slots were CPU shares; see load.compute_unit). "wall" is the study clock the
# mirror logs (t_finished_s): active study time, idle gaps between sessions left out.
X_AXES = {"wall": "active study time", "trials": "trials finished", "gpu_hours": "{unit}"}
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def axis_name(x: str, unit: str = "GPU-h") -> str:
    return X_AXES[x].format(unit=unit)


def staircase(trials: pd.DataFrame, x: str = "wall") -> pd.DataFrame:
    """One study's best val_bpb after each finished trial, in finishing order: columns x, best,
    trial_id, val_bpb. `best` is NaN until the first ok trial; time x is in seconds."""
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; expected one of {sorted(X_AXES)}")
    done = trials[trials["t_finished"].notna()].sort_values(["t_finished", "trial_index"])
    out = pd.DataFrame({"trial_id": done["trial_id"].to_numpy(), "val_bpb": done["val_bpb"].to_numpy()})
    if x == "wall":
        out["x"] = done["t_finished"].to_numpy()
    elif x == "trials":
        fraction = pd.to_numeric(done["budget_fraction"], errors="coerce") if "budget_fraction" in done else None
        out["x"] = (np.ones(len(done)) if fraction is None else fraction.fillna(1.0).clip(upper=1.0).to_numpy()).cumsum()
    else:
        out["x"] = done["slot_seconds"].fillna(0.0).cumsum().to_numpy() / 3600.0
    out["best"] = out["val_bpb"].cummin().ffill()
    return out[["x", "best", "trial_id", "val_bpb"]]


def best_at(stair: pd.DataFrame, at: np.ndarray) -> np.ndarray:
    """The staircase's value at each x in `at` (NaN before its first ok trial)."""
    grid = pd.DataFrame({"x": np.asarray(at, dtype=float)}).reset_index()
    hit = pd.merge_asof(grid.sort_values("x"), stair[["x", "best"]].sort_values("x"), on="x", direction="backward")
    return hit.sort_values("index")["best"].to_numpy()


def seed_matrix(group: pd.DataFrame, x: str, grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(grid, values): each study's (seed's) best so far at every grid point, one column per
    study; the grid defaults to the union of the studies' event points."""
    stairs = [staircase(g, x) for _, g in group.groupby("study_id")]
    if grid is None:
        grid = np.unique(np.concatenate([s["x"].to_numpy() for s in stairs]))
    return grid, np.column_stack([best_at(s, grid) for s in stairs])


def seed_band(trials: pd.DataFrame, x: str = "wall") -> pd.DataFrame:
    """Per arm, the mean staircase over its studies (seeds) with the min-max spread and a
    pointwise t 95% CI of the mean, on the union of their event points. The mean is only drawn
    where every seed has an ok result, so one lucky seed cannot stand in for the others; a seed
    that never had one cannot be averaged at all and is counted in n_without_result instead."""
    rows = []
    for arm, group in trials.groupby("arm", sort=True):
        grid, values = seed_matrix(group, x)
        never = np.isnan(values).all(axis=0)
        values = values[:, ~never]
        complete = ~np.isnan(values).any(axis=1) if values.shape[1] else np.zeros(len(grid), bool)
        ci_lo, ci_hi = stats.mean_band(values[complete]) if complete.any() else ([], [])
        rows.append(
            pd.DataFrame(
                {
                    "arm": arm,
                    "x": grid[complete],
                    "mean": values[complete].mean(axis=1),
                    "lo": values[complete].min(axis=1),
                    "hi": values[complete].max(axis=1),
                    "ci_lo": ci_lo,
                    "ci_hi": ci_hi,
                    "n_seeds": values.shape[1],
                    "n_without_result": int(never.sum()),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def arm_colors(arms: pd.Series) -> dict:
    """One colour per arm, the same in every plot of a report."""
    return dict(zip(sorted(arms.unique()), plt.get_cmap("tab10").colors))


def arm_styles(arms: pd.Series) -> dict[str, dict]:
    """Colour, line style, marker and width per arm. Arms can coincide (TPE's random start-up
    trials are random search's, so with few trials the two curves are one): each later arm is
    drawn thinner and in another dash pattern on top of the earlier ones, so both stay visible."""
    names = sorted(pd.Series(arms).unique())
    colors = plt.get_cmap("tab10").colors
    return {
        arm: {"color": colors[i % len(colors)], "ls": LINESTYLES[i % len(LINESTYLES)],
              "marker": MARKERS[i % len(MARKERS)], "lw": max(1.2, 3.2 - 0.5 * i)}
        for i, arm in enumerate(names)
    }


def identical_arms(trials: pd.DataFrame, x: str = "trials") -> list[tuple[str, str]]:
    """Pairs of arms whose every seed has the same staircase: worth saying, since their lines
    lie on top of each other."""
    curves = {}
    for arm, group in trials.groupby("arm", sort=True):
        per_seed = {g["study_seed"].iloc[0]: tuple(staircase(g, x)["best"].round(12)) for _, g in group.groupby("study_id")}
        curves[arm] = per_seed
    arms = sorted(curves)
    return [(a, b) for i, a in enumerate(arms) for b in arms[i + 1:] if curves[a] == curves[b]]


def time_unit(max_seconds: float) -> tuple[str, float]:
    """A readable unit for a time axis and its length in seconds."""
    if max_seconds >= 2 * 3600:
        return "h", 3600.0
    if max_seconds >= 120:
        return "min", 60.0
    return "s", 1.0


def plot_progress(trials: pd.DataFrame, x: str = "wall", simulated: bool = False, unit: str = "GPU-h") -> plt.Figure:
    """Anytime curves: thin steps per study (every seed visible), a thick seed-mean per arm with
    its t 95% CI band."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    band = seed_band(trials, x)
    scale, time_label = 1.0, ""
    if x == "wall":
        time_label, scale = time_unit(float(trials["t_finished"].max()))
    styles = arm_styles(trials["arm"])
    for (arm, _study), group in trials.groupby(["arm", "study_id"]):
        stair = staircase(group, x)
        ax.step(stair["x"] / scale, stair["best"], where="post", color=styles[arm]["color"], alpha=0.3, lw=0.7,
                ls=styles[arm]["ls"])
    for arm, b in band.groupby("arm"):
        st = styles[arm]
        n, without = b["n_seeds"].iloc[0], b["n_without_result"].iloc[0]
        label = (f"{arm}: mean of {n} seeds, 95% CI" if n > 1 else f"{arm}: one seed, no CI") + (
            f" ({without} more seed(s) without an ok trial)" if without else "")
        ax.step(b["x"] / scale, b["mean"], where="post", color=st["color"], lw=st["lw"], ls=st["ls"], label=label)
        ax.fill_between(b["x"] / scale, b["ci_lo"], b["ci_hi"], step="post", color=st["color"], alpha=0.15)
    on_clock = simulated and x != "trials"
    xlabel = axis_name(x, unit) + (" (SIMULATED clock)" if on_clock else "")
    if x == "wall":
        xlabel += f" [{time_label}]"
        spans = trials.groupby("study_id")["t_finished"].max()
        if spans.max() > 4 * spans.min():  # 1 slot next to 16: only a log axis shows both
            ax.set_xscale("log")
    elif x == "gpu_hours":
        xlabel = f"compute used [{unit}]" + (" (SIMULATED clock)" if on_clock else "")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("best val_bpb so far [bits/byte]")
    ax.set_title(f"Best val_bpb vs {axis_name(x, unit)} (thin: one line per seed)"
                 + ("\nSIMULATED clock: virtual slots and time" if on_clock else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
