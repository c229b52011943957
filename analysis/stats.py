"""The statistics a reviewer asks for before believing "searcher A beats searcher B".

Seeds are the unit of replication: one number per study (its best val_bpb at the comparison's
budget), studies of one arm differ only in their seed, and arms are compared seed by seed (seed s
of A against seed s of B: the same first candidates, the same data order). Every figure comes with
a 95% confidence interval whose coverage at the arena's n = 8 was measured by simulation
(benchmarks/intervals.py, figures in the README), every comparison with a paired one-sided test
and Holm's correction, and every table with its n per arm and the missing seeds by number.

A seed is one study: an arm with the same seed twice is refused (which one would count?), and two
arms whose seeds do not match are refused a paired comparison unless the caller asks for it
(`unmatched_ok`): pairing on the seeds both happen to have hides why the others are gone.

Lower val_bpb is better throughout; "A < B" means A found the better model.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy
from scipy import stats

# scipy < 1.15 has no rng= in bootstrap/permutation_test (a TypeError) and gives Wilcoxon's normal
# approximation for tied seeds (p = 0.043 for 5 ties and 3 wins, where the exact p is 0.125).
SCIPY_FLOOR = (1, 15)
if tuple(int(part) for part in scipy.__version__.split(".")[:2]) < SCIPY_FLOOR:
    raise ImportError(f"analysis needs scipy >= {'.'.join(map(str, SCIPY_FLOOR))} (found {scipy.__version__}): "
                      f"pip install 'scipy>={'.'.join(map(str, SCIPY_FLOOR))}'")

CONFIDENCE = 0.95
ALPHA = 0.05
N_RESAMPLES = 4000
# Differences closer than this are one value: val_bpb is reported to 4-6 decimals, and two
# differences that are equal on paper (1.75 - 1.65 and 1.85 - 1.75) differ in float64 by 1e-16,
# which would split a tie in Wilcoxon's ranks and in a sign-flip test's null distribution.
QUANTUM = 1e-12

# How each interval is computed: the report prints these names beside its tables.
INTERVAL_METHODS = {
    "mean": "t interval",
    "median": "Hettmansperger-Sheather interpolated order statistics",
    "iqm": f"percentile bootstrap ({N_RESAMPLES} resamples)",
    "delta": "paired t interval",
    "sigma": "chi-square interval",
}


class SeedError(ValueError):
    """Seeds that cannot be paired as asked: an arm with a seed twice, or arms whose seeds differ."""


def iqm(values, axis=-1):
    """Interquartile mean: the mean of the middle half, robust to one diverged seed (rliable's
    recommended aggregate for few runs)."""
    return stats.trim_mean(values, 0.25, axis=axis)


AGGREGATES = {"mean": np.mean, "median": np.median, "iqm": iqm}


def _finite_sorted(values) -> np.ndarray:
    return np.sort(np.asarray(values, dtype=float))  # the same seeds in any order give the same interval


def mean_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t interval of the mean: at n = 8 it covers 95% on normal data, where the
    percentile bootstrap covers 89% (it has no small-sample correction). One seed has no interval
    (NaN); seeds that all agree give the point itself."""
    x = _finite_sorted(values)
    if len(x) < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence_level=confidence)
    return float(ci.low), float(ci.high)


