"""One command from MLflow to a report a reviewer accepts: the claims the data supports (and "no
difference detected" for the rest), confidence intervals, paired tests, ranks, anytime curves,
time-to-target ECDFs, speedups; as Markdown + LaTeX/CSV tables + PNG/PDF figures + one
self-contained report.html, logged to a comparison run and to every compared study's parent run.

    python -m analysis.report --tracking-uri sqlite:///mlflow.db --experiment arena --out reports/arena
    python -m analysis.report ... --budget trials=24 --budget wall=2   # name the budgets yourself

val_bpb of different objective presets measure different models on different budgets; studies of
several presets get one report each (out/<preset>/), never one table. Every study is compared at
the budget the experiment named (analysis.budget); the report says which measure and how many
trials each arm kept. Arms whose seeds differ, or an arm with a seed twice, are refused in one
line before anything is written.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from analysis import budget, claims, curves, hardware, noise, phases, ranks, spend, speedup, stats, tables, ttt
from analysis.document import Document
from analysis.load import AnalysisError, compute_unit, load

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
    p.add_argument("--preset", help="only the studies of this objective preset (default: one report per preset)")
    p.add_argument("--out", help="report folder (default reports/EXPERIMENT)")
    p.add_argument("--noise-floor", default="auto",
                   help="σ of val_bpb below which no difference is claimed: a number, 'none', or 'auto' (the "
                        "measured floor stored by analysis.noise for the preset and device kinds)")
    p.add_argument("--noise-store", default=str(noise.DEFAULT_STORE), help="where analysis.noise stores floors")
    p.add_argument("--test", choices=sorted(stats.TESTS), default="wilcoxon",
                   help="paired test for the claims and the pairwise tables")
    p.add_argument("--budget", action="append", metavar="MEASURE[=VALUE]",
                   help="compare every study at this budget: trials[=N], compute[=SLOT_HOURS] or wall[=HOURS] of active "
                        "study time; repeat for more (the first is the headline). Default: the measure the budget kind "
                        "calls for, at the value the experiment named (study.max_trials, compare.at, study.max_hours)")
    p.add_argument("--unmatched-seeds", action="store_true",
                   help="pair arms on the seeds both have even when they were run on different seeds")
    p.add_argument("--target", type=float, help="val_bpb for time-to-target (default: median of the studies' best)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    args = p.parse_args(argv)
    try:
        studies, trials = load(args.tracking_uri, args.experiment, args.studies)
        groups = preset_groups(studies, args.preset)
        floor = None if args.noise_floor in ("auto", "none") else _float(args.noise_floor)
        for preset, ids in groups.items():  # every refusal before anything is written
            try:
                plan(studies[studies["study_id"].isin(ids)], trials[trials["study_id"].isin(ids)], args.budget,
                     args.unmatched_seeds)
            except ValueError as e:
                raise ValueError(f"objective preset {preset}: {e}" if len(groups) > 1 else str(e)) from None
    except (AnalysisError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("reports") / args.experiment)
    source = f"{args.tracking_uri} / {args.experiment}"
    written = []
    for preset, ids in groups.items():
        folder = out if len(groups) == 1 else out / str(preset)
        s, t = studies[studies["study_id"].isin(ids)], trials[trials["study_id"].isin(ids)]
        sigma, sigma_note = floor, "given on the command line" if floor is not None else ""
        if args.noise_floor == "auto":
            sigma, sigma_note = noise.floor_for(args.noise_store, str(preset), sorted(set(t["device_kind"].dropna())))
        written.append(write_report(s, t, folder, source=source, noise_floor=sigma, noise_note=sigma_note,
                                    test=args.test, target=args.target, budgets=args.budget,
                                    unmatched_ok=args.unmatched_seeds))
    if len(groups) > 1:
        written.insert(0, write_index(groups, out, source))
    if not args.no_log:
        log_to_mlflow(args.tracking_uri, args.experiment, studies, out)
    for path in written:
        print(f"report: {path} ({path.with_name('report.html')})")
    return 0


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--noise-floor must be a number, 'auto' or 'none', not {text!r}") from None


def preset_groups(studies: pd.DataFrame, preset: str | None = None) -> dict[str, list[str]]:
    """Study ids per objective preset (the one thing a comparison must never mix)."""
    objective = studies["objective"].fillna("?").astype(str)
    if preset is not None:
        if preset not in set(objective):
            raise AnalysisError(f"no study of objective preset {preset!r}; presets here: {sorted(set(objective))}")
        objective = objective[objective == preset]
    return {p: studies.loc[objective.index[objective == p], "study_id"].tolist() for p in sorted(set(objective))}


def write_index(groups: dict[str, list[str]], out: Path, source: str) -> Path:
    doc = Document("autoresearch-arena report: one per objective preset")
    doc.note(f"These studies use {len(groups)} objective presets ({', '.join(groups)}). Their val_bpb come from "
             "different models, budgets and data, so they are never compared in one table or plot: each preset "
             "has its own report below.")
    doc.text(f"Source: {source}.")
    doc.items([f"{preset}/summary.md and {preset}/report.html: {len(ids)} studies" for preset, ids in groups.items()])
    return _write(doc, out)


def plan(studies: pd.DataFrame, trials: pd.DataFrame, requested: list[str] | None = None,
         unmatched_ok: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """(per_study, notes): every study cut at the comparison's budgets, after the checks that
    refuse a comparison (SeedError, BudgetError: one line each)."""
    budgets, notes = budget.resolve(studies, trials, requested)
    per_study = tables.per_study(trials, studies, budgets)
    stats.check_one_study_per_seed(per_study[["arm", "seed", "study_id"]])
    if per_study["arm"].nunique() > 1 and not unmatched_ok:
        stats.check_matched_seeds(per_study[["arm", "seed"]])
    return per_study, notes


def write_report(studies: pd.DataFrame, trials: pd.DataFrame, out: Path, source: str = "",
                 noise_floor: float | None = None, noise_note: str = "", test: str = "wilcoxon",
                 target: float | None = None, budgets: list[str] | None = None, unmatched_ok: bool = False) -> Path:
    per_study, budget_notes = plan(studies, trials, budgets, unmatched_ok)
    out.mkdir(parents=True, exist_ok=True)
    presets = sorted(set(studies["objective"].fillna("?").astype(str)))
    simulated = bool((studies["time_mode"] == "simulated").any())
    unit = compute_unit(trials)
    doc = Document(f"autoresearch-arena report: objective preset {', '.join(presets)}")
    for line in _clock_notes(studies):
        doc.note(line)
    doc.text(f"Source: {source}. {len(studies)} studies, {len(trials)} trials, compute in {unit}"
             f"{' (CPU slot-hours: not GPU-hours)' if 'CPU' in unit else ''}. Written {dt.datetime.now():%Y-%m-%d %H:%M}.")
    if len(presets) > 1:
        doc.note(f"WARNING: these studies mix objective presets {presets}; their val_bpb are not comparable.")
    for w in hardware.mixed_kind_warnings(trials):
        doc.note(f"WARNING: {w}")
    for a, b in curves.identical_arms(trials):
        doc.note(f"{a} and {b} found exactly the same val_bpb after every trial of every seed (e.g. TPE still in its "
                 "random start-up trials): their lines coincide and are drawn in different dash patterns.")

    doc.heading("Studies")
    doc.table(_studies_table(studies, trials).set_index("study_id"))

    per_study.to_csv(out / "searchers_per_study.csv", index=False)
    _budget_section(doc, per_study, budget_notes, out, unit)
    _claims_section(doc, per_study, out, noise_floor, noise_note, test, unit, unmatched_ok)
    _ci_section(doc, per_study, out, unit, test, unmatched_ok)

    numbers, display = tables.searcher_table(per_study)
    tables.write_table(display, numbers, out / "searchers", caption="Searcher comparison, mean and std over seeds")
    doc.heading("Searchers (mean ± std over seeds)")
    doc.table(display)
    doc.text("seeds: studies of the arm; missing seeds: those any arm has that this arm has no result for at the "
             f"headline budget ({per_study.attrs['budgets'][0].title(unit)}); a figure that only some seeds have says "
             "from how many (n=...). Trials per active study hour: finished trials over the study clock, idle gaps "
             "between sessions left out.")

    _spend_section(doc, trials, out, unit)
    _ranks_section(doc, per_study, trials, out, unit, simulated)
    doc.heading("Anytime curves")
    for x in curves.X_AXES:
        _save(curves.plot_progress(trials, x, simulated, unit), out / f"progress_{x}")
        doc.figure(out / f"progress_{x}.png", f"Best val_bpb so far vs {curves.axis_name(x, unit)}: one thin line per "
                   f"seed, the seed mean thick with its 95% CI band ({stats.INTERVAL_METHODS['mean']}, pointwise).")
    _ttt_section(doc, per_study, trials, out, unit, simulated, target)
    _speedup_section(doc, studies, trials, out, simulated)
    _phases_section(doc, trials, out)
    _hardware_section(doc, trials, out)
    trials.to_csv(out / "trials.csv", index=False)
    return _write(doc, out)


def _write(doc: Document, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(doc.html())
    summary = out / "summary.md"
    summary.write_text(doc.markdown())
    return summary


def _clock_notes(studies: pd.DataFrame) -> list[str]:
    modes = set(studies["time_mode"])
    notes = []
    if "simulated" in modes:
        notes.append("**Time is SIMULATED** in studies with time_mode=simulated: study time, compute-hours and "
                     "speedups come from the simulated launcher's virtual clock (real training on this CPU, "
                     "virtual slots and time).")
    if len(modes) > 1:
        notes.append("WARNING: these studies mix real and simulated clocks; their times are not comparable.")
    return notes


def _studies_table(studies: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    counts = trials.groupby("study_id").size().rename("trials")
    ok = trials[trials["status"] == "ok"].groupby("study_id").size().rename("ok")
    best = trials.groupby("study_id")["val_bpb"].min().rename("best val_bpb")
    cols = ["study_id", "arm", "seed", "launcher", "slots", "time_mode"]
    table = studies[cols].join(counts, on="study_id").join(ok, on="study_id").join(best, on="study_id")
    table["trials"] = table["trials"].fillna(0).astype(int)  # a study killed in its first trial has none
    table["ok"] = table["ok"].fillna(0).astype(int)
    table["best val_bpb"] = table["best val_bpb"].map(lambda v: "no ok trial" if pd.isna(v) else f"{v:.4f}")
    return table.sort_values(["arm", "seed"])


def _budget_section(doc: Document, per_study: pd.DataFrame, notes: list[str], out: Path, unit: str) -> None:
    doc.heading("Compared at")
    budgets = per_study.attrs["budgets"]
    lines = []
    for i, b in enumerate(budgets):
        what = {"trials": "trials finished (a screening rung counts at its budget fraction)",
                "compute": f"charged {unit} (t_finished - t_started of each trial on the study clock)",
                "wall": "active study time (the study clock, idle gaps between sessions left out)"}[b.measure]
        lines.append(f"{'Headline' if i == 0 else 'Also'}: {b.title(unit)}, measured in {what}; value from {b.origin}. "
                     "Each study is credited with its own best among the trials finished at or before that point.")
    doc.items(lines)
    pd.DataFrame([{"measure": b.measure, "at": b.at, "title": b.title(unit), "origin": b.origin} for b in budgets]
                 ).to_csv(out / "budgets.csv", index=False)  # the headline first
    for line in notes:
        doc.note(line)
    for b in budgets:
        kept = budget.kept_by_arm(per_study, b)
        kept.to_csv(out / f"kept_{b.measure}.csv")
        doc.heading(f"Trials kept at {b.title(unit)}", 3)
        doc.table(kept)


def _claims_section(doc: Document, per_study: pd.DataFrame, out: Path, noise_floor: float | None, noise_note: str,
                    test: str, unit: str, unmatched_ok: bool = False) -> None:
    doc.heading("Claims")
    if per_study["arm"].nunique() < 2:
        doc.text("One arm only: nothing to compare.")
        return
    table = claims.claims(per_study, noise_floor=noise_floor, test=test, unit=unit, unmatched_ok=unmatched_ok)
    table.to_csv(out / "claims.csv", index=False)
    display = table[["budget", "claim"]].set_index("budget")
    tables.write_table(display, table.set_index("budget"), out / "claims", caption="Claims the data supports")
    floor = (f"noise floor σ = {noise_floor:.4f} ({noise_note})" if noise_floor is not None
             else "no measured noise floor (run python -m analysis.noise for this preset)")
    doc.text(f"Seed-matched one-sided {test} tests, Holm-corrected over all ordered pairs, alpha {stats.ALPHA}; "
             f"Δ = mean over seed pairs of (first - second) with a 95% CI ({stats.INTERVAL_METHODS['delta']}); {floor}. "
             "A pair is claimed only when significant, Δ points the same way, and |Δ| is at least the noise floor; "
             "a test and a Δ that disagree read 'conflicting evidence'; every other pair reads 'no difference "
             "detected'. n per arm and the missing seeds are named in every sentence.")
    if unmatched_ok:
        doc.note("--unmatched-seeds: arms run on different seeds are paired on the seeds both have.")
    doc.items(table["claim"].tolist(), table["supported"].tolist())


def _ci_section(doc: Document, per_study: pd.DataFrame, out: Path, unit: str, test: str = "wilcoxon",
                unmatched_ok: bool = False) -> None:
    doc.heading("Best val_bpb per arm with 95% CIs")
    for b in per_study.attrs["budgets"]:
        title = f"at {b.title(unit)}"
        values = per_study[["arm", "seed", b.column]].rename(columns={b.column: "value"})
        summary = stats.arm_summary(values)
        display = tables.ci_table(summary)
        stem = out / f"arms_{b.column}"
        tables.write_table(display, summary, stem, caption=f"Best val_bpb {title}, 95% CIs over seeds")
        doc.heading(title, 3)
        doc.table(display)
        if per_study["arm"].nunique() >= 2:
            pairs = stats.pairwise(values, test=test, unmatched_ok=unmatched_ok)
            pairs.to_csv(out / f"pairwise_{b.column}.csv", index=False)
            doc.table(_pairwise_display(pairs))
    m = stats.INTERVAL_METHODS
    doc.text(f"95% CIs: mean by {m['mean']}, median by {m['median']}, IQM by {m['iqm']}, Δ by {m['delta']} "
             "(their coverage at n = 5, 8, 16 is measured by benchmarks/intervals.py). n: seeds with a value; missing "
             "seeds: by number, without a result by the cut or without a study, never dropped silently. IQM: mean of "
             f"the middle half of the seeds. Pairs: Δ = mean(first - second) over seed pairs, p one-sided ({test}) for "
             "'first < second', Holm over all ordered pairs, r = matched-pairs rank-biserial effect size (Kerby; tied "
             "seeds left out), P(improve) = chance a random seed of the first beats one of the second.")


def _spend_section(doc: Document, trials: pd.DataFrame, out: Path, unit: str) -> None:
    numbers = spend.by_purpose(trials)
    display = pd.DataFrame(index=numbers.index)
    display[unit] = numbers["slot_hours"].map(lambda v: f"{v:.3g}")
    for col in [c for c in numbers.columns if c.endswith("_share")]:
        name = "no score" if col == "no_score_share" else col.removesuffix("_share")
        display[f"{name} %"] = numbers[col].map(lambda v: "-" if pd.isna(v) else f"{100 * v:.1f}")
    tables.write_table(display, numbers, out / "spend", caption=f"Where each arm's {unit} went, over all seeds")
    doc.heading("Where the compute went")
    doc.text(f"Each arm's {unit} over all its seeds, split by why a trial ran: search (a new candidate), screen "
             "(a rung shorter than the whole budget), baseline (noise seeds), confirm (the keep rule's paired "
             "re-runs), rerun (re-runs the agent asked for); no score: the share spent on trials that ended "
             "without one (crash, timeout, oom, cancelled, ...).")
    doc.table(display)


def _pairwise_display(pairs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "pair": pairs["a"] + " < " + pairs["b"] + "?",
        "pairs": pairs["n"],
        "n per arm": [f"{na} / {nb}" for na, nb in zip(pairs["n_a"], pairs["n_b"])],
        "missing seeds": [" / ".join(m or "-" for m in (ma, mb)) for ma, mb in zip(pairs["missing_a"], pairs["missing_b"])],
        "Δ [95% CI]": [f"{claims.signed(d)} [{claims.signed(lo)}, {claims.signed(hi)}]" if not math.isnan(lo)
                       else f"{claims.signed(d)} (n < 2: no CI)"
                       for d, lo, hi in zip(pairs["delta"], pairs["delta_lo"], pairs["delta_hi"])],
        f"p ({pairs['test'].iloc[0]})": pairs["p"].map(lambda p: f"{p:.3g}"),
        "p (Holm)": pairs["p_holm"].map(lambda p: f"{p:.3g}"),
        "r": pairs["effect_rank_biserial"].map(lambda r: f"{r:+.2f}"),
        "P(improve)": pairs["p_improvement"].map(lambda r: f"{r:.2f}"),
    }).set_index("pair")


def _ranks_section(doc: Document, per_study: pd.DataFrame, trials: pd.DataFrame, out: Path, unit: str,
                   simulated: bool) -> None:
    if per_study["arm"].nunique() < 2:
        return
    doc.heading("Ranks")
    headline = per_study.attrs["budgets"][0]
    axis = budget.AXIS[headline.measure]
    rank_curve = ranks.rank_over_time(trials, axis, until=headline.at * (3600.0 if axis == "wall" else 1.0))
    if not rank_curve.empty:
        _save(ranks.plot_rank_over_time(rank_curve, axis, unit, simulated), out / "rank_over_time")
        doc.figure(out / "rank_over_time.png", f"Average rank of each arm's best val_bpb so far vs "
                   f"{curves.axis_name(axis, unit)} up to the headline budget, over the {rank_curve['n_seeds'].iloc[0]} "
                   "seeds every arm has.")
    if per_study["arm"].nunique() < 3:
        doc.text("Friedman and Nemenyi need three or more arms.")
        return
    values = per_study[["arm", "seed", headline.column]].rename(columns={headline.column: "value"})
    try:
        f = stats.friedman_nemenyi(values)
    except ValueError as e:
        doc.text(f"No critical-difference diagram: {e}.")
        return
    _save(ranks.plot_cd_diagram(f, f"Best val_bpb at {headline.title(unit)}"), out / "critical_difference")
    doc.text(f"Friedman χ² = {f.statistic:.3g}, p = {f.p:.3g}, n = {f.n_blocks} seeds"
             + f.dropped_text
             + f"; Nemenyi critical difference {f.cd:.2f} ranks. Average ranks: "
             + ", ".join(f"{a} {r:.2f}" for a, r in sorted(f.avg_rank.items(), key=lambda kv: kv[1])) + ".")
    doc.figure(out / "critical_difference.png", "Critical-difference diagram (Demšar 2006): arms joined by a bar "
               "are not told apart at alpha 0.05.")


def _ttt_section(doc: Document, per_study: pd.DataFrame, trials: pd.DataFrame, out: Path, unit: str,
                 simulated: bool, target: float | None) -> None:
    target = ttt.common_target(per_study) if target is None else target
    doc.heading("Time to target")
    if math.isnan(target):
        doc.text("No study has an ok trial: no time to target.")
        return
    doc.text(f"Target val_bpb <= {target:.4f} (median of the studies' best unless --target says otherwise). "
             "ECDF over seeds: a seed that never reached the target is censored at its study's end and stays in n. "
             "Median: Kaplan-Meier (the first time half of the seeds are there; inf: fewer than half got there), "
             "95% CI by inverting the log-log band of the survival curve (Brookmeyer-Crowley).")
    for x in ("trials", "gpu_hours", "wall"):
        times = ttt.times_to_target(trials, target, x)
        times.to_csv(out / f"time_to_target_{x}.csv", index=False)
        table = ttt.ecdf_table(times)
        what = {"wall": "active study seconds", "gpu_hours": unit, "trials": "trials"}[x]
        doc.heading(f"vs {what}", 3)
        doc.table(table.rename(columns={"median_time": f"median ({what})", "median_lo": "95% CI lo",
                                        "median_hi": "95% CI hi"}).round(4))
        _save(ttt.plot_ecdf(times, target, x, unit, simulated), out / f"time_to_target_{x}")
        doc.figure(out / f"time_to_target_{x}.png", f"Share of seeds at or below {target:.4f} vs {what}; markers: "
                   "each seed's time.")


def _speedup_section(doc: Document, studies: pd.DataFrame, trials: pd.DataFrame, out: Path, simulated: bool) -> None:
    doc.heading("Speedup of parallel over sequential")
    pairs = speedup.pair_with_sequential(studies)
    if not pairs:
        doc.text("No study with more than one slot: nothing to compare.")
        return
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
    for col, name in (("speedup_measured", "(a)"), ("speedup_replayed", "(b)"), ("throughput_ratio_replayed", "(c)")):
        if col in per_pair:
            cis = per_pair.groupby("arm")[col].agg(lambda v: _ci_text(v.to_numpy(dtype=float)))
            display[f"{name} 95% CI (n)"] = cis
    tables.write_table(display, numbers, out / "speedups", caption="Parallel over sequential speedup at a common target")
    if simulated:
        doc.text("(on the SIMULATED clock)")
    doc.table(display)
    doc.text("Per parallel study, at the hardest target that it, its replay and its 1-slot twin (same searcher and "
             "seed) all reach, T(x) in active study time: (a) T_1slot(x)/T_parallel(x) measured against the real 1-slot "
             "study; (b) the same against the parallel study's own trials replayed end to end on one slot in submission "
             f"order; (c) the ratio of trials per active study hour. CIs of the mean over seeds: {stats.INTERVAL_METHODS['mean']}. Per pair: "
             "speedups_per_pair.csv.")
    fig = speedup.plot_speedups(plotted, simulated)
    if fig is None:
        doc.text("No data for a speedup figure: no pair reached a common target.")
        return
    _save(fig, out / "speedup")
    missing = "" if any(k == "measured" for *_, k, _c in plotted) else (
        " No 1-slot study of the same searcher and seed, so no panel (a).")
    doc.figure(out / "speedup.png", "Speedup vs target val_bpb, one line per seed." + missing)


def _ci_text(v: np.ndarray) -> str:
    finite = v[np.isfinite(v)]
    if len(finite) < 2:
        return f"- (n={len(finite)} of {len(v)})"
    lo, hi = stats.mean_ci(finite)
    return f"[{lo:.2f}, {hi:.2f}] (n={len(finite)} of {len(v)})"


def _phases_section(doc: Document, trials: pd.DataFrame, out: Path) -> None:
    """The improving trials of every study go to phases.csv; the report shows each arm's best seed."""
    all_phases = []
    for study_id, g in trials.groupby("study_id"):
        all_phases.append(phases.improvements(g).assign(study_id=study_id, arm=g["arm"].iloc[0]))
    table = pd.concat(all_phases, ignore_index=True)
    table.to_csv(out / "phases.csv", index=False)
    doc.heading("Phases: the trials that moved the best")
    if table.empty:
        doc.text("No ok trial in any study.")
        return
    for arm, g in table.groupby("arm"):
        best_study = g.loc[g["val_bpb"].idxmin(), "study_id"]
        shown = g[g["study_id"] == best_study][["t_finished", "trial_index", "val_bpb", "gain", "changes", "hypothesis"]]
        doc.heading(f"{arm}: study {best_study}", 3)
        doc.table(shown.set_index("t_finished").round(4))


