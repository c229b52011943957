"""What a study learned, said when it ends: whether search found anything, which knobs mattered,
what to try next, and a figure of the running best over study time.

"best: t0000" alone cannot tell a working search from a broken one. So the end of a study compares
its best with the baseline *and* with the noise floor (σ of the baseline over seeds, measured by
`python -m analysis.noise` and stored per preset and device kind): a gain counts as beyond noise
when it exceeds NOISE_Z·σ·√2, the spread of the difference of two single runs (the Claude
searcher's keep rule uses the same margin). Without a stored floor it says so, and how to measure
one, instead of guessing. The knobs that mattered come from Optuna's own importance evaluator
when the searcher runs an Optuna study, otherwise from a plain effect table (per knob changed from
the baseline: how many scored trials changed it, the best and the mean change in val_bpb).
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from study.baseline import baseline_score, is_baseline
from study.clock import StudyClock
from study.records import Result, Trial

log = logging.getLogger("arena.findings")

NOISE_Z = 2.0
FIGURE = "running_best.png"
TOP_KNOBS = 5
MIN_FOR_IMPORTANCE = 10  # PED-ANOVA compares the top 10% of trials with all of them: fewer say nothing


@dataclass
class Findings:
    lines: list[str] = field(default_factory=list)  # for people: the terminal and leaderboard.txt
    tags: dict[str, str] = field(default_factory=dict)  # for the parent run
    metrics: dict[str, float] = field(default_factory=dict)  # the parent run keeps them as tags
    figure: Path | None = None


@dataclass
class Floor:
    """The noise floor a verdict uses: σ of val_bpb over seeds, and where it was measured."""

    sigma: float | None
    note: str = ""

    @property
    def margin(self) -> float | None:
        return None if self.sigma is None else NOISE_Z * self.sigma * math.sqrt(2)


def learn(history: list[tuple[Trial, Result]], best: tuple[Trial, Result] | None, *, baseline_source: str,
          baseline_knobs: Mapping[str, Any], floor: Floor, preset: str, optuna_study=None,
          study_dir: Path | None = None, clock: StudyClock | None = None, max_trials: int | None = None,
          random_start: int | None = None, title: str = "") -> Findings:
    """Everything the end of a study says beyond its leaderboard. Never raises for lack of data."""
    out = Findings()
    base = baseline_score(history, baseline_source)
    scored = [(t, r) for t, r in history if r.ok and t.candidate.full_budget]
    verdict = _verdict(best, base, floor, baseline_source, preset, out)
    out.tags["verdict"] = verdict
    out.lines += knobs_that_mattered(scored, base, baseline_source, baseline_knobs, optuna_study)
    out.lines += _next_steps(verdict, len(history), max_trials, random_start, preset, study_dir)
    if study_dir is not None and scored:
        try:
            out.figure = running_best_figure(history, clock or StudyClock(), base, floor,
                                             Path(study_dir) / FIGURE, title)
        except Exception as e:  # noqa: BLE001 - a figure must never cost the summary
            log.warning("running-best figure failed: %s: %s", type(e).__name__, e)
    return out


def _verdict(best, base, floor: Floor, baseline_source: str, preset: str, out: Findings) -> str:
    if best is None:
        out.lines.append("search: no trial scored, so nothing was learned")
        return "nothing scored"
    trial, result = best
    if base is None:
        out.lines.append(f"search: the best is {trial.trial_id} ({result.val_bpb:.4f}); the baseline did not run in "
                         "this study, so there is nothing to compare it with")
        return "no baseline"
    base_bpb, n_base = base
    out.metrics["baseline_val_bpb"] = base_bpb
    runs = f" (mean of {n_base} runs)" if n_base > 1 else ""
    if floor.sigma is not None:
        out.metrics["noise_sigma"] = floor.sigma
    gain = base_bpb - result.val_bpb
    if is_baseline(trial.candidate, baseline_source) or gain <= 0:
        what = "the baseline itself" if is_baseline(trial.candidate, baseline_source) else "no better"
        out.lines.append(f"search: no candidate beat the baseline ({base_bpb:.4f}{runs}); the best, "
                         f"{trial.trial_id} ({result.val_bpb:.4f}), is {what}")
        return "baseline not beaten"
    out.metrics["gain_vs_baseline"] = gain
    head = f"search: {trial.trial_id} ({result.val_bpb:.4f}) beats the baseline ({base_bpb:.4f}{runs}) by {gain:.4f}"
    if floor.margin is None:
        out.lines.append(f"{head}; noise floor not measured for the {preset} preset, so whether that is more than "
                         f"seed noise is unknown: python -m analysis.noise objective={preset} measures it "
                         "(the baseline on 8 seeds)")
        return "noise floor not measured"
    within = gain <= floor.margin
    where = f"; {floor.note}" if floor.note else ""
    out.lines.append(f"{head}: {'within noise' if within else 'beyond noise'} (margin {NOISE_Z:g}σ√2 = "
                     f"{floor.margin:.4f}, σ = {floor.sigma:.4f}{where})")
    return "within noise" if within else "beyond noise"


def knobs_that_mattered(scored: list[tuple[Trial, Result]], base, baseline_source: str,
                        baseline_knobs: Mapping[str, Any], optuna_study=None) -> list[str]:
    """Optuna's importance evaluator over the searcher's own study, or an effect table."""
    if optuna_study is not None:
        return _importance(optuna_study)
    return _effect_table(scored, base, baseline_source, baseline_knobs)


def _importance(study) -> list[str]:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < MIN_FOR_IMPORTANCE:
        return [f"knobs that mattered: too few scored trials ({len(complete)}; Optuna's importance needs "
                f"{MIN_FOR_IMPORTANCE}) to say"]
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as e:  # noqa: BLE001 - too few or too alike trials; the verdict still stands
        return [f"knobs that mattered: not enough to go by ({len(complete)} scored trials: {e})"]
    if not importances or not any(v > 0 for v in importances.values()):
        return [f"knobs that mattered: none stood out over {len(complete)} scored trials"]
    top = list(importances.items())[:TOP_KNOBS]
    return [f"knobs that mattered (Optuna's PED-ANOVA importance over {len(complete)} scored trials): "
            + ", ".join(f"{k} {v:.2f}" for k, v in top)]


def _effect_table(scored, base, baseline_source: str, baseline_knobs: Mapping[str, Any]) -> list[str]:
    if base is None:
        return []
    gains: dict[str, list[float]] = {}
    code_only = 0
    for trial, result in scored:
        if is_baseline(trial.candidate, baseline_source):
            continue
        changed = [k for k, v in trial.candidate.knobs.items()
                   if json.dumps(baseline_knobs.get(k)) != json.dumps(v)]  # a tuple comes back from JSON a list
        if not changed:
            code_only += 1
        for k in changed:
            gains.setdefault(k, []).append(base[0] - result.val_bpb)
    if not gains:
        return [f"knobs that mattered: no scored trial changed a knob ({code_only} changed code only)"] if code_only else []
    rows = sorted(gains.items(), key=lambda kv: -max(kv[1]))[:TOP_KNOBS]
    width = max(len(k) for k, _ in rows)
    lines = ["knobs that mattered (gain in val_bpb over the baseline of the scored trials that changed each knob):",
             f"  {'knob'.ljust(width)}  trials  best gain  mean gain"]
    lines += [f"  {k.ljust(width)}  {len(v):6d}  {max(v):+9.4f}  {statistics.fmean(v):+9.4f}" for k, v in rows]
    if code_only:
        lines.append(f"  and {code_only} scored trial(s) that changed code only")
    return lines


def _next_steps(verdict: str, done: int, max_trials: int | None, random_start: int | None, preset: str,
                study_dir: Path | None) -> list[str]:
    more = f"study.max_trials={2 * max(done, 1)}"
    if random_start and max_trials is not None and max_trials <= random_start:
        room = f"study.max_trials={random_start + max(done, 4)}"
        return [f"next: all {max_trials} trials were drawn at random (the sampler models nothing before "
                f"{random_start}); the same command with {room} resumes this study with room to model"]
    if verdict in ("baseline not beaten", "within noise"):
        return [f"next: the same command with {more} resumes this study with more trials; or narrow the space "
                "to the knobs that mattered"]
    if verdict == "beyond noise" and study_dir is not None:
        return [f"next: confirm it on more seeds: python -m analysis.noise objective={preset} "
                f"study.baseline={Path(study_dir) / 'best_train.py'}"]
    return []


def running_best_figure(history: list[tuple[Trial, Result]], clock: StudyClock, base, floor: Floor,
                        path: Path, title: str = "") -> Path:
    """Every scored trial over study time, the running best as steps, and the baseline with its
    noise band (±σ, and the verdict's margin when σ is known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [(clock.active(r.finished_at), r.val_bpb) for t, r in history
               if r.ok and t.candidate.full_budget and r.finished_at is not None]
    unit, scale = ("h", 3600) if max(s for s, _ in seconds) > 3 * 3600 else (
        "min", 60) if max(s for s, _ in seconds) > 120 else ("s", 1)
    points = sorted((s / scale, v) for s, v in seconds)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    xs, ys = zip(*points)
    ax.scatter(xs, ys, s=14, color="0.55", label="scored trials", zorder=3)
    best, bx, by = math.inf, [], []
    for x, y in points:
        best = min(best, y)
        bx.append(x)
        by.append(best)
    ax.step(bx, by, where="post", color="tab:blue", lw=2, label="running best", zorder=4)
    if base is not None:
        ax.axhline(base[0], color="tab:red", lw=1, ls="--", label="baseline")
        if floor.sigma is not None:
            ax.axhspan(base[0] - floor.sigma, base[0] + floor.sigma, color="tab:red", alpha=0.15,
                       label="baseline ± σ (seed noise)")
            ax.axhline(base[0] - floor.margin, color="tab:red", lw=0.8, ls=":", label=f"beyond noise below ({NOISE_Z:g}σ√2)")
    ax.set_xlim(left=0)
    ax.set_xlabel(f"study time ({unit}; idle time between sessions left out)")
    ax.set_ylabel("val_bpb (lower is better)")
    note = "" if floor.sigma is not None else " (noise floor not measured)"
    ax.set_title((title or "running best") + note, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