def median_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Hettmansperger & Sheather (1986): the distribution-free order-statistic interval of the
    median, interpolated between the two neighbouring order statistics so that it covers
    `confidence` instead of the next binomial level up (at n = 8: 99.2% or 93.0%, nothing between).
    Below n = 6 even the range covers less than 95% (n = 5: 93.8%): the range is returned."""
    x = _finite_sorted(values)
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])

    def coverage(d: int) -> float:  # P(X_(d) <= median <= X_(n-d+1)) = P(d <= B <= n-d), B ~ Bin(n, 1/2)
        return float(stats.binom.cdf(n - d, n, 0.5) - stats.binom.cdf(d - 1, n, 0.5)) if d <= n - d else 0.0

    if coverage(1) < confidence:
        return float(x[0]), float(x[-1])
    d = 1
    while coverage(d + 1) >= confidence:
        d += 1
    g_d, g_next = coverage(d), coverage(d + 1)
    share = (g_d - confidence) / (g_d - g_next)
    lam = (n - d) * share / (d + (n - 2 * d) * share)
    low = (1 - lam) * x[d - 1] + lam * x[d]
    high = (1 - lam) * x[n - d] + lam * x[n - d - 1]
    return float(low), float(high)


def bootstrap_ci(values, statistic=np.mean, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over seeds (NaNs left out by the caller, who counts
    them): what the IQM uses, where it covers 94% at n = 8 (a t interval of the trimmed mean,
    Tukey-McLaughlin, covers 91%). One seed has no interval; seeds that all agree give the point."""
    x = _finite_sorted(values)
    if len(x) < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        v = float(statistic(x))
        return v, v
    res = stats.bootstrap((x,), statistic, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def iqm_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    return bootstrap_ci(values, iqm, confidence)


def sigma_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The chi-square interval of a standard deviation, sqrt((n-1) s^2 / chi2 quantiles): exact for
    normal noise (95% at any n), where the bootstrap of s covers 75% at n = 8. Needs 2 values."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    s = float(np.std(x, ddof=1))
    tail = (1 - confidence) / 2
    return (s * math.sqrt((n - 1) / stats.chi2.ppf(1 - tail, n - 1)),
            s * math.sqrt((n - 1) / stats.chi2.ppf(tail, n - 1)))


CI_METHODS = {"mean": mean_ci, "median": median_ci, "iqm": iqm_ci}


# -- seeds: one study per arm and seed, the same seeds in the arms compared -------------------------
def check_one_study_per_seed(values: pd.DataFrame, by: str = "arm") -> None:
    """An arm with the same seed twice (two study names, two max_trials) counts it twice in its n
    and once in a paired test: refused, naming the studies when the frame has them."""
    dup = values[values.duplicated([by, "seed"], keep=False)]
    if dup.empty:
        return
    parts = []
    for (arm, seed), g in dup.groupby([by, "seed"], sort=True):
        ids = f" ({', '.join(map(str, g['study_id']))})" if "study_id" in g else ""
        parts.append(f"{arm} has seed {seed} {len(g)} times{ids}")
    raise SeedError("; ".join(parts) + ": one study per arm and seed (choose which with --studies)")


def seeds_by_arm(values: pd.DataFrame, by: str = "arm") -> dict[str, list]:
    """The seeds each arm has a study for (with a value or not)."""
    return {arm: sorted(g["seed"].unique()) for arm, g in values.groupby(by, sort=True)}


def check_matched_seeds(values: pd.DataFrame, by: str = "arm", arms: list[str] | None = None) -> None:
    """Paired tests compare seed s of one arm with seed s of another: if the arms were run on
    different seeds, the pairs left are the seeds they happen to share, so refuse and say which
    seeds each arm lacks."""
    have = seeds_by_arm(values, by)
    have = {a: s for a, s in have.items() if arms is None or a in arms}
    every = sorted(set().union(*map(set, have.values()))) if have else []
    lacking = {a: [s for s in every if s not in set(s_have)] for a, s_have in have.items()}
    lacking = {a: s for a, s in lacking.items() if s}
    if lacking:
        detail = "; ".join(f"{a} has no study for seed{'s' if len(s) > 1 else ''} {seed_list(s)}"
                           for a, s in lacking.items())
        raise SeedError(f"the arms were not run on the same seeds ({detail}): run the missing seeds, select "
                        "matching studies with --studies, or pair them on the seeds both have with --unmatched-seeds")


def seed_list(seeds) -> str:
    return ", ".join(str(int(s)) if float(s).is_integer() else str(s) for s in seeds)


def missing_seeds(values: pd.DataFrame, arm: str, expected, by: str = "arm", column: str = "value") -> str:
    """'7 (no result), 8 (no study)': the expected seeds this arm has no value for, by number."""
    g = values[values[by] == arm]
    return _missing(dict(zip(g["seed"], g[column])), expected)


def _missing(arm_values: dict, expected) -> str:
    out = [f"{seed_list([s])} ({'no result' if s in arm_values else 'no study'})"
           for s in sorted(expected) if not (s in arm_values and pd.notna(arm_values[s]))]
    return ", ".join(out)


def arm_summary(values: pd.DataFrame, by: str = "arm", column: str = "value") -> pd.DataFrame:
    """Per arm: n (seeds with a value), n_missing and missing_seeds against every seed any arm of
    `values` has (a seed without a study is missing too, not forgotten), and mean, median and IQM
    each with its 95% CI (INTERVAL_METHODS)."""
    check_one_study_per_seed(values, by)
    expected = sorted(values["seed"].unique())
    rows = []
    for arm, g in values.groupby(by, sort=True):
        x = g[column].to_numpy(dtype=float)
        ok = x[~np.isnan(x)]
        row = {by: arm, "n": len(ok), "n_missing": len(expected) - len(ok),
               "missing_seeds": missing_seeds(values, arm, expected, by, column)}
        for name, fn in AGGREGATES.items():
            row[name] = float(fn(ok)) if len(ok) else math.nan
            row[f"{name}_lo"], row[f"{name}_hi"] = CI_METHODS[name](ok)
        rows.append(row)
    return pd.DataFrame(rows).set_index(by)


# -- paired tests ---------------------------------------------------------------------------------
def differences(a, b) -> np.ndarray:
    """a - b on the QUANTUM grid, as integers of that grid (held in float64, exact below 2^53):
    sums and ranks of equal-on-paper differences are then exactly equal."""
    return np.round((np.asarray(a, float) - np.asarray(b, float)) / QUANTUM)


def wilcoxon_less(a, b) -> float:
    """One-sided Wilcoxon signed-rank p-value for "a < b" over seed pairs, exact (scipy >= 1.15
    enumerates the signs when seeds tie); zero differences (two arms that found the same model)
    count against a claim (Pratt). All pairs equal: p = 1, there is no evidence of anything."""
    d = differences(a, b)
    if len(d) == 0 or np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d, alternative="less", zero_method="pratt").pvalue)


