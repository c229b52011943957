"""What the trusted scorer and the sandbox cost per trial on this machine, for the tiny and cpu presets.

    python benchmarks/trusted_scorer.py [--presets tiny cpu] [--threads 1] [--repeat 3]

Runs the baseline train.py of each preset through the real harness, on a warm `--serve` slot (how the
local launcher runs CPU trials: torch imported and the export path warmed once per slot) and cold
(`python -m train.harness`, as Slurm runs it), and prints from each result and run.log: the time from
handing the trial over to its result, and in it the start (data checks, worker fork, sandbox entry),
the training, the hand-over (train() returning and the export of the model), the evaluation (one
trusted pass: real rows, seam probes, prefix runs) and the rest (checking the program, signing);
the evaluation's share of the trial; and the CPU of the trusted side (everything but the worker's
training) beside the worker's, both from the kernel. On a shared machine these move with the load:
the load average is printed with them; run it on an idle one for figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from study.runner import check_objective  # noqa: E402
from train.contract import LOG_FILE, RESULT_FILE, TRAIN_FILE, TRIAL_FILE  # noqa: E402
from train.knobs import write_knobs  # noqa: E402


def prepared(preset: str, threads: int) -> tuple[dict, dict, dict]:
    conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "objective" / f"{preset}.yaml"), resolve=True)
    knobs = conf.pop("knobs") or {}
    conf = check_objective(conf)  # as a study would: the derived hard limit, the sandbox level
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ARENA_CACHE": conf["cache_dir"], "OMP_NUM_THREADS": str(threads),
           "ARENA_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "train.prepare", "--corpus", conf["corpus"], "--vocab-size",
                    str(conf["vocab_size"])], env=env, check=True, capture_output=True)
    return conf, knobs, env


def trial_folder(root: Path, name: str, conf: dict, knobs: dict) -> Path:
    trial = root / "trials" / name
    trial.mkdir(parents=True)
    (trial / TRAIN_FILE).write_text(write_knobs((ROOT / "train" / TRAIN_FILE).read_text(), knobs))
    (trial / TRIAL_FILE).write_text(json.dumps({"trial_id": name, "seed": 0, "objective": conf}))
    return trial


def figures(trial: Path, wall: float) -> dict:
    result = json.loads((trial / RESULT_FILE).read_text())
    log = (trial / LOG_FILE).read_text()
    if result["status"] != "ok":
        sys.exit(f"{trial.name}: {result['status']}: {result['error']}\n{log[-2000:]}")
    ready = float(re.search(r"worker ready to start ([\d.]+) s", log).group(1))
    return {**result, "wall": wall, "ready": ready}


def run_cold(trial: Path, env: dict) -> dict:
    started = time.time()
    subprocess.run([sys.executable, "-P", "-m", "train.harness", str(trial)], env=env, cwd=trial, check=True,
                   capture_output=True)
    return figures(trial, time.time() - started)


class WarmSlot:
    """A `--serve` harness, as the local launcher keeps one per CPU slot."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "train.harness", "--serve"], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, trial: Path) -> dict:
        started = time.time()
        self.proc.stdin.write(f"{trial}\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        while Path(f"/proc/{pid}").exists() or not (trial / RESULT_FILE).exists():
            time.sleep(0.005)
        return figures(trial, time.time() - started)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def report(label: str, runs: list[dict]) -> None:
    def med(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    wall, train, evaluation, ready = med("wall"), med("training_seconds"), med("eval_seconds"), med("ready")
    handover = med("handover_seconds")
    rest = wall - ready - train - handover - evaluation
    r = runs[0]
    print(f"{label}: val_bpb {r['val_bpb']}  ({len(runs)} run(s), medians; sandbox {r['sandbox_level']})")
    print(f"  hand-over to result {wall:.2f} s = start {ready:.2f} + training {train:.2f} + hand-over and export "
          f"{handover:.2f} + evaluation {evaluation:.2f} + rest {rest:.2f}")
    print(f"  evaluation: {100 * evaluation / wall:.1f}% of the trial ({r['causality_checks']} causality checks, "
          f"{r['eval_work_per_token']:.3g} operations a token)")
    print(f"  CPU from the kernel: trusted side {med('trusted_cpu_seconds'):.2f} s, worker (training) "
          f"{med('cpu_seconds'):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "cpu"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="warm trials per preset (one cold trial each)")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{args.threads} thread(s) a trial")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            conf, knobs, env = prepared(preset, args.threads)
            slot = WarmSlot(env)
            try:
                warm = [slot.run(trial_folder(Path(tmp), f"{preset}-warm-{i}", conf, knobs)) for i in range(args.repeat)]
            finally:
                slot.close()
            report(f"{preset} (warm slot)", warm)
            report(f"{preset} (cold harness)", [run_cold(trial_folder(Path(tmp), f"{preset}-cold", conf, knobs), env)])
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
