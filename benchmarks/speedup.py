"""Time the speedup reproduction in miniature and print its figures.

    python benchmarks/speedup.py                       # the reproduction's default size
    python benchmarks/speedup.py --trials 12 --seeds 1 # smaller; any reproduce_speedup.py flag

Prints the real time it took, the three speedups per parallel study (measured, replayed,
throughput) and the searcher table, all on the simulated clock, from the report it writes.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else ROOT / "reports" / "reproduce-speedup"
    started = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce_speedup.py"), *argv], cwd=ROOT)
    took = time.time() - started
    if proc.returncode != 0:
        return proc.returncode
    pairs = pd.read_csv(out / "speedups_per_pair.csv")
    cols = ["parallel", "target", "speedup_measured", "speedup_replayed", "throughput_ratio_measured",
            "throughput_ratio_replayed"]
    print(f"\nreproduction took {took / 60:.1f} min of real time on this machine")
    print("\nper parallel study (SIMULATED clock):")
    print(pairs[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nreport: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