def _sum(x, axis=-1):
    return np.sum(x, axis=axis)


def permutation_less(a, b, n_resamples: int = 20000, seed: int = 0) -> float:
    """One-sided paired permutation (sign-flip) p-value for "mean(a - b) < 0"; exact when
    2^n <= n_resamples. The differences are integers of the QUANTUM grid, so a flip whose sum
    equals the observed one counts as "as extreme" instead of landing on either side by rounding."""
    d = differences(a, b).astype(np.int64)
    if len(d) == 0 or np.all(d == 0):
        return 1.0
    res = stats.permutation_test((d,), _sum, permutation_type="samples", alternative="less",
                                 n_resamples=n_resamples, vectorized=True, rng=np.random.default_rng(seed))
    return float(res.pvalue)


TESTS = {"wilcoxon": wilcoxon_less, "permutation": permutation_less}


def rank_biserial(a, b) -> float:
    """Matched-pairs rank-biserial correlation of a - b (Kerby 2014's simple difference formula):
    the share of the signed-rank sum favouring a minus the share favouring b, over the pairs that
    differ (zero differences dropped, Wilcoxon's convention, as rcompanion and pingouin do). -1
    when a is lower on every seed that differs, +1 when higher; 0 when all pairs tie."""
    d = differences(a, b)
    d = d[d != 0]
    if len(d) == 0:
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
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def smallest_holm_p(n_pairs: int, family: int) -> float:
    """The least Holm-adjusted p that n seed pairs can reach in a family of `family` one-sided
    tests: the exact one-sided p is at least 1/2^n (every sign one way), and the smallest p of the
    family is multiplied by the family's size."""
    return min(1.0, family * 0.5 ** n_pairs)


