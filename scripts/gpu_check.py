"""The GPU path in one short run, for the first session that has a GPU: CUDA, bf16 autocast,
torch.compile, SDPA and MFU in training; then the crossing and the trusted scorer on the device
(torch.export of a CUDA model in the spawned sandboxed worker, the program checked and evaluated by
the harness on the GPU), and the figures the scorer issue asks for.

    python scripts/gpu_check.py                 # a 90 s gpu-preset trial, then the scorer on the GPU
    python scripts/gpu_check.py --steps 50      # a steps budget instead (reproducible val_bpb)
    python scripts/gpu_check.py --scorer-only   # only part 2 (about a minute)
    python scripts/gpu_check.py --scorer-only --device cpu --preset tiny   # part 2 on a CPU: a smoke test
                                                                           # (tests/test_gpu_check.py) that
                                                                           # keeps this script current

Part 1 runs the real harness on one trial of the gpu preset (conf/objective/gpu.yaml, train/train.py)
and prints tokens/s, MFU, peak memory, val_bpb, the evaluation's seconds and its share of the trial,
and the trusted side's CPU beside the worker's. Part 2 exports the baseline model on the GPU in this
process, checks the program as the harness would, evaluates the preset's validation rows with it on
the GPU, and prints: the program's agreement with the module's own forward (fp32), the largest move
the causality checks see for this honest model (it must stay well under prepare.CAUSAL_TOLERANCE:
that is the room the tolerance leaves for kernels chosen by shape), and the evaluation's seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launchers.base import harness_env, run_harness  # noqa: E402
from train.contract import LOG_FILE, TRAIN_FILE, TRIAL_FILE  # noqa: E402
from train.knobs import write_knobs  # noqa: E402


def objective_of(args) -> tuple[dict, dict]:
    objective = OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/objective/{args.preset}.yaml"), resolve=True)
    knobs = objective.pop("knobs") or {}
    objective.update(budget_kind="seconds", budget=args.seconds, hard_limit_s=args.seconds * 4 + 300)
    if args.steps:
        objective.update(budget_kind="steps", budget=args.steps)
    if args.corpus:
        objective["corpus"] = args.corpus
    objective["cache_dir"] = str(Path(objective["cache_dir"]).expanduser())
    return objective, knobs


def trial(objective: dict, knobs: dict) -> None:
    """Part 1: one real trial through the harness (a spawned worker: CUDA does not survive a fork)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "trials" / "gpu-check"
        folder.mkdir(parents=True)
        source = (ROOT / "train" / TRAIN_FILE).read_text()
        (folder / TRAIN_FILE).write_text(write_knobs(source, knobs) if knobs else source)
        (folder / TRIAL_FILE).write_text(json.dumps({"trial_id": "gpu-check", "seed": 0, "objective": objective}))
        result = run_harness(folder, harness_env()).to_dict()
        print((folder / LOG_FILE).read_text()[-3000:])
    extra = result.get("extra") or {}
    keys = ("status", "device", "sandbox_level", "val_bpb", "num_params", "num_steps", "tokens_per_second", "mfu",
            "peak_memory_mb", "training_seconds", "total_seconds", "cpu_seconds", "error")
    for k in keys:
        print(f"{k:>20}: {result.get(k)}")
    for k in ("eval_seconds", "causality_checks", "trusted_cpu_seconds", "handover_seconds", "warmup_seconds"):
        print(f"{k:>20}: {extra.get(k, result.get(k))}")
    total, evaluation = result.get("total_seconds"), extra.get("eval_seconds")
    if total and evaluation:
        print(f"{'eval share':>20}: {100 * evaluation / total:.1f}% of the trial")


