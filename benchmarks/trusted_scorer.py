"""What the trusted scorer and the sandbox cost per trial on this machine, for the tiny and cpu presets.

    python benchmarks/trusted_scorer.py [--presets tiny cpu] [--threads 1]

Runs the baseline train.py of each preset once through the real harness (`python -m
train.harness`, as a cold launcher runs it; tiny once more on a warm `--serve` slot) and prints, from its result and run.log: total and
training seconds, the time before training starts (harness start, data checks, worker start and
sandbox entry), the evaluation (one fresh sandboxed model server per call, real batches and
causality probes), the rest (weights check, handover, signing), and the share of the trial that is
not training. On a shared machine these move with the load; run it on an idle one for figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
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


def run_preset(preset: str, threads: int, folder: Path, warm: bool = False) -> dict:
    conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "objective" / f"{preset}.yaml"), resolve=True)
    knobs = conf.pop("knobs") or {}
    conf = check_objective(conf)  # as a study would: the derived hard limit, the sandbox level
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ARENA_CACHE": conf["cache_dir"], "OMP_NUM_THREADS": str(threads),
           "ARENA_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "train.prepare", "--corpus", conf["corpus"], "--vocab-size",
                    str(conf["vocab_size"])], env=env, check=True, capture_output=True)
    trial = folder / f"{preset}-{'warm' if warm else 'cold'}"
    trial.mkdir()
    (trial / TRAIN_FILE).write_text(write_knobs((ROOT / "train" / TRAIN_FILE).read_text(), knobs))
    (trial / TRIAL_FILE).write_text(json.dumps({"trial_id": preset, "seed": 0, "objective": conf}))
    if warm:  # a warm slot: the harness imported torch before the trial was handed to it
        server = subprocess.Popen([sys.executable, "-P", "-m", "train.harness", "--serve"], env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert server.stdout.readline().strip() == "ready"
        server.stdin.write(f"{trial}\n")
        server.stdin.flush()
        pid = int(server.stdout.readline())
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        server.stdin.close()
        server.wait()
    else:
        subprocess.run([sys.executable, "-P", "-m", "train.harness", str(trial)], env=env, cwd=trial, check=True,
                       capture_output=True)
    result = json.loads((trial / RESULT_FILE).read_text())
    log = (trial / LOG_FILE).read_text()
    if result["status"] != "ok":
        sys.exit(f"{preset}: {result['status']}: {result['error']}\n{log[-2000:]}")
    ready = float(re.search(r"worker ready to start ([\d.]+) s", log).group(1))
    servers = int(re.search(r"\((\d+) model servers", log).group(1))
    return {**result, "ready_s": ready, "servers": servers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "cpu"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for preset, warm in [(p, False) for p in args.presets] + [("tiny", True)]:
            r = run_preset(preset, args.threads, Path(tmp), warm)
            preset = f"{preset} ({'warm slot' if warm else 'cold'})"
            rest = r["total_seconds"] - r["training_seconds"] - r["eval_seconds"] - r["ready_s"]
            print(f"{preset}: status {r['status']}  val_bpb {r['val_bpb']}  sandbox {r['sandbox_level']}")
            print(f"  total {r['total_seconds']:.2f} s = start {r['ready_s']:.2f} + training {r['training_seconds']:.2f} "
                  f"+ eval {r['eval_seconds']:.2f} ({r['servers']} model servers, "
                  f"{r['eval_seconds'] / r['servers'] * 1000:.0f} ms each) + rest {rest:.2f} "
                  "(warm-up step, weights check, signing)")
            print(f"  not training: {r['total_seconds'] - r['training_seconds']:.2f} s "
                  f"({100 * (1 - r['training_seconds'] / r['total_seconds']):.0f}% of the trial); "
                  f"worker CPU {r['cpu_seconds']:.2f} s, peak memory {r['peak_memory_mb']} MB")


if __name__ == "__main__":
    main()