def pairwise(values: pd.DataFrame, by: str = "arm", column: str = "value", test: str = "wilcoxon",
             unmatched_ok: bool = False) -> pd.DataFrame:
    """Every pair of arms, seed-matched: Δ = mean(A - B) over the seeds both have with its paired t
    interval, the one-sided p-value for each direction, both Holm-adjusted over the family of all
    ordered pairs (both directions of every pair were candidate claims, so the family is k(k-1),
    which makes the test exactly as strict as a two-sided one). Each row is oriented so that `a`
    is the arm with the lower mean (on a tie in the mean, the one its test favours)."""
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; expected one of {sorted(TESTS)}")
    check_one_study_per_seed(values, by)
    if not unmatched_ok:
        check_matched_seeds(values, by)
    per_arm = {arm: dict(zip(g["seed"], g[column].astype(float))) for arm, g in values.groupby(by, sort=True)}
    rows = []
    for a, b in itertools.combinations(sorted(per_arm), 2):
        expected = sorted(set(per_arm[a]) | set(per_arm[b]))
        both = [s for s in expected if pd.notna(per_arm[a].get(s)) and pd.notna(per_arm[b].get(s))]
        x, y = np.array([per_arm[a][s] for s in both]), np.array([per_arm[b][s] for s in both])
        p_ab = TESTS[test](x, y) if len(x) else 1.0
        p_ba = TESTS[test](y, x) if len(x) else 1.0
        # on the QUANTUM grid, so that a mean difference of 0 on paper is 0 and not float noise
        delta = float(differences(x, y).sum()) * QUANTUM / len(x) if len(x) else math.nan
        if delta > 0 or (delta == 0 and p_ba < p_ab):  # orient every row as "better < worse"
            a, b, x, y, p_ab, p_ba = b, a, y, x, p_ba, p_ab
        d = differences(x, y)
        lo, hi = mean_ci(d * QUANTUM)  # on the grid: seeds that all moved by the same amount give a point
        a_all = np.array([v for v in per_arm[a].values() if pd.notna(v)])
        b_all = np.array([v for v in per_arm[b].values() if pd.notna(v)])
        rows.append({
            "a": a, "b": b, "n": len(d), "n_a": len(a_all), "n_b": len(b_all),
            "missing_a": _missing(per_arm[a], expected), "missing_b": _missing(per_arm[b], expected),
            "n_missing": len(expected) - len(both),
            "delta": float(d.sum()) * QUANTUM / len(d) if len(d) else math.nan, "delta_lo": lo, "delta_hi": hi,
            "a_lower": int((d < 0).sum()), "b_lower": int((d > 0).sum()), "tied": int((d == 0).sum()),
            "p": p_ab, "p_reverse": p_ba,
            "effect_rank_biserial": rank_biserial(x, y),
            "p_improvement": probability_of_improvement(a_all, b_all),
            "test": test,
        })
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    adjusted = holm(np.concatenate([out["p"], out["p_reverse"]]))
    out["p_holm"] = adjusted[: len(out)]
    out["p_holm_reverse"] = adjusted[len(out):]
    out["family"] = 2 * len(out)
    return out


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
    dropped: list = field(default_factory=list)  # the seeds some arm has no value for, by number

    @property
    def dropped_text(self) -> str:
        """' (seeds 7, 8 lacking an arm left out)', or '' when every seed is a block."""
        if not self.n_dropped:
            return ""
        return f" (seed{'s' if self.n_dropped > 1 else ''} {seed_list(self.dropped)} lacking an arm left out)"


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> float:
    """Demšar (2006): CD = q_alpha * sqrt(k (k+1) / (6 n)), q_alpha the studentized range
    quantile over sqrt(2) (2.343 for k=3, 2.728 for k=5 at alpha 0.05)."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6.0 * n)))


def friedman_nemenyi(values: pd.DataFrame, by: str = "arm", column: str = "value", alpha: float = ALPHA) -> Friedman:
    """Ranks (1 = lowest val_bpb) within each seed that every arm has; seeds some arm lacks are
    counted in n_dropped (a rank needs every arm)."""
    check_one_study_per_seed(values, by)
    wide = values.pivot_table(index="seed", columns=by, values=column, aggfunc="first", dropna=False)
    wide = wide[wide.index.isin(values["seed"])]
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
                    cd=nemenyi_cd(len(arms), len(complete), alpha),
                    dropped=sorted(set(wide.index) - set(complete.index)))


# -- time to target -------------------------------------------------------------------------------
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


def km_median(times, censored_at, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(median, lo, hi) time to target from the Kaplan-Meier estimate (scipy.stats.ecdf), each
    seed that never reached the target right-censored at its study's end. The median is the first
    time the survival drops to 0.5 or below (so with exactly half of the seeds there, it is the
    time the last of that half arrived); inf when fewer than half got there. The interval inverts
    the log-log pointwise band of the survival curve at 0.5 (Brookmeyer-Crowley)."""
    t = np.asarray(times, dtype=float)
    reached = np.isfinite(t)
    ends = np.asarray(censored_at, dtype=float)
    if len(t) == 0:
        return math.nan, math.nan, math.nan
    if not reached.any():
        return math.inf, math.nan, math.inf
    data = stats.CensoredData(uncensored=t[reached], right=ends[~reached & np.isfinite(ends)])
    sf = stats.ecdf(data).sf

    def first_at_or_below_half(q, p) -> float:
        hit = np.nonzero(np.asarray(p) <= 0.5)[0]
        return float(q[hit[0]]) if len(hit) else math.inf

    median = first_at_or_below_half(sf.quantiles, sf.probabilities)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "undefined at some observations": handled below
        band = sf.confidence_interval(confidence_level=confidence, method="log-log")
    # the band is undefined where the survival is 0 or 1: it is the point there
    low = np.where(np.isnan(band.low.probabilities), sf.probabilities, band.low.probabilities)
    high = np.where(np.isnan(band.high.probabilities), sf.probabilities, band.high.probabilities)
    # the times whose band holds 0.5: from the first the lower band reaches to the first the upper does
    return median, first_at_or_below_half(sf.quantiles, low), first_at_or_below_half(sf.quantiles, high)


def mean_band(matrix: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise t interval of the mean across seeds (columns) at every row of `matrix` (rows:
    points of an anytime curve), the interval of the mean that covers what it says at n = 8."""
    m = np.asarray(matrix, dtype=float)
    n = m.shape[1]
    if n < 2:  # one seed: no band (NaN draws nothing), rather than a band of width zero
        return np.full(m.shape[0], np.nan), np.full(m.shape[0], np.nan)
    mean = m.mean(axis=1)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * m.std(axis=1, ddof=1) / math.sqrt(n)
    return mean - half, mean + half