def scorer(objective: dict, knobs: dict, device: str = "cuda") -> None:
    """Part 2: the crossing and the trusted scorer on the device, in this process."""
    import numpy as np
    import torch

    from train import graph, prepare
    from train.export import export_model

    assert device != "cuda" or torch.cuda.is_available(), "no CUDA device"

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    spec = prepare.prepare(objective["corpus"], objective["vocab_size"], objective["cache_dir"])
    namespace: dict = {}
    source = (ROOT / "train" / TRAIN_FILE).read_text()
    exec(compile(write_knobs(source, knobs) if knobs else source, "train.py", "exec"), namespace)
    torch.manual_seed(0)
    with torch.device(device):
        model = namespace["build_model"](spec.vocab_size)
    T = objective["eval_seq_len"]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        size = export_model(model, T, Path(tmp) / "model.arena")
        exported = time.time() - started
        raw = (Path(tmp) / "model.arena").read_bytes()
    started = time.time()
    limits = graph.Limits(**(objective.get("eval_limits") or {}))
    program = graph.load(raw, limits, vocab_size=spec.vocab_size, seq_len=T)
    checked = time.time() - started
    print(f"export on {device}: {exported:.1f} s, {size / 2**20:.0f} MB; checked in {checked:.2f} s; "
          f"{program.work_per_token:.3g} operations per token, {program.peak_memory_bytes / 2**20:.0f} MB a row")
    program.to(device)
    rows = torch.as_tensor(np.asarray(spec.val_tokens()[:4 * T], dtype=np.int64).reshape(4, T), device=device)
    with torch.no_grad():
        by_graph = torch.vmap(program)(rows[:, None, :])[:, 0]
        by_module = model.eval()(rows)
    print(f"program vs module forward (fp32, 4 rows): largest logit difference {(by_graph - by_module).abs().max():.3g}")

    moved = []
    original = prepare._check_causal

    def measure(reference, probe_logits, cuts, members=None):  # prepare._check_causal's arguments; every position
        real = reference if members is None else reference[torch.as_tensor(members, device=reference.device)]
        probe = torch.log_softmax(probe_logits.to(torch.float32), dim=-1)
        kept = torch.as_tensor(np.arange(probe.shape[1])[None, :] <= cuts[:, None], device=probe.device)
        moved.append(float(torch.where(kept, (probe - real[:, :probe.shape[1]]).abs().amax(-1), 0.0).max()))

    from train import scorer as trusted

    prepare._check_causal = measure
    try:
        synchronize()
        started = time.time()
        scores = prepare.evaluate_bpb(program, spec, objective["eval_tokens"], T, trusted.batch_rows(program, objective),
                                      torch.device(device), check_lengths=program.check_lengths)
        synchronize()
        seconds = time.time() - started
    finally:
        prepare._check_causal = original
    print(f"evaluation on {device}: {scores['rows']} rows of {T} and {scores['causality_checks']} causality checks in "
          f"{seconds:.1f} s (untrained model, val_bpb {scores['val_bpb']:.3f})")
    print(f"honest causal-check noise on {device}: {max(moved):.3g} nats (tolerance {prepare.CAUSAL_TOLERANCE:g}): "
          + ("fits" if max(moved) <= prepare.CAUSAL_TOLERANCE / 10 else "TOO CLOSE: raise the tolerance or fix the kernels"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--steps", type=int, default=None, help="a steps budget instead (reproducible)")
    ap.add_argument("--scorer-only", action="store_true", help="skip the training trial")
    ap.add_argument("--device", default="cuda", help="where part 2 runs (cpu: a smoke test of this script)")
    ap.add_argument("--preset", default="gpu", help="the objective preset (conf/objective/)")
    args = ap.parse_args()
    objective, knobs = objective_of(args)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ARENA_CACHE": objective["cache_dir"]}
    subprocess.run([sys.executable, "-m", "train.prepare", "--corpus", objective["corpus"],
                    "--vocab-size", str(objective["vocab_size"])], env=env, check=True)
    if not args.scorer_only:
        trial(objective, knobs)
    scorer(objective, knobs, args.device)


if __name__ == "__main__":
    main()
