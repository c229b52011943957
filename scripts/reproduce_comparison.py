"""Reproduce a searcher comparison on this CPU, from nothing to the claims table.

    python scripts/reproduce_comparison.py            # the searchers protocol, cpu preset, n = 8 seeds
    python scripts/reproduce_comparison.py --quick    # tiny preset, random/grid/greedy, 3 trials each

Runs `python run.py +experiment=searchers` (one Hydra multirun: every searcher x seed is a study of
its own, resumable: the same command with the same --workdir picks up where it stopped), then
`python -m analysis.report` on its MLflow experiment, and prints the claims and the wall time.
Searchers: tpe random cmaes grid greedy, plus claude and hybrid (which asks Claude for part of its
trials) when ANTHROPIC_API_KEY is set (full mode only).

Trials run on one warm local CPU slot by default; --launcher simulated gives a virtual clock at a
fixed cost per step, at the price of a fresh interpreter per trial. Either way the objective is a
steps budget over cost-neutral knobs, so the report compares every study at equal trials (the
study.max_trials this script names), which the machine's load cannot move.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
FULL = {"preset": "cpu", "searchers": ["tpe", "random", "cmaes", "grid", "greedy"], "trials": 24, "seeds": 8}
# tiny preset (it explores the cpu space: cost-neutral knobs), with a hard limit a loaded machine
# does not trip. No TPE: for its first 8 trials it samples exactly what random does.
QUICK = {"preset": "tiny", "searchers": ["random", "grid", "greedy"], "trials": 3, "seeds": 8,
         "extra": ["objective.hard_limit_s=300"]}


def searchers_for(mode: dict, quick: bool, requested: list[str] | None) -> list[str]:
    if requested:
        return requested
    names = list(mode["searchers"])
    if not quick and os.environ.get("ANTHROPIC_API_KEY"):
        names += [n for n in ("claude", "hybrid") if (ROOT / "conf" / "searcher" / f"{n}.yaml").is_file()]
    return names


def run(cmd: list[str], cwd: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd)
    if proc.returncode != 0:
        sys.exit(f"error: {cmd[1]} exited {proc.returncode}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, random/grid/greedy x 8 seeds x 3 trials")
    p.add_argument("--workdir", type=Path, help="studies, MLflow store and report (default reports/reproduce-quick or -full)")
    p.add_argument("--searchers", nargs="*", help="override the searchers compared")
    p.add_argument("--seeds", type=int, help="seeds per searcher (default 8)")
    p.add_argument("--trials", type=int, help="trials per study")
    p.add_argument("--launcher", choices=("local", "simulated"), default="local")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    seeds, trials = args.seeds or mode["seeds"], args.trials or mode["trials"]
    names = searchers_for(mode, args.quick, args.searchers)
    workdir = (args.workdir or ROOT / "reports" / f"reproduce-{'quick' if args.quick else 'full'}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    experiment = f"arena-searchers-{mode['preset']}"
    launcher = (["launcher=local", "launcher.slots=1"] if args.launcher == "local"
                else ["launcher=simulated", "launcher.slots=1", "launcher.seconds_per_budget_unit=1.0"])
    extra = list(mode.get("extra", []))
    started = time.time()
    run([sys.executable, str(ROOT / "run.py"), "-m", "+experiment=searchers", f"objective={mode['preset']}", *launcher,
         f"searcher={','.join(names)}", f"seed=range({seeds})",
         f"study.max_trials={trials}", f"mlflow.tracking_uri={uri}", f"hydra.sweep.dir={workdir / 'multirun'}",
         *extra], cwd=workdir)
    studies_done = time.time()
    run([sys.executable, "-m", "analysis.report", "--tracking-uri", uri, "--experiment", experiment,
         "--out", str(workdir / "report")], cwd=ROOT)
    wall = time.time() - started
    claims = pd.read_csv(workdir / "report" / "claims.csv")
    headline = pd.read_csv(workdir / "report" / "budgets.csv").iloc[0]
    arms = pd.read_csv(workdir / "report" / f"arms_best_at_{headline['measure']}.csv", index_col=0)
    kept = pd.read_csv(workdir / "report" / f"kept_{headline['measure']}.csv", index_col=0)
    print(f"\n{len(names)} searchers x {seeds} seeds x {trials} trials, objective preset {mode['preset']}, "
          f"launcher {args.launcher}")
    print(f"\nCompared at {headline['title']} ({headline['origin']}); trials kept per arm:")
    print(kept.to_string())
    print(f"\nBest val_bpb at {headline['title']} (95% CIs over seeds: t interval of the mean):")
    print(arms[["n", "missing_seeds", "mean", "mean_lo", "mean_hi", "median", "iqm"]].fillna({"missing_seeds": "-"}).round(4).to_string())
    print("\nClaims:")
    for line in claims["claim"]:
        print(f"- {line}")
    print(f"\nwall time: {wall / 60:.1f} min (studies {(studies_done - started) / 60:.1f} min); "
          f"report: {workdir / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
