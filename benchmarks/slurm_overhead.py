"""What Slurm costs a trial, on the local cluster of scripts/slurm_up.sh.

1. Submit -> start: a submitit job whose body only reports the time it began, one at a time on an
   idle cluster: sbatch, scheduling, srun, Python start and unpickling on the node. Median of N.
2. Per-trial overhead: the same tiny trial (objective=tiny) through the local launcher and through
   the Slurm launcher, one at a time, timed from submit() to the result coming out of wait().

    eval "$(scripts/slurm_up.sh)" && python benchmarks/slurm_overhead.py [--jobs 5] [--trials 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launchers.local import LocalLauncher  # noqa: E402
from launchers.slurm import SlurmLauncher, _executor  # noqa: E402
from study.records import Candidate, Trial  # noqa: E402
from study.trialdir import write_trial_dir  # noqa: E402


def started_at() -> float:
    return time.time()


def submit_to_start(folder: Path, jobs: int) -> tuple[list[float], list[float]]:
    """Seconds from submit() to the job body running, and how long sbatch itself took."""
    executor = _executor(folder, None)  # the launcher's: sbatch without secrets in its environment
    executor.update_parameters(time=5, cpus_per_task=1, job_name="arena-bench")
    delays, sbatch = [], []
    for _ in range(jobs):
        t0 = time.time()
        job = executor.submit(started_at)
        sbatch.append(time.time() - t0)
        delays.append(job.result() - t0)
    return delays, sbatch


def tiny_trial(study_dir: Path, index: int) -> Trial:
    from omegaconf import OmegaConf

    from study.runner import check_objective, prepare_data
    from train.contract import TRAIN_FILE
    from train.knobs import write_knobs

    conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "objective" / "tiny.yaml"), resolve=True)
    source = write_knobs((ROOT / "train" / TRAIN_FILE).read_text(), conf["knobs"])
    objective = check_objective(conf)
    if index == 0:
        prepare_data(objective)
    trial = Trial(trial_id=f"t{index:04d}", index=index, candidate=Candidate(source=source), objective=objective)
    trial.directory = str(write_trial_dir(study_dir / "trials" / trial.trial_id, trial))
    return trial


def trial_wall(launcher, study_dir: Path, trials: int, first_index: int) -> list[float]:
    """Walls of `trials` tiny trials run one after the other; for Slurm, also waits for the last
    job to leave the queue, so the temporary folder outlives it."""
    walls, jobs = [], []
    slot = launcher.slots()[0]
    for i in range(first_index, first_index + trials):
        trial = tiny_trial(study_dir, i)
        t0 = time.time()
        launcher.submit(trial, slot)
        done = []
        while not done:
            done = launcher.wait(1.0)
        walls.append(time.time() - t0)
        result = done[0][1]
        if result.status != "ok":
            raise SystemExit(f"{launcher.name}: trial {trial.trial_id} ended {result.status}: {result.reason}")
        jobs += [result.extra["slurm_job_id"]] if "slurm_job_id" in result.extra else []
    while jobs and subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True, text=True).stdout.strip():
        time.sleep(0.5)
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5, help="jobs for submit -> start")
    parser.add_argument("--trials", type=int, default=3, help="tiny trials per launcher")
    args = parser.parse_args()
    if not shutil.which("sbatch"):
        raise SystemExit('no Slurm here: scripts/install_slurm.sh, then eval "$(scripts/slurm_up.sh)"')
    with tempfile.TemporaryDirectory(prefix="arena-slurm-bench-") as tmp:
        tmp = Path(tmp)
        delays, sbatch = submit_to_start(tmp / "submitit", args.jobs)
        print(f"submit -> start (submitit job body running), median of {args.jobs}: "
              f"{statistics.median(delays):.2f} s  (min {min(delays):.2f}, max {max(delays):.2f}); "
              f"sbatch call {statistics.median(sbatch) * 1000:.0f} ms")

        # One core per slot, like cpus_per_trial=1; cold, since a Slurm job starts the harness cold.
        local = LocalLauncher(slots=2, gpus="none", warm=False)
        local.start()
        slurm = SlurmLauncher(slots=1, cpus_per_trial=1, hard_limit_s=60, folder=str(tmp / "study" / "slurm"),
                              job_name="arena-bench")
        slurm.start()
        local_walls = trial_wall(local, tmp / "study", args.trials, 0)
        slurm_walls = trial_wall(slurm, tmp / "study", args.trials, args.trials)
        lm, sm = statistics.median(local_walls), statistics.median(slurm_walls)
        print(f"tiny trial, submit -> result collected, median of {args.trials}: local {lm:.2f} s, "
              f"slurm {sm:.2f} s  -> Slurm adds {sm - lm:.2f} s per trial")
        print("  local:", " ".join(f"{w:.2f}" for w in local_walls), "| slurm:", " ".join(f"{w:.2f}" for w in slurm_walls))


if __name__ == "__main__":
    main()
