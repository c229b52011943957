"""SkyPilot's parallel-vs-sequential experiment in miniature, on this CPU, in one command.

    python scripts/reproduce_speedup.py                 # default size: ~15-25 min on 2 cores
    python scripts/reproduce_speedup.py --trials 48 --seeds 5 --budget 100

Runs, on the simulated launcher (real training, virtual clock), the same searcher on `--slots`
virtual slots and on 1, and the compared searchers on `--slots`, each for every seed; then writes
the report (analysis.report) with all three speedup figures and the searcher table. Every trial
is real training of the tiny objective for `--budget` steps, and each step is charged
`--virtual-trial-s / --budget` virtual seconds on the clock, so a trial "takes" about as long
as an autoresearch run on a GPU. Studies are resumable: re-running the command finishes what is
missing and re-runs no trial.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plan(args) -> list[tuple[str, str, int, int]]:
    """(study name, searcher, slots, seed): the speedup pair and the searcher comparison."""
    arms = [(args.searcher, args.slots), (args.searcher, 1)]
    arms += [(s, args.slots) for s in args.compare if s != args.searcher]
    return [(f"{args.experiment}-{s}-x{n}-s{seed}", s, n, seed) for s, n in arms for seed in range(args.seeds)]


def study_command(args, name: str, searcher: str, slots: int, seed: int) -> list[str]:
    return [
        sys.executable, str(ROOT / "run.py"),
        f"searcher={searcher}", "launcher=simulated", f"launcher.slots={slots}",
        f"launcher.real_workers={args.real_workers}",
        # more real workers only help if the clock may run ahead of trials still running for real
        f"launcher.assume_full_budget={args.real_workers > 1}",
        f"launcher.seconds_per_budget_unit={args.virtual_trial_s / args.budget}",
        f"objective={args.objective}", f"objective.budget={args.budget}", f"seed={seed}",
        f"study.name={name}", f"study.experiment={args.experiment}", f"study.dir={args.workdir}/{name}",
        f"study.max_trials={args.trials}", f"mlflow.tracking_uri={args.tracking_uri}", "progress=false",
        f"hydra.run.dir={args.workdir}/{name}/hydra",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--searcher", default="tpe", help="the searcher run on --slots and on 1 slot")
    p.add_argument("--compare", default="tpe,greedy,grid", type=lambda s: s.split(","),
                   help="searchers compared on --slots (comma-separated)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--trials", type=int, default=24, help="trials per study")
    p.add_argument("--budget", type=int, default=40, help="training steps per trial (real)")
    p.add_argument("--virtual-trial-s", type=float, default=300.0, help="virtual seconds a full budget takes")
    p.add_argument("--objective", default="tiny")
    p.add_argument("--real-workers", type=int, default=1,
                   help="trials really running at once (>1 sets launcher.assume_full_budget=true)")
    p.add_argument("--experiment", default="reproduce-speedup")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--workdir", default="studies/reproduce-speedup")
    p.add_argument("--out", default="reports/reproduce-speedup")
    args = p.parse_args(argv)
    for flag in ("slots", "seeds", "trials", "budget", "real_workers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.slots < 2:
        p.error("--slots must be >= 2: the point is parallel against 1 slot")

    studies = plan(args)
    started = time.time()
    for i, (name, searcher, slots, seed) in enumerate(studies, 1):
        t0 = time.time()
        proc = subprocess.run(study_command(args, name, searcher, slots, seed), cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"study {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        print(f"[{i}/{len(studies)}] {name}: {time.time() - t0:.0f} s (total {(time.time() - started) / 60:.1f} min)",
              flush=True)

    names = [name for name, *_ in studies]
    code = subprocess.run([sys.executable, "-m", "analysis.report", "--tracking-uri", args.tracking_uri,
                           "--experiment", args.experiment, "--studies", *names, "--out", args.out],
                          cwd=ROOT).returncode
    out = ROOT / args.out
    print(f"\n{len(studies)} studies x {args.trials} trials in {(time.time() - started) / 60:.1f} min (real)")
    for table in ("speedups.md", "searchers.md"):
        if (out / table).exists():
            print(f"\n{table}:\n{(out / table).read_text()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
