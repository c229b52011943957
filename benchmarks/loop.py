"""How much of the hardware the loop wastes.

1. Scheduler overhead per trial: N slots of instant fake trials, so only the loop's own work
   (journal, bookkeeping, trial directories, ask/tell) is timed. Goal < 1 ms at 10,000 slots.
   Each size runs --repeats times and prints the median and the range of both wall time and the
   process's CPU time, with the load average: on a shared machine the wall figure mostly measures
   the neighbours (it spread 0.66-2.9 ms over five runs at load 0-1), while CPU time measures the
   loop itself.
2. Idle gap of a slot between a trial ending and the next starting, and the share of slot-time
   spent in counted training, from a real study run with `python run.py` on this CPU. Goals:
   median gap <= 0.5 s; >= 90 % of slot-time in training at a 30 s budget (run with --minutes 10).

    python benchmarks/loop.py                      # overhead + a short real study (tiny preset)
    python benchmarks/loop.py --real cpu --minutes 10   # the 10-minute study at the cpu preset
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from study.core import SearchContext  # noqa: E402
from study.journal import JournalState  # noqa: E402
from study.loop import StopRules, StudyLoop  # noqa: E402
from tests.fakes import InstantLauncher, ListSearcher  # noqa: E402


def scheduler_overhead(slots: int = 1000, trials: int = 10000) -> tuple[float, float]:
    """(wall, CPU) seconds per trial of one study of `trials` instant trials on `slots` slots."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = SearchContext(baseline_source="X = 0\n", baseline_knobs={"X": 0}, space={}, seed=0,
                            study_dir=tmp, objective={"hard_limit_s": 10})
        loop = StudyLoop(searcher=ListSearcher(limit=trials), launcher=InstantLauncher(slots), ctx=ctx,
                         objective={"hard_limit_s": 10}, study_dir=Path(tmp), seed=0,
                         rules=StopRules(max_trials=trials))
        start, cpu = time.perf_counter(), time.process_time()
        state = loop.run({"study_id": "bench"})
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert len(state.history) == trials
    return elapsed / trials, cpu / trials


def spread(values: list[float]) -> str:
    """`median [min-max]` in ms."""
    ms = [v * 1e3 for v in values]
    return f"{statistics.median(ms):.3f} ms [{min(ms):.3f}-{max(ms):.3f}]"


def report_overhead(sizes: list[int], repeats: int) -> None:
    for slots in sizes:
        trials = max(10000, 2 * slots)
        load = os.getloadavg()[0]
        runs = [scheduler_overhead(slots, trials) for _ in range(repeats)]
        print(f"scheduler overhead at {slots:,} slots ({trials:,} instant trials, {repeats} runs, load "
              f"{load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): wall {spread([w for w, _ in runs])}, "
              f"CPU {spread([c for _, c in runs])} per trial")


def real_study(preset: str, minutes: float, slots: int, warm: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"objective={preset}", "progress=false", f"launcher.slots={slots}", "searcher=random",
                     f"launcher.warm={str(warm).lower()}",
                     f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={tmp}/out"]
        if preset == "cpu":
            overrides += ["objective.budget_kind=seconds", "objective.budget=30", "objective.hard_limit_s=120",
                          f"study.max_hours={minutes / 60}", "study.max_trials=1000", "study.on_stop=finish"]
        else:
            overrides += ["study.max_trials=12"]
        start = time.time()
        subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.time() - start
        js = JournalState.load(next(Path(tmp, "studies").iterdir()) / "journal.jsonl")
        origin = js.header["clock_origin"]
        per_slot = defaultdict(list)
        for trial, result in js.finished():
            per_slot[trial.slot].append((trial.submitted_at, result.finished_at - origin, result))
        gaps = []
        for runs in per_slot.values():
            runs.sort(key=lambda r: r[0])
            gaps += [nxt[0] - prev[1] for prev, nxt in zip(runs, runs[1:])]
        first = min(t.submitted_at for t in js.trials.values())
        last = max(r.finished_at - origin for r in js.results.values())
        slot_time = len(per_slot) * (last - first)
        training = sum(r.training_seconds or 0 for r in js.results.values())
        overhead = [r.total_seconds - r.training_seconds for r in js.results.values()
                    if r.total_seconds and r.training_seconds]
        print(f"real study ({preset}, {len(per_slot)} {'warm' if warm else 'cold'} slots, {len(js.results)} trials, "
              f"{wall:.0f} s wall):")
        print(f"  slot idle gap between trials: median {statistics.median(gaps):.3f} s, max {max(gaps):.3f} s")
        print(f"  harness fixed overhead per trial (total - training): median {statistics.median(overhead):.2f} s")
        print(f"  share of slot-time in counted training: {training / slot_time * 100:.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", default="tiny", choices=["tiny", "cpu", "none"])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="launcher.warm=false: a fresh interpreter per trial")
    ap.add_argument("--skip-overhead", action="store_true", help="only the real study")
    ap.add_argument("--overhead-slots", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeats", type=int, default=3, help="runs per size, for the spread")
    args = ap.parse_args()
    if not args.skip_overhead:
        report_overhead(args.overhead_slots, args.repeats)
    if args.real != "none":
        real_study(args.real, args.minutes, args.slots, warm=not args.cold)


if __name__ == "__main__":
    main()
