"""One command from MLflow to a report folder: plots (PNG + PDF), tables (md, tex, csv) and a
Markdown summary, also logged as artifacts on every compared study's parent run.

    python -m analysis.report --tracking-uri sqlite:///mlflow.db --experiment arena --out reports/arena
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from mlflow import MlflowClient

from analysis import curves, hardware, phases, speedup, tables
from analysis.load import AnalysisError, load

SPEEDUP_LABELS = {
    "target": ("target val_bpb", 4),
    "speedup_measured": ("(a) measured", 2),
    "speedup_replayed": ("(b) replayed", 2),
    "throughput_ratio_measured": ("(c) trials/h vs measured", 2),
    "throughput_ratio_replayed": ("(c) trials/h vs replay", 2),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--studies", nargs="*", help="study ids or parent run names (default: all in the experiment)")
    p.add_argument("--out", help="report folder (default reports/EXPERIMENT)")
    p.add_argument("--no-log", action="store_true", help="do not log the folder to the parent runs")
    args = p.parse_args(argv)
    try:
        studies, trials = load(args.tracking_uri, args.experiment, args.studies)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("reports") / args.experiment)
    summary = write_report(studies, trials, out, source=f"{args.tracking_uri} / {args.experiment}")
    if not args.no_log:
        client = MlflowClient(tracking_uri=args.tracking_uri)
        for run_id in studies["run_id"]:
            client.log_artifacts(run_id, str(out), artifact_path="report")
    print(f"report: {summary}")
    return 0


def write_report(studies: pd.DataFrame, trials: pd.DataFrame, out: Path, source: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    simulated = bool((studies["time_mode"] == "simulated").any())
    lines = ["# autoresearch-arena report", ""]
    lines += _clock_notes(studies)
    lines += [f"Source: {source}. {len(studies)} studies, {len(trials)} trials. Written {dt.datetime.now():%Y-%m-%d %H:%M}.", ""]
    warnings = hardware.mixed_kind_warnings(trials)
    lines += [f"> WARNING: {w}" for w in warnings] + ([""] if warnings else [])

    lines += ["## Studies", "", _studies_table(studies, trials).to_markdown(index=False), ""]

    per_study = tables.per_study(trials, studies)
    numbers, display = tables.searcher_table(per_study)
    tables.write_table(display, numbers, out / "searchers", caption="Searcher comparison, mean and std over seeds")
    per_study.to_csv(out / "searchers_per_study.csv", index=False)
    lines += ["## Searchers (mean ± std over seeds)", "", tables.markdown(display), ""]
    lines += [
        f"Equal budgets: every study cut at {per_study.attrs['equal_gpu_h']:.3g} GPU-hours (slot-hours) and at "
        f"{per_study.attrs['equal_wall_h']:.3g} h of study clock, the least any compared study used.",
        "",
    ]

    lines += _speedup_section(studies, trials, out, simulated)

    lines += ["## Progress", ""]
    for x in curves.X_AXES:
        _save(curves.plot_progress(trials, x, simulated), out / f"progress_{x}")
        lines += [f"![best val_bpb vs {curves.X_AXES[x]}](progress_{x}.png)", ""]

    lines += _phases_section(studies, trials, out)
    lines += _hardware_section(trials, out)
    trials.to_csv(out / "trials.csv", index=False)
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary


def _clock_notes(studies: pd.DataFrame) -> list[str]:
    modes = set(studies["time_mode"])
    notes = []
    if "simulated" in modes:
        notes.append(
            "> **Time is SIMULATED** in studies with time_mode=simulated: wall-clock, GPU-hours and "
            "speedups come from the simulated launcher's virtual clock (real training on this CPU, "
            "virtual slots and time)."
        )
    if len(modes) > 1:
        notes.append("> WARNING: these studies mix real and simulated clocks; their times are not comparable.")
    return notes + ([""] if notes else [])


def _studies_table(studies: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    counts = trials.groupby("study_id").size().rename("trials")
    best = trials.groupby("study_id")["val_bpb"].min().rename("best val_bpb")
    cols = ["study_id", "arm", "seed", "launcher", "slots", "time_mode"]
    return studies[cols].join(counts, on="study_id").join(best, on="study_id").sort_values(["arm", "seed"])


def _speedup_section(studies: pd.DataFrame, trials: pd.DataFrame, out: Path, simulated: bool) -> list[str]:
    pairs = speedup.pair_with_sequential(studies)
    if not pairs:
        return ["## Speedup", "", "No study with more than one slot: nothing to compare.", ""]
    by_study = dict(tuple(trials.groupby("study_id")))
    rows, plotted = [], []
    for par, seq in pairs:
        par_trials = by_study[par["study_id"]]
        seq_trials = by_study.get(seq["study_id"]) if seq is not None else None
        row = {"arm": par["arm"], "seed": par["seed"], "parallel": par["study_id"]}
        row["sequential"] = seq["study_id"] if seq is not None else None
        row.update(speedup.speedup_summary(par_trials, seq_trials))
        rows.append(row)
        replay = speedup.replay_sequential(par_trials)
        plotted.append((par["arm"], par["seed"], "replayed", speedup.speedup_curve(par_trials, replay)))
        if seq_trials is not None:
            plotted.append((par["arm"], par["seed"], "measured", speedup.speedup_curve(par_trials, seq_trials)))
    per_pair = pd.DataFrame(rows)
    per_pair.to_csv(out / "speedups_per_pair.csv", index=False)
    numbers, display = tables.mean_std_table(per_pair, "arm", SPEEDUP_LABELS)
    tables.write_table(display, numbers, out / "speedups", caption="Parallel over sequential speedup at a common target")
    _save(speedup.plot_speedups(plotted, simulated), out / "speedup")
    lines = ["## Speedup of parallel over sequential", ""]
    if simulated:
        lines += ["(on the SIMULATED clock)", ""]
    lines += [
        tables.markdown(display),
        "",
        "Per parallel study, at the hardest target that it, its replay and its 1-slot twin (same searcher and",
        "seed) all reach: (a) T_1slot(x)/T_parallel(x) measured against the real 1-slot study; (b) the same",
        "against the parallel study's own trials replayed end to end on one slot in submission order;",
        "(c) the ratio of trials per hour. Per-pair figures: speedups_per_pair.csv.",
        "",
        "![speedup vs target](speedup.png)",
        "",
    ]
    return lines


def _phases_section(studies: pd.DataFrame, trials: pd.DataFrame, out: Path) -> list[str]:
    """The improving trials of every study go to phases.csv; the summary shows each arm's best seed."""
    all_phases = []
    for study_id, g in trials.groupby("study_id"):
        all_phases.append(phases.improvements(g).assign(study_id=study_id, arm=g["arm"].iloc[0]))
    table = pd.concat(all_phases, ignore_index=True)
    table.to_csv(out / "phases.csv", index=False)
    lines = ["## Phases: the trials that moved the best", ""]
    for arm, g in table.groupby("arm"):
        best_study = g.loc[g["val_bpb"].idxmin(), "study_id"]
        shown = g[g["study_id"] == best_study][["t_finished", "trial_index", "val_bpb", "gain", "changes", "hypothesis"]]
        lines += [f"### {arm}: study {best_study}", "", shown.to_markdown(index=False, floatfmt=".4g"), ""]
    return lines


def _hardware_section(trials: pd.DataFrame, out: Path) -> list[str]:
    lines = ["## Hardware", ""]
    if "source_sha" not in trials or trials["source_sha"].isna().all():
        return lines + ["Trials carry no source_sha, so candidates cannot be matched across device kinds.", ""]
    diffs = hardware.kind_differences(trials)
    diffs.to_csv(out / "hardware.csv", index=False)
    if diffs.empty:
        return lines + ["No candidate ran on more than one device kind.", ""]
    summary = hardware.kind_summary(diffs)
    return lines + [
        "val_bpb difference of the same train.py (by source_sha) on each kind against the reference kind:",
        "",
        summary.to_markdown(index=False, floatfmt=".4g"),
        "",
    ]


def _save(fig: plt.Figure, stem: Path) -> None:
    for ext in ("png", "pdf"):
        fig.savefig(stem.with_suffix(f".{ext}"), dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
