"""Do the report's numbers cover what they say? Simulation with known truth.

    python benchmarks/intervals.py              # 1000 draws per cell (about 10 minutes of one core)
    python benchmarks/intervals.py --reps 200   # a quick look

Part 1, coverage: for n = 5, 8, 16 seeds drawn from normal, skewed (exponential) and best-of-8
(the minimum of 8 normal trials, what a study's best is) noise, how often each 95% interval the
report shows contains the true value: the mean, median, IQM and paired Δ of arm tables, the noise
floor's σ, and the Kaplan-Meier median time to target (times right-censored at a fixed end). The
two intervals the report used before (percentile bootstrap of the mean and of σ) are printed
beside them. The report uses an interval if it is within 2 points of 95% at n = 8 on normal data.

Part 2, the claims table at n = 8: the share of draws in which it claims anything when all arms
are one distribution (false claims, family-wise over every pair: at most 5% is the promise), and
its power when one arm is better by one noise standard deviation, with the noise floor measured
from 8 further seeds as analysis.noise would (a claim needs |Δ| >= that floor) and without a floor.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import pandas as pd

from analysis import claims, stats

SIGMA = 0.006  # the cpu preset's seed noise in val_bpb
NS = (5, 8, 16)


def standardised(draw):
    """A noise distribution scaled to mean 0 and standard deviation 1 (moments from 2e6 draws)."""
    big = draw(np.random.default_rng(12345), 2_000_000)
    mean, sd = big.mean(), big.std()
    return (lambda rng, n: (draw(rng, n) - mean) / sd), (big - mean) / sd


DISTS = {
    "normal": standardised(lambda rng, n: rng.normal(0.0, 1.0, n)),
    "skewed": standardised(lambda rng, n: rng.exponential(1.0, n)),
    "best-of-8": standardised(lambda rng, n: rng.normal(0.0, 1.0, (n, 8)).min(axis=1)),
}
# time to target: positive times, each seed censored at END if it has not arrived by then
TIMES = {
    "normal": lambda rng, n: np.abs(rng.normal(10.0, 3.0, n)),
    "skewed": lambda rng, n: rng.exponential(10.0, n),
    "best-of-8": lambda rng, n: rng.exponential(80.0, (n, 8)).min(axis=1),
}
END = 25.0


def coverage(reps: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for dist, (draw, big) in DISTS.items():
        truth = {"mean": 0.0, "median": float(np.median(big)), "iqm": float(stats.iqm(big)), "sigma": 1.0,
                 "delta": 0.0}
        big_times = TIMES[dist](np.random.default_rng(54321), 2_000_000)
        truth["ttt"] = float(np.median(big_times))
        for n in NS:
            hits: dict[str, int] = {}
            for _ in range(reps):
                x = draw(rng, n)
                d = draw(rng, n) - draw(rng, n)  # two arms' seeds, the same distribution: Δ = 0
                t = TIMES[dist](rng, n)
                intervals = {
                    "mean: t interval (report)": (stats.mean_ci(x), "mean"),
                    "mean: percentile bootstrap (before)": (stats.bootstrap_ci(x, np.mean, n_resamples=2000,
                                                                               seed=int(rng.integers(1 << 30))), "mean"),
                    "median: Hettmansperger-Sheather (report)": (stats.median_ci(x), "median"),
                    "IQM: percentile bootstrap (report)": (stats.bootstrap_ci(x, stats.iqm, n_resamples=2000,
                                                                              seed=int(rng.integers(1 << 30))), "iqm"),
                    "Δ: paired t interval (report)": (stats.mean_ci(d), "delta"),
                    "σ: chi-square (report)": (stats.sigma_ci(x), "sigma"),
                    "σ: percentile bootstrap (before)": (stats.bootstrap_ci(
                        x, lambda v, axis=-1: np.std(v, ddof=1, axis=axis), n_resamples=2000,
                        seed=int(rng.integers(1 << 30))), "sigma"),
                    "time to target: Kaplan-Meier median (report)": (
                        stats.km_median(np.where(t <= END, t, np.inf), np.full(n, END))[1:], "ttt"),
                }
                for name, ((lo, hi), what) in intervals.items():
                    hits[name] = hits.get(name, 0) + bool(lo <= truth[what] <= hi)
            for name, h in hits.items():
                rows.append({"interval": name, "data": dist, "n": n, "coverage": 100.0 * h / reps})
    table = pd.DataFrame(rows).pivot_table(index="interval", columns=["data", "n"], values="coverage", sort=False)
    return table


def claim_rates(reps: int, seed: int, n: int = 8) -> pd.DataFrame:
    """The claims table's verdicts (stats.pairwise, then claims.judge with and without a floor)."""
    rng = np.random.default_rng(seed)
    rows = []
    settings = [("null, 2 arms", 2, 0.0), ("null, 3 arms", 3, 0.0), ("null, 5 arms", 5, 0.0),
                ("effect 1 σ, 2 arms", 2, 1.0)]
    for dist, (draw, _) in DISTS.items():
        for label, k, effect in settings:
            for test in ("wilcoxon", "permutation"):
                counts = {"floor": 0, "no floor": 0}
                runs = reps if k == 2 else max(reps // (2 if k == 3 else 4), 100)
                for _ in range(runs):
                    values = {f"arm{i}": 1.75 + SIGMA * draw(rng, n) for i in range(k)}
                    values["arm0"] = values["arm0"] - effect * SIGMA
                    frame = pd.DataFrame({"arm": np.repeat(list(values), n), "seed": np.tile(np.arange(n), k),
                                          "value": np.concatenate(list(values.values()))})
                    pairs = stats.pairwise(frame, test=test)
                    floor = float(np.std(1.75 + SIGMA * draw(rng, 8), ddof=1))  # measured on 8 seeds
                    for key, sigma in (("floor", floor), ("no floor", None)):
                        claimed = [r["a"] for _, r in pairs.iterrows() if claims.judge(r, sigma, stats.ALPHA)[0] == "claimed"]
                        # power: the true difference claimed, the right way round; under the null any claim is false
                        counts[key] += ("arm0" in claimed) if effect else bool(claimed)
                rows.append({"setting": label, "data": dist, "test": test, "draws": runs,
                             "with the noise floor %": 100.0 * counts["floor"] / runs,
                             "test alone %": 100.0 * counts["no floor"] / runs})
    return pd.DataFrame(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=1000, help="draws per cell (Monte Carlo error ~ 0.7 points at 1000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    started = time.time()
    pd.set_option("display.width", 200)
    print(f"load average at start: {os.getloadavg()[0]:.1f}; {args.reps} draws per cell, 95% intervals")
    table = coverage(args.reps, args.seed)
    se = 100 * math.sqrt(0.95 * 0.05 / args.reps)
    print(f"\nAchieved coverage (%) of each interval, nominal 95 (Monte Carlo standard error {se:.1f} points):")
    print(table.round(1).to_string())
    rates = claim_rates(args.reps, args.seed + 1)
    print("\nClaims table at n = 8 (Holm over all ordered pairs, alpha 0.05): share of draws with a false claim under "
          "the null, and power at an effect of one noise SD:")
    print(rates.round(1).to_string(index=False))
    for k in (2, 3, 5):
        family = k * (k - 1)
        print(f"{k} arms, n = 8: {family} one-sided tests in Holm's family; the smallest Holm p any data can give is "
              f"{family} / 2^8 = {stats.smallest_holm_p(8, family):.3f}"
              + ("" if stats.smallest_holm_p(8, family) < stats.ALPHA else
                 f": no claim is possible (n >= {next(n for n in range(8, 40) if stats.smallest_holm_p(n, family) < stats.ALPHA)} seeds needed)"))
    print(f"\n{time.time() - started:.0f} s; load average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
