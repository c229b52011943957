"""Does the cpu objective separate real improvements from noise? Figures for the cpu preset.

    python benchmarks/objective.py [--seeds 3] [--threads 1] [--out DIR]

Runs real trials through the harness (one at a time, each on --threads threads) and prints:
throughput, the fixed overhead per trial (total_seconds - training_seconds), val_bpb after 30 s
and 60 s of training (seconds budget), the seed noise at the preset's own budget, the val_bpb
change when every learning rate is scaled x3 and /3, and the unigram baselines of the corpus.
It takes several minutes; on a shared machine the seconds-budget rows move with the load, the
steps-budget rows do not.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train import prepare  # noqa: E402
from launchers.base import harness_env, run_harness  # noqa: E402
from train.contract import TRAIN_FILE, TRIAL_FILE  # noqa: E402
from train.knobs import read_knobs, write_knobs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="where the trial folders go (default: a temporary folder)")
    args = parser.parse_args()

    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "objective" / "cpu.yaml"), resolve=True)
    knobs = preset.pop("knobs") or {}
    baseline = (ROOT / "train" / TRAIN_FILE).read_text()
    source = write_knobs(baseline, knobs)
    lr_knobs = sorted(name for name in read_knobs(source) if name.endswith("_LR"))
    out = Path(args.out or tempfile.mkdtemp(prefix="arena-objective-"))
    seeds = range(1, args.seeds + 1)

    def trial(name: str, seed: int, knob_values: dict | None = None, **objective) -> dict:
        folder = out / f"{name}-seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TRAIN_FILE).write_text(write_knobs(source, knob_values or {}))
        spec = {"trial_id": folder.name, "seed": seed, "objective": {**preset, **objective}}
        (folder / TRIAL_FILE).write_text(json.dumps(spec))
        result = run_harness(folder, harness_env(threads=args.threads), stdout=subprocess.DEVNULL).to_dict()
        print(f"  {folder.name:24s} {result['status']:7s} val_bpb {_f(result['val_bpb'])}  steps {result['num_steps']}"
              f"  training {_f(result['training_seconds'], 1)} s  total {_f(result['total_seconds'], 1)} s"
              f"  {_f(result['tokens_per_second'], 0)} tok/s", flush=True)
        return result

    data = prepare.prepare(preset["corpus"], preset["vocab_size"], preset["cache_dir"])
    print(f"cpu preset: {preset['corpus']}, vocab {preset['vocab_size']}, {preset['budget']} {preset['budget_kind']}, "
          f"{args.threads} thread(s); knobs {knobs}")
    print(f"trial folders in {out}\n")

    print(f"preset budget ({preset['budget']} {preset['budget_kind']}), {args.seeds} seeds:")
    base = [trial("preset", s) for s in seeds]
    scaled = {}
    for factor in (3.0, 1 / 3):
        label = "lr_x3" if factor > 1 else "lr_div3"
        print(f"every learning rate ({', '.join(lr_knobs)}) x{factor:.3g}:")
        values = {name: read_knobs(source)[name] * factor for name in lr_knobs}
        scaled[label] = [trial(label, s, values) for s in seeds]
    print("seconds budgets (time-dependent: moves with the machine's load):")
    timed = {seconds: trial(f"seconds{seconds}", 1, budget_kind="seconds", budget=seconds) for seconds in (30, 60)}

    base_bpb = _scores(base)
    noise = statistics.stdev(base_bpb) if len(base_bpb) > 1 else float("nan")
    overhead = [r["total_seconds"] - r["training_seconds"] for r in base + [timed[30], timed[60]]]
    print("\nsummary")
    print(f"  device                      {base[0]['device']} ({base[0]['host']}), torch {base[0]['torch_version']}")
    print(f"  parameters                  {base[0]['num_params']:,}")
    print(f"  tokens/s                    {_f(statistics.median(r['tokens_per_second'] for r in base), 0)} "
          f"(median of the preset trials)")
    print(f"  preset training seconds     {', '.join(_f(r['training_seconds'], 1) for r in base)}")
    print(f"  fixed overhead per trial    {_f(statistics.median(overhead), 2)} s median "
          f"(min {_f(min(overhead), 2)}, max {_f(max(overhead), 2)}): total_seconds - training_seconds")
    t30 = timed[30]
    share = 100 * t30["training_seconds"] / t30["total_seconds"]
    print(f"  30 s trial: training share  {_f(share, 1)} % of its wall time")
    print(f"  val_bpb after 30 s / 60 s   {_f(timed[30]['val_bpb'])} / {_f(timed[60]['val_bpb'])} "
          f"({timed[30]['num_steps']} / {timed[60]['num_steps']} steps)")
    print(f"  val_bpb at the preset       {_f(statistics.mean(base_bpb))} mean, seed noise (std over {len(base_bpb)}) "
          f"{_f(noise)}, range {_f(max(base_bpb) - min(base_bpb))}")
    for label, results in scaled.items():
        delta = statistics.mean(_scores(results)) - statistics.mean(base_bpb)
        print(f"  {label:8s} change             {delta:+.4f} ({_f(abs(delta) / noise, 1)}x the seed noise)")
    print(f"  unigram val_bpb             {prepare.unigram_bpb(data):.3f} (token level, vocab {data.vocab_size}), "
          f"{prepare.unigram_bpb(data, 'byte'):.3f} (byte level)")


def _scores(results: list[dict]) -> list[float]:
    """val_bpb of the trials that ended ok; a figure built on failed trials would be meaningless."""
    bad = [r["status"] for r in results if r["status"] != "ok"]
    if bad:
        sys.exit(f"benchmark stopped: trials ended {', '.join(bad)}; see the trial folders")
    return [r["val_bpb"] for r in results]


def _f(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
