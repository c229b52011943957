"""TPE with successive-halving rungs against TPE without, on the simulated launcher: time and
GPU-hours to a common target, with the analysis module's statistics. Prints figures; asserts
nothing.

    python benchmarks/rungs.py                          # tiny-based objective, 3 seeds, ~15 min here
    python benchmarks/rungs.py --preset cpu --max-hours 0.5 --seeds 0 1 2    # the cpu preset (hours)

Each study is `run.py` with `launcher=simulated` (8 virtual slots, real training one or two at a
time) and a stop at `--max-hours` on the virtual clock, so both arms get the same wall-clock and
the same slot-hours. `--seconds-per-step` makes the virtual clock charge budget, not this CPU's
start-up cost: a run's virtual time is its real start-up and evaluation plus its steps at that
rate, as on a GPU where training dominates. Shorter rungs then cost what their budget costs.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_study(out: Path, arm: str, seed: int, args) -> float:
    overrides = [
        f"objective={args.preset}", "launcher=simulated", f"launcher.slots={args.slots}",
        f"launcher.real_workers={args.real_workers}", f"launcher.seconds_per_budget_unit={args.seconds_per_step}",
        "searcher=tpe", f"seed={seed}", f"study.max_hours={args.max_hours}", "study.max_trials=1000",
        f"study.name={arm}-s{seed}", f"study.dir={out}/studies/{arm}-s{seed}", "progress=false",
        f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", f"hydra.run.dir={out}/outputs/{arm}-s{seed}",
        *args.objective,
    ]
    if arm.endswith("rungs"):
        overrides += [f"study.rungs=[{','.join(str(r) for r in args.rungs)}]", f"study.eta={args.eta}"]
    started = time.time()
    subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], cwd=out, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/rungs"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--objective", nargs="*", default=["objective.budget=32"],
                   help="extra objective overrides (default: the tiny preset at 32 steps)")
    p.add_argument("--seconds-per-step", type=float, default=3.75, help="virtual seconds per step (32 steps = 120 s)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--real-workers", type=int, default=2)
    p.add_argument("--max-hours", type=float, default=0.08)
    p.add_argument("--rungs", type=float, nargs="+", default=[1 / 3, 1.0])
    p.add_argument("--eta", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--analyse-only", action="store_true", help="only read the studies already in --out")
    args = p.parse_args()
    args.rungs = [round(r, 4) for r in args.rungs]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    took = {(arm, seed): math.nan for seed in args.seeds for arm in ("tpe", "tpe-rungs")}
    for arm, seed in [] if args.analyse_only else list(took):
        took[(arm, seed)] = run_study(out, arm, seed, args)
        print(f"{arm} seed {seed}: {took[(arm, seed)]:.0f} s real", flush=True)

    from analysis import stats
    from analysis.load import load
    from analysis.ttt import times_to_target

    studies, trials = load(f"sqlite:///{out}/mlflow.db", "autoresearch-arena")
    studies = studies[studies["run_name"].isin([f"{a}-s{s}" for a, s in took])]
    trials = trials[trials["study_id"].isin(studies["study_id"])]
    finals = trials.groupby("study_id")["val_bpb"].min()
    target = float(finals.max())  # the hardest target every study reached
    print(f"\ncommon target: val_bpb <= {target:.4f} (the worst study's final best, so every seed reaches it)")
    rows = {}
    for x in ("wall", "gpu_hours"):
        t = times_to_target(trials, target, x)
        rows[x] = t
    print(f"{'arm':<14}{'seed':>5}{'final best':>12}{'to target (virtual s)':>24}{'GPU-h to target':>17}"
          f"{'trials':>8}{'full runs':>11}{'real s':>8}")
    for _, s in studies.sort_values(["searcher", "seed"]).iterrows():
        sid = s["study_id"]
        g = trials[trials["study_id"] == sid]
        wall = rows["wall"].set_index("study_id").loc[sid, "time"]
        gpuh = rows["gpu_hours"].set_index("study_id").loc[sid, "time"]
        full = int(g["val_bpb"].notna().sum())
        arm = s["run_name"].rsplit("-s", 1)[0]
        print(f"{arm:<14}{s['seed']:>5}{finals[sid]:>12.4f}{wall:>24.0f}{gpuh:>17.3f}{len(g):>8}{full:>11}"
              f"{took[(arm, s['seed'])]:>8.0f}")
    for x, label in (("wall", "virtual s"), ("gpu_hours", "GPU-h")):
        t = rows[x].merge(studies[["study_id", "run_name"]], on="study_id").sort_values("seed")  # paired by seed
        t["arm"] = t["run_name"].str.rsplit("-s", n=1).str[0]
        a = t[t["arm"] == "tpe-rungs"]["time"].to_numpy()
        b = t[t["arm"] == "tpe"]["time"].to_numpy()
        p_less = stats.permutation_less(a, b) if all(map(math.isfinite, [*a, *b])) else math.nan
        print(f"time to target ({label}): rungs mean {a.mean():.3g} vs plain {b.mean():.3g}; "
              f"ratio {a.mean() / b.mean():.2f}; P(rungs faster) one-sided permutation p = {p_less:.3f}; "
              f"P(a rungs seed beats a plain seed) {stats.probability_of_improvement(a, b):.2f}")
    stop = args.max_hours * 3600  # trials in flight at the stop may finish later: count only what was known then
    by_stop = trials[trials["t_finished"] <= stop].groupby("study_id")["val_bpb"].min()
    for arm, pick in (("rungs", True), ("plain", False)):
        ids = studies[studies["run_name"].str.startswith("tpe-rungs") == pick]["study_id"]
        print(f"best val_bpb known at the stop ({stop:.0f} virtual s), {arm}: "
              + ", ".join(f"{by_stop.get(i, math.nan):.4f}" for i in ids) + f" (mean {by_stop.reindex(ids).mean():.4f})")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    for _, s in studies[studies["run_name"].str.startswith("tpe-rungs")].sort_values("seed").iterrows():
        m = client.get_run(s["run_id"]).data
        print(f"rank fidelity {s['run_name']}: Kendall tau rung 0 -> 1 = {m.metrics.get('rank_tau_r0_r1', math.nan):.2f} "
              f"over {m.metrics.get('rank_pairs_r0_r1', 0):.0f} candidates ({m.tags.get('rank_fidelity')})")
    print(f"total real time: {sum(took.values()) / 60:.1f} min for {len(took)} studies")


if __name__ == "__main__":
    main()
