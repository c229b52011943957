"""The statistics a reviewer asks for before believing "searcher A beats searcher B".

Seeds are the unit of replication: one number per study (its best val_bpb at an equal budget),
studies of one arm differ only in their seed, and arms are compared seed by seed (seed s of A
against seed s of B: the same first candidates, the same data order). With n = 8 seeds a Gaussian
std hides a lot, so every figure comes with a bootstrap confidence interval, every comparison
with a paired rank test and a family-wise correction, and every table with its n. A seed without
a result is never silently dropped: it is counted in `n_missing` and named in the claim.

Lower val_bpb is better throughout; "A < B" means A found the better model.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05
N_RESAMPLES = 4000


def iqm(values, axis=-1):
    """Interquartile mean: the mean of the middle half, robust to one diverged seed (rliable's
    recommended aggregate for few runs)."""
    return stats.trim_mean(values, 0.25, axis=axis)


AGGREGATES = {"mean": np.mean, "median": np.median, "iqm": iqm}


def bootstrap_ci(values, statistic=np.mean, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over seeds (NaNs left out by the caller, who counts
    them). One seed has no interval (NaN: a table then says so); seeds that all agree give the
    point itself, since there is nothing to resample and scipy's interval would be NaN."""
    x = np.sort(np.asarray(values, dtype=float))  # the same seeds in any order give the same interval
    if len(x) < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        v = float(statistic(x))
        return v, v
    res = stats.bootstrap((x,), statistic, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def arm_summary(values: pd.DataFrame, by: str = "arm", column: str = "value") -> pd.DataFrame:
    """Per arm: n (seeds with a value), n_missing (seeds without: failed or never reached), and
    mean, median, IQM each with a bootstrap 95% CI."""
    rows = []
    for arm, g in values.groupby(by, sort=True):
        x = g[column].to_numpy(dtype=float)
        ok = x[~np.isnan(x)]
        row = {by: arm, "n": len(ok), "n_missing": int(np.isnan(x).sum())}
        for name, fn in AGGREGATES.items():
            row[name] = float(fn(ok)) if len(ok) else math.nan
            row[f"{name}_lo"], row[f"{name}_hi"] = bootstrap_ci(ok, fn)
        rows.append(row)
    return pd.DataFrame(rows).set_index(by)


def paired(values: pd.DataFrame, a: str, b: str, by: str = "arm", column: str = "value") -> pd.DataFrame:
    """Seed-matched values of arms a and b: one row per seed either arm has (NaN where missing)."""
    wide = values.pivot_table(index="seed", columns=by, values=column, aggfunc="first", dropna=False)
    return wide.reindex(columns=[a, b])


def wilcoxon_less(a, b) -> float:
    """One-sided Wilcoxon signed-rank p-value for "a < b" over seed pairs. Exact for small n
    without ties; zero differences (two arms that found the same model) count against a claim
    (Pratt). All pairs equal: p = 1, there is no evidence of anything."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) == 0 or np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d, alternative="less", zero_method="pratt").pvalue)


def permutation_less(a, b, n_resamples: int = 20000, seed: int = 0) -> float:
    """One-sided paired permutation (sign-flip) p-value for "mean(a - b) < 0"; exact when
    2^n <= n_resamples."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) == 0 or np.all(d == 0):
        return 1.0
    res = stats.permutation_test((d,), np.mean, permutation_type="samples", alternative="less",
                                 n_resamples=n_resamples, rng=np.random.default_rng(seed))
    return float(res.pvalue)


TESTS = {"wilcoxon": wilcoxon_less, "permutation": permutation_less}


def rank_biserial(a, b) -> float:
    """Matched-pairs rank-biserial correlation of a - b: -1 when a is lower on every seed, +1 when
    higher, 0 when the signed ranks balance (Kerby 2014). The effect size that goes with Wilcoxon.
    Tied seeds keep their (lowest) ranks in the denominator, as Pratt's test does, so five ties and
    one win read as a small effect, not as -1."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) == 0 or np.all(d == 0):
        return 0.0
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def probability_of_improvement(a, b) -> float:
    """P(a < b) for one seed of each drawn at random, ties counted half (rliable's probability of
    improvement; the Mann-Whitney U over n_a * n_b)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0 or len(b) == 0:
        return math.nan
    less = (a[:, None] < b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()
    return float(less / (len(a) * len(b)))


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values: controls the chance of any false claim across the
    family, without Bonferroni's cost to every comparison but the first."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def pairwise(values: pd.DataFrame, by: str = "arm", column: str = "value", test: str = "wilcoxon",
             seed: int = 0) -> pd.DataFrame:
    """Every pair of arms, seed-matched: Δ = mean(A - B) over the seeds both have, its bootstrap
    CI, the one-sided p-value for the direction the data points to, and that p Holm-adjusted over
    the family of all ordered pairs (both directions of every pair were candidate claims, so the
    family is k(k-1), which makes the test exactly as strict as a two-sided one)."""
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; expected one of {sorted(TESTS)}")
    arms = sorted(values[by].unique())
    rows = []
    for a, b in itertools.combinations(arms, 2):
        wide = paired(values, a, b, by, column)
        both = wide.dropna()
        x, y = both[a].to_numpy(), both[b].to_numpy()
        diff = x - y
        delta = float(diff.mean()) if len(diff) else math.nan
        if delta > 0:  # orient every row as "better < worse"
            a, b, x, y, diff, delta = b, a, y, x, -diff, -delta
        lo, hi = bootstrap_ci(diff, np.mean, seed=seed)
        a_all, b_all = values.loc[values[by] == a, column], values.loc[values[by] == b, column]
        rows.append({
            "a": a, "b": b, "n": len(diff),
            "n_missing": int(len(wide) - len(both)),
            "delta": delta, "delta_lo": lo, "delta_hi": hi,
            "p": TESTS[test](x, y) if len(diff) else 1.0,
            "p_reverse": TESTS[test](y, x) if len(diff) else 1.0,
            "effect_rank_biserial": rank_biserial(x, y),
            "p_improvement": probability_of_improvement(a_all.dropna(), b_all.dropna()),
            "test": test,
        })
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    adjusted = holm(np.concatenate([out["p"], out["p_reverse"]]))
    out["p_holm"] = adjusted[: len(out)]
    return out.drop(columns="p_reverse")


@dataclass
class Friedman:
    """Friedman's test over complete seed blocks and the Nemenyi critical difference of average
    ranks: two arms whose average ranks differ by less than `cd` are not told apart."""

    arms: list[str]
    avg_rank: dict[str, float]
    n_blocks: int
    n_dropped: int
    statistic: float
    p: float
    cd: float


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> float:
    """Demšar (2006): CD = q_alpha * sqrt(k (k+1) / (6 n)), q_alpha the studentized range
    quantile over sqrt(2) (2.343 for k=3, 2.728 for k=5 at alpha 0.05)."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6.0 * n)))


def friedman_nemenyi(values: pd.DataFrame, by: str = "arm", column: str = "value", alpha: float = ALPHA) -> Friedman:
    """Ranks (1 = lowest val_bpb) within each seed that every arm has; seeds some arm lacks are
    counted in n_dropped (a rank needs every arm)."""
    wide = values.pivot_table(index="seed", columns=by, values=column, aggfunc="first", dropna=False)
    complete = wide.dropna()
    arms = list(complete.columns)
    if len(arms) < 3:
        raise ValueError("Friedman needs at least 3 arms")
    if len(complete) < 2:
        raise ValueError(f"Friedman needs at least 2 seeds that every arm has; {len(complete)} found")
    ranks = complete.rank(axis=1, method="average")
    avg = ranks.mean(axis=0)
    if np.ptp(complete.to_numpy(), axis=1).max() == 0:  # every arm tied on every seed
        statistic, p = 0.0, 1.0
    else:
        res = stats.friedmanchisquare(*[complete[a].to_numpy() for a in arms])
        statistic, p = float(res.statistic), float(res.pvalue)
    return Friedman(arms=arms, avg_rank={a: float(avg[a]) for a in arms}, n_blocks=len(complete),
                    n_dropped=len(wide) - len(complete), statistic=statistic, p=p,
                    cd=nemenyi_cd(len(arms), len(complete), alpha))


def censored_ecdf(times, grid) -> np.ndarray:
    """Fraction of ALL seeds that reached the target by each time in `grid`. A seed that never
    reached it (time inf or NaN: censored at its study's end) stays in the denominator, so the
    curve tops out at the share that got there instead of pretending every seed did."""
    t = np.asarray(times, dtype=float)
    t = np.where(np.isnan(t), np.inf, t)
    grid = np.asarray(grid, dtype=float)
    if len(t) == 0:
        return np.full(len(grid), np.nan)
    return (t[None, :] <= grid[:, None]).sum(axis=1) / len(t)


def bootstrap_band(matrix: np.ndarray, statistic=np.mean, confidence: float = CONFIDENCE,
                   n_resamples: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile-bootstrap band of `statistic` across seeds (columns) at every row of
    `matrix` (rows: points of an anytime curve). Seeds are resampled as whole curves."""
    m = np.asarray(matrix, dtype=float)
    if m.shape[1] < 2:  # one seed: no band (NaN draws nothing), rather than a band of width zero
        return np.full(m.shape[0], np.nan), np.full(m.shape[0], np.nan)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, m.shape[1], size=(n_resamples, m.shape[1]))
    boot = statistic(m[:, picks], axis=-1)  # rows x resamples
    tail = (1 - confidence) / 2
    return np.quantile(boot, tail, axis=1), np.quantile(boot, 1 - tail, axis=1)
