"""How long the README's main job (`python run.py`, the embedded cpu default) takes on this machine,
and what it found. Prints figures; asserts nothing.

    python benchmarks/first_run.py [--out DIR] [extra run.py overrides...]

The study and its MLflow store and artifacts go to a fresh folder, so the project's own `studies/`
and `mlflow.db` are untouched (Hydra writes nothing of its own). The time is the study's alone:
`scripts/setup.sh` and a first run's corpus download and token caches are not in it. The load average before the start is printed beside the
time: on a shared machine the minutes grow with the load, the scores (a steps budget) do not.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from study.journal import JournalState  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="where the study goes (default: a new temporary folder)")
    p.add_argument("overrides", nargs="*", help="extra run.py overrides, e.g. study.max_trials=4")
    args = p.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="arena-first-run-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    cmd = [sys.executable, str(ROOT / "run.py"), f"study.dir={out}/study", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
           "progress=false", *args.overrides]
    started = time.time()
    proc = subprocess.run(cmd, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - started
    (out / "run.log").write_text(proc.stdout)
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        raise SystemExit(f"run.py exited {proc.returncode} after {wall:.0f} s (log: {out / 'run.log'})")

    finished = JournalState.load(out / "study" / "journal.jsonl").finished()
    ok = [(t, r) for t, r in finished if r.status == "ok"]
    train_s = sorted(r.training_seconds for _, r in ok if r.training_seconds is not None)
    total_s = sorted(r.total_seconds for _, r in ok if r.total_seconds is not None)
    best_trial, best = min(ok, key=lambda tr: tr[1].val_bpb) if ok else (None, None)
    baseline = next((r for t, r in ok if t.index == 0), None)
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} before the start")
    print(f"python run.py: {wall:.0f} s ({wall / 60:.1f} min) from the command to its exit")
    print(f"trials: {len(ok)} of {len(finished)} ok")
    if train_s:
        print(f"per trial: {train_s[0]:.1f}-{train_s[-1]:.1f} s of training, {total_s[0]:.1f}-{total_s[-1]:.1f} s in all "
              f"(the rest is start-up and the sandboxed evaluation)")
    if baseline is not None:
        print(f"baseline val_bpb {baseline.val_bpb!r}")
    if best is not None:
        print(f"best: {best_trial.trial_id} val_bpb {best.val_bpb:.4f}")
    print(f"study: {out / 'study'}")


if __name__ == "__main__":
    main()