def _hardware_section(doc: Document, trials: pd.DataFrame, out: Path) -> None:
    doc.heading("Hardware")
    if "source_sha" not in trials or trials["source_sha"].isna().all():
        doc.text("Trials carry no source_sha, so candidates cannot be matched across device kinds.")
        return
    diffs = hardware.kind_differences(trials)
    diffs.to_csv(out / "hardware.csv", index=False)
    if diffs.empty:
        doc.text("No candidate ran on more than one device kind.")
        return
    doc.text("val_bpb difference of the same train.py (by source_sha) on each kind against the reference kind:")
    doc.table(hardware.kind_summary(diffs).set_index("device_kind").round(4))


def log_to_mlflow(tracking_uri: str, experiment: str, studies: pd.DataFrame, out: Path) -> str:
    """The report folder on a comparison run of its own (tag arena.kind=comparison, which
    analysis.load never mistakes for a study) and on every compared study's parent run."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    tags = {"arena.kind": "comparison", "arena.studies": ",".join(sorted(studies["study_id"]))[:5000]}
    run = client.create_run(exp.experiment_id, tags=tags, run_name=f"comparison-{dt.datetime.now():%Y%m%d-%H%M%S}")
    client.log_artifacts(run.info.run_id, str(out), artifact_path="report")
    client.set_terminated(run.info.run_id)
    for run_id in studies["run_id"]:
        client.log_artifacts(run_id, str(out), artifact_path="report")
    return run.info.run_id


def _save(fig: plt.Figure, stem: Path) -> None:
    for ext in ("png", "pdf"):
        fig.savefig(stem.with_suffix(f".{ext}"), dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
