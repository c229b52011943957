"""Chaos: kill -9 a tiny study's orchestrator at random moments, resume it, and audit what is left.

    python benchmarks/chaos.py [--kills 4] [--trials 6] [--steps 40] [--searchers tpe,random,grid,greedy,claude]

For each searcher, the study is started, killed with SIGKILL at a random moment, started again, and
so on `--kills` times; then it runs to the end. One kill in three lands during start-up (1-8 s in),
the others 0-8 s after a trial of this run started training, when trials are in flight. The
Claude searcher talks to the scripted Messages API of tests/fake_anthropic.py, never the network. The audit reads the journal, the trial folders, /proc and MLflow:

  resumes     starts that found a journal; adopted: trials picked up still running or finished;
              reruns: trials run again (in flight and dead, or cancelled)
  finished    measured trials (the study asked for --trials)
  dup         trial ids measured more than once
  lost        trial ids submitted but never measured
  orphans     trial processes still alive after the study ended
  attempts    trial folders (a re-run of an unmeasured trial gets its own)
  distinct    distinct (train.py, seed) pairs among the measured trials (an agent's baseline runs
              under several seeds on purpose)
  mlflow      child runs / parent runs, and whether the children are exactly the measured ids
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.contract import LOG_FILE  # noqa: E402 - after the path that makes it importable from anywhere


def child(workdir: Path, searcher_name: str, trials: int, steps: int) -> None:
    """One orchestrator run, as `python run.py` would do it (with the fake API for claude)."""
    import logging

    from hydra import compose, initialize_config_dir

    from study.runner import ConfigError, run_study

    logging.basicConfig(level=logging.WARNING)
    overrides = [f"searcher={searcher_name}", "objective=tiny", f"objective.budget={steps}",
                 "objective.hard_limit_s=900", "progress=false", "launcher.slots=2",
                 f"study.max_trials={trials}", f"study.dir={workdir}/study",
                 f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db"]
    searcher = None
    if searcher_name == "claude":
        overrides += ["~space", "searcher.confirm_seeds=0"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if searcher_name == "claude":
        from hydra.utils import instantiate

        from tests.fake_anthropic import FakeMessagesAPI, KnobAgent

        os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-chaos-fake-key")
        api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", []))
        searcher = instantiate(cfg.searcher, http_client=api.client(), max_retries=1, _convert_="all")
    try:
        run_study(cfg, searcher=searcher)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def chaos(workdir: Path, searcher: str, trials: int, steps: int, kills: int, rng: random.Random) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--child", str(workdir), searcher, str(trials), str(steps)]
    delivered = 0
    for k in range(kills):
        logs = _trial_logs(workdir)
        proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if k % 3 == 0:
            time.sleep(rng.uniform(1, 8))
        else:  # wait for a trial of this run to start (a new run.log)
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline and _trial_logs(workdir) <= logs:
                time.sleep(0.2)
            time.sleep(rng.uniform(0, 8))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            delivered += 1
        proc.wait()
    started = time.time()
    final = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    audit_row = audit(workdir)
    audit_row.update(searcher=searcher, kills=delivered, exit=final.returncode,
                     last_run_s=round(time.time() - started, 1))
    if final.returncode != 0:
        audit_row["error"] = final.stderr.strip().splitlines()[-1:] or ["?"]
    return audit_row


def _trial_logs(workdir: Path) -> set[Path]:
    return set((workdir / "study" / "trials").glob(f"*/{LOG_FILE}"))


def audit(workdir: Path) -> dict:
    from study.journal import Journal, JournalState

    study = workdir / "study"
    path = study / "journal.jsonl"
    js = JournalState.load(path)
    events = Journal.read(path)
    measured_events = Counter(e["trial_id"] for e in events if e["event"] == "finished"
                              and (e["result"]["status"] not in ("cancelled", "lost") or e.get("final")))
    submitted = {t for t in js.trials}
    time.sleep(1.0)
    return {
        "finished": len(js.results),
        "resumes": sum(e["event"] == "resumed" for e in events),
        "adopted": sum(e["event"] == "adopted" for e in events),
        "reruns": sum(e["event"] == "resubmitted" for e in events),
        "dup": sum(n > 1 for n in measured_events.values()),
        "lost": len(submitted - set(js.results)),
        "orphans": len(orphans(study)),
        "attempts": len([p for p in (study / "trials").iterdir() if p.is_dir()]),
        "distinct": len({(t.candidate.source, t.seed) for t, _ in js.finished()}),
        "mlflow": mlflow_audit(workdir, set(js.results)),
    }


def orphans(study: Path) -> list[int]:
    """Processes whose working directory is inside the study: a trial nobody watches any more."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(study) in os.readlink(proc / "cwd"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def mlflow_audit(workdir: Path, measured: set[str]) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("autoresearch-arena")
    runs = client.search_runs([exp.experiment_id], max_results=10000) if exp else []
    parents = [r for r in runs if r.data.tags.get("arena.kind") == "study"]
    children = Counter(r.data.tags.get("arena.trial_id") for r in runs if r.data.tags.get("arena.kind") == "trial")
    exact = set(children) == measured and all(n == 1 for n in children.values())
    return f"{sum(children.values())}/{len(parents)} {'= journal' if exact else '!= journal'}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40, help="tiny preset's budget: long enough to be killed mid-trial")
    parser.add_argument("--searchers", default="tpe,random,grid,greedy,claude")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="folder to keep the studies in (default: a temporary one)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(args.keep or tempfile.mkdtemp(prefix="arena-chaos-"))
    rows = [chaos(base / s, s, args.trials, args.steps, args.kills, rng) for s in args.searchers.split(",")]
    columns = ("searcher", "kills", "resumes", "adopted", "reruns", "exit", "finished", "dup", "lost", "orphans",
               "attempts", "distinct", "mlflow", "last_run_s")
    widths = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(str(r.get(c)).ljust(widths[c]) for c in columns))
        if "error" in r:
            print(f"  {r['searcher']}: {r['error']}")
    print(f"studies in {base}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
