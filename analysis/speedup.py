"""How much faster a parallel study reaches a val_bpb than a sequential one, three ways.

SkyPilot's "9x with 16 GPUs" never said how it was computed; each of these is a different claim:

(a) measured: T_seq(x) / T_par(x), a real 1-slot study of the same searcher against the parallel
    one. Includes everything: the searcher learning from fewer results per proposal, queueing,
    agent thinking.
(b) replayed: the parallel study's own trials laid end to end on one slot in submission order,
    each taking its recorded slot-seconds (t_finished - t_started). Same candidates, so it isolates
    what running them side by side bought; it leaves out the sequential searcher's thinking time
    and idle gaps, which makes it an optimistic sequential baseline and so a conservative speedup.
(c) throughput: trials/h of the parallel study over trials/h of the baseline. Says nothing about
    val_bpb; it is the number a "910 trials vs ~10/h" comparison gives.

T(x) is the study-clock time at which the study's best first reaches val_bpb <= x.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.curves import arm_styles, staircase


def time_to_target(trials: pd.DataFrame, target: float) -> float:
    """T(x): active study seconds (the study clock) until the study's best is <= target; inf if it never is."""
    stair = staircase(trials, "wall")
    hit = stair[stair["best"] <= target]
    return float(hit["x"].iloc[0]) if len(hit) else math.inf


def replay_sequential(trials: pd.DataFrame) -> pd.DataFrame:
    """The study's trials on one slot, end to end, in the order they were submitted."""
    order = trials.sort_values(["t_submitted", "trial_index"]).copy()
    duration = order["slot_seconds"].fillna(0.0)
    order["t_finished"] = duration.cumsum()
    order["t_started"] = order["t_finished"] - duration
    order["t_submitted"] = order["t_started"]
    order["slot_seconds"] = duration
    return order


def throughput(trials: pd.DataFrame) -> float:
    """Finished trials (failures included: they used the slot too) per hour of study clock."""
    done = trials["t_finished"].dropna()
    span = done.max()
    return len(done) / (span / 3600.0) if len(done) and span > 0 else math.nan


def speedup_curve(fast: pd.DataFrame, slow: pd.DataFrame) -> pd.DataFrame:
    """T_slow(x) / T_fast(x) at every level the slow study's best takes (so x runs up to the best
    the slow study reaches). Speedup is NaN where the fast study never reached x."""
    levels = staircase(slow, "wall").dropna(subset=["best"]).drop_duplicates("best")
    t_fast = np.array([time_to_target(fast, x) for x in levels["best"]])
    t_slow = levels["x"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        speedup = np.where(np.isfinite(t_fast) & (t_fast > 0), t_slow / t_fast, np.nan)
    return pd.DataFrame({"target": levels["best"].to_numpy(), "t_slow": t_slow, "t_fast": t_fast, "speedup": speedup})


def speedup_summary(parallel: pd.DataFrame, sequential: pd.DataFrame | None = None) -> dict:
    """All three figures for one parallel study, at one common target: the hardest val_bpb that
    the parallel study, its replay and (if given) the measured sequential study all reach."""
    replay = replay_sequential(parallel)
    bests = [parallel["val_bpb"].min()]
    if sequential is not None:
        bests.append(sequential["val_bpb"].min())
    target = max(bests)
    out = {
        "target": target,
        "t_parallel": time_to_target(parallel, target),
        "t_replay": time_to_target(replay, target),
        "trials_per_h_parallel": throughput(parallel),
        "trials_per_h_replay": throughput(replay),
    }
    out["speedup_replayed"] = out["t_replay"] / out["t_parallel"]
    out["throughput_ratio_replayed"] = out["trials_per_h_parallel"] / out["trials_per_h_replay"]
    if sequential is not None:
        out["t_sequential"] = time_to_target(sequential, target)
        out["trials_per_h_sequential"] = throughput(sequential)
        out["speedup_measured"] = out["t_sequential"] / out["t_parallel"]
        out["throughput_ratio_measured"] = out["trials_per_h_parallel"] / out["trials_per_h_sequential"]
    return out


def plot_speedups(curves: list[tuple[str, int, str, pd.DataFrame]], simulated: bool = False) -> plt.Figure | None:
    """Speedup against target val_bpb, harder targets to the right: (a) measured and (b) replayed,
    one line per seed, one colour and dash per arm. `curves` holds (arm, seed, kind, curve) with
    kind 'measured' or 'replayed'. A kind without a single finite point gets no panel (an empty
    panel with a default 0-1 axis reads as a result); None when neither has one."""
    kinds = [k for k in ("measured", "replayed")
             if any(kind == k and np.isfinite(c["speedup"]).any() for _, _, kind, c in curves)]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds) + 0.5, 4.4), sharey=True, squeeze=False)
    styles = arm_styles(pd.Series([arm for arm, *_ in curves]))
    for ax, kind in zip(axes[0], kinds):
        labelled = set()
        for arm, seed, k, curve in curves:
            if k != kind:
                continue
            st = styles[arm]
            label = None if arm in labelled else arm
            labelled.add(arm)
            ax.plot(curve["target"], curve["speedup"], marker=st["marker"], ms=3, color=st["color"], ls=st["ls"],
                    alpha=0.8, label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.invert_xaxis()
        ax.set_xlabel("target val_bpb [bits/byte] (harder ->)")
        which = "(a) measured: vs the 1-slot study" if kind == "measured" else "(b) replayed: own trials on 1 slot"
        ax.set_title(which, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="one line per seed", title_fontsize=7)
    axes[0][0].set_ylabel("speedup T_sequential(x) / T_parallel(x)")
    fig.suptitle("Time-to-target speedup" + (" - SIMULATED clock (virtual slots and time)" if simulated else ""))
    fig.tight_layout()
    return fig


def pair_with_sequential(studies: pd.DataFrame) -> list[tuple[pd.Series, pd.Series | None]]:
    """Each parallel study with its measured baseline: the 1-slot study of the same searcher,
    launcher, clock, objective and seed (None when there is no such study)."""
    key = ["searcher", "launcher", "time_mode", "objective", "seed"]
    studies = studies.assign(**{k: studies[k].fillna("-") for k in key})
    sequential = studies[studies["slots"] == 1].set_index(key)
    pairs = []
    for _, study in studies[studies["slots"] > 1].iterrows():
        match = tuple(study[k] for k in key)
        pairs.append((study, sequential.loc[[match]].reset_index().iloc[0] if match in sequential.index else None))
    return pairs
