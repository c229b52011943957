"""The GPU path in one short run: CUDA, bf16 autocast, torch.compile, SDPA, MFU, and the trusted
scorer's GPU path (spawned sandboxed worker and model servers, logits handed back by CUDA IPC).

Builds one trial of the gpu preset (a seconds budget you choose, default 90 s) from
conf/objective/gpu.yaml and train/train.py, runs the real harness on it, and prints the figures
the objective issue asks for (tokens/s, MFU, peak memory, val_bpb, fixed overhead).

    python scripts/gpu_check.py [--seconds 90] [--corpus austen]
    python scripts/gpu_check.py --steps 50 && python scripts/gpu_check.py --steps 50 --ipc

The last pair must print the same val_bpb: the same weights scored with the logits handed back by
a memfd (the default) and by CUDA IPC (ARENA_CUDA_IPC=1, not yet run on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launchers.base import harness_env, run_harness  # noqa: E402
from train.contract import LOG_FILE, TRAIN_FILE, TRIAL_FILE  # noqa: E402
from train.knobs import write_knobs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--steps", type=int, default=None, help="a steps budget instead (reproducible)")
    ap.add_argument("--ipc", action="store_true", help="model servers hand logits back by CUDA IPC")
    args = ap.parse_args()
    objective = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/objective/gpu.yaml"), resolve=True)
    knobs = objective.pop("knobs") or {}
    objective.update(budget_kind="seconds", budget=args.seconds, hard_limit_s=args.seconds * 4 + 300)
    if args.steps:
        objective.update(budget_kind="steps", budget=args.steps)
    if args.corpus:
        objective["corpus"] = args.corpus
    objective["cache_dir"] = str(Path(objective["cache_dir"]).expanduser())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ARENA_CACHE": objective["cache_dir"],
           "ARENA_CUDA_IPC": "1" if args.ipc else "0"}
    subprocess.run([sys.executable, "-m", "train.prepare", "--corpus", objective["corpus"],
                    "--vocab-size", str(objective["vocab_size"])], env=env, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp)
        source = (ROOT / "train" / TRAIN_FILE).read_text()
        (trial / TRAIN_FILE).write_text(write_knobs(source, knobs) if knobs else source)
        (trial / TRIAL_FILE).write_text(json.dumps({"trial_id": "gpu-check", "seed": 0, "objective": objective}))
        result = run_harness(trial, harness_env()).to_dict()
        print((trial / LOG_FILE).read_text()[-3000:])
    keys = ("status", "device", "sandbox_level", "val_bpb", "num_params", "num_steps", "tokens_per_second", "mfu",
            "peak_memory_mb", "training_seconds", "eval_seconds", "total_seconds", "error")
    for k in keys:
        print(f"{k:>18}: {result.get(k)}")
    if result.get("total_seconds") and result.get("training_seconds"):
        print(f"{'fixed overhead s':>18}: {result['total_seconds'] - result['training_seconds']:.1f}")


if __name__ == "__main__":
    main()
