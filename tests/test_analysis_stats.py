"""analysis.stats and analysis.claims against references outside the module: scipy.stats and
statsmodels' Holm, published tables (chi-square quantiles, Demšar's critical differences), exact
enumerations in rational arithmetic, and cases computed by hand from the published formulas
(Hettmansperger-Sheather, Kaplan-Meier, Kerby's rank-biserial)."""
from __future__ import annotations

import importlib
import itertools
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import scipy
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from analysis import claims, stats
from analysis.budget import Budget


def test_wilcoxon_one_sided_p_is_the_exact_signed_rank_tail():
    # every seed better: only 1 of the 2^8 sign patterns is as extreme
    a = np.arange(8.0)
    assert stats.wilcoxon_less(a, a + np.arange(1, 9)) == pytest.approx(1 / 256)
    # d = -1..-7, +8: T+ = 8; subsets of {1..8} summing to <= 8: 1+1+1+2+2+3+4+5+6 = 25
    d = np.array([-1, -2, -3, -4, -5, -6, -7, 8.0])
    assert stats.wilcoxon_less(d, np.zeros(8)) == pytest.approx(25 / 256)
    assert stats.wilcoxon_less(np.ones(8), np.ones(8)) == 1.0


def test_wilcoxon_with_five_tied_seeds_and_three_wins_is_exact():
    # Pratt: the five zeros are ranked and left out of T+; the three wins are the only signs that
    # can flip, and all three pointing one way is 1 of 2^3 patterns (scipy 1.14 said 0.043 here)
    d = np.array([0, 0, 0, 0, 0, -1, -2, -3.0])
    assert stats.wilcoxon_less(d, np.zeros(8)) == pytest.approx(1 / 8)


def exact_sign_flip_p(a: list[str], b: list[str]) -> Fraction:
    """P(sum of sign-flipped |a - b| <= observed sum), enumerated in exact rational arithmetic."""
    d = [Fraction(x) - Fraction(y) for x, y in zip(a, b)]
    observed = sum(d)
    flips = list(itertools.product((1, -1), repeat=len(d)))
    return Fraction(sum(sum(s * abs(x) for s, x in zip(signs, d)) <= observed for signs in flips), len(flips))


def test_permutation_and_wilcoxon_count_differences_equal_on_paper_as_ties():
    # six differences of exactly ±0.1 on paper, 0.1 ± 1e-16 in float64: 42 of the 64 sign patterns
    # sum to at most the observed 0 (the old code counted 41: p 0.641), and all six |d| tie in rank
    a, b = ["1.85", "1.3", "0.7", "2.2", "1.1", "0.35"], ["1.75", "1.4", "0.6", "2.3", "1.0", "0.45"]
    exact = exact_sign_flip_p(a, b)
    assert exact == Fraction(42, 64)
    x, y = np.array(a, dtype=float), np.array(b, dtype=float)
    assert stats.permutation_less(x, y) == pytest.approx(float(exact))
    assert stats.wilcoxon_less(x, y) == pytest.approx(float(exact))  # T+ = 3 x 3.5 <= 10.5 iff at most 3 positive


def test_permutation_test_is_exact_sign_flipping():
    # mean(d) < 0 with d = -1 x7 and +1 x1: patterns at least as negative have at most one +1 -> 9/256
    d = np.array([-1.0] * 7 + [1.0])
    assert stats.permutation_less(d, np.zeros(8)) == pytest.approx(9 / 256)
    rng = np.random.default_rng(4)
    a, b = rng.normal(1.75, 0.006, 8), rng.normal(1.751, 0.006, 8)
    reference = sps.permutation_test(((a - b),), np.mean, permutation_type="samples", alternative="less",
                                     n_resamples=20000, rng=np.random.default_rng(0)).pvalue
    assert stats.permutation_less(a, b) == pytest.approx(reference)


def test_holm_matches_statsmodels():
    rng = np.random.default_rng(5)
    families = [[0.01, 0.04, 0.03, 0.005], [0.02, 0.02, 0.5, 0.001, 0.04, 0.9], *rng.uniform(0, 0.2, (20, 6))]
    for p in families:
        assert stats.holm(p) == pytest.approx(multipletests(p, method="holm")[1])


def test_the_smallest_possible_holm_p_counts_the_family():
    # 5 seed pairs, 2 arms: the exact one-sided p is at least 1/32, Holm over the 2 ordered pairs doubles it
    assert stats.smallest_holm_p(5, 2) == pytest.approx(multipletests([1 / 32, 1.0], method="holm")[1][0])
    table = claims.claims(per_study({"tpe": np.arange(5.0), "random": np.arange(5.0) + 1}))
    row = table.iloc[0]
    assert not row["supported"] and row["p"] == pytest.approx(1 / 32)  # raw p below 0.05: the old message said "not significant"
    assert "n = 5 seed pairs cannot reach Holm p < 0.05 over 2 ordered comparisons (smallest possible Holm p = 0.0625)" in row["claim"]


def test_effect_sizes_follow_kerbys_rank_biserial_and_rliables_probability_of_improvement():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0])
    assert stats.rank_biserial(a, b) == -1.0 and stats.rank_biserial(b, a) == 1.0
    # Kerby's r = (T+ - T-) / (T+ + T-) over the pairs that differ; scipy's one-sided statistic is T+
    rng = np.random.default_rng(6)
    for _ in range(20):
        x = rng.integers(-9, 9, 9).astype(float)  # whole numbers: differences exact, ties in |d| real
        y = np.where(rng.uniform(size=9) < 0.3, x, rng.integers(-9, 9, 9))  # some tied seeds
        d = x - y
        if np.all(d == 0):
            continue
        t_plus = sps.wilcoxon(d, zero_method="wilcox", alternative="greater").statistic
        n = int((d != 0).sum())
        assert stats.rank_biserial(x, y) == pytest.approx(2 * t_plus / (n * (n + 1) / 2) - 1)
    # five tied seeds and one win: the one seed that differs favours a
    assert stats.rank_biserial([1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 2]) == -1.0
    # 1<2,1<3,1<4, 2=2 (half), 2<3,2<4, 3<4 + 3=3 (half): 6 + 2*0.5 = 7 of 9
    assert stats.probability_of_improvement(a, b) == pytest.approx(7 / 9)
    u = sps.mannwhitneyu(b, a, alternative="greater").statistic  # U counts b > a, ties half
    assert stats.probability_of_improvement(a, b) == pytest.approx(u / 9)


def test_mean_and_delta_intervals_are_students_t():
    rng = np.random.default_rng(7)
    x = rng.normal(1.75, 0.006, 8)
    low, high = sps.t.interval(0.95, 7, loc=x.mean(), scale=sps.sem(x))
    assert stats.mean_ci(x) == pytest.approx((low, high))
    assert stats.mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in stats.mean_ci([2.0]))
    band_lo, band_hi = stats.mean_band(np.vstack([x, x + 1]))
    assert (band_lo[0], band_hi[0]) == pytest.approx((low, high)) and band_hi[1] == pytest.approx(high + 1)


def test_median_interval_is_hettmansperger_sheather():
    # n = 8: [X(1), X(8)] covers 1 - 2/256 = 0.99219, [X(2), X(7)] covers 1 - 18/256 = 0.92969;
    # I = (0.99219 - 0.95) / 0.0625 = 0.675, lambda = 7 I / (1 + 6 I) = 0.935644
    lam = 7 * 0.675 / (1 + 6 * 0.675)
    assert stats.median_ci(np.arange(1.0, 9.0)) == pytest.approx((1 + lam, 8 - lam))
    # n = 5: even the range covers only 1 - 2/32 = 93.75%: the range
    assert stats.median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)
    # n = 16: d = 4 (coverage 0.9787), d = 5 (0.9232); interpolation between X(4)/X(5) and X(12)/X(13)
    g4 = sps.binom.cdf(12, 16, 0.5) - sps.binom.cdf(3, 16, 0.5)
    g5 = sps.binom.cdf(11, 16, 0.5) - sps.binom.cdf(4, 16, 0.5)
    share = (g4 - 0.95) / (g4 - g5)
    lam16 = 12 * share / (4 + 8 * share)
    assert stats.median_ci(np.arange(1.0, 17.0)) == pytest.approx((4 + lam16, 13 - lam16))
    assert g4 == pytest.approx(0.9787, abs=1e-4) and g5 == pytest.approx(0.9232, abs=1e-4)


def test_sigma_interval_uses_the_chi_square_quantiles_of_the_published_table():
    # chi-square with 7 degrees of freedom: 1.690 and 16.013 (the 2.5% and 97.5% points)
    x = np.array([1.744, 1.751, 1.748, 1.755, 1.742, 1.750, 1.757, 1.746])
    s = x.std(ddof=1)
    assert stats.sigma_ci(x) == pytest.approx((s * math.sqrt(7 / 16.013), s * math.sqrt(7 / 1.690)), rel=1e-3)


def test_bootstrap_ci_of_the_iqm_brackets_it_and_is_order_free():
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert stats.bootstrap_ci([1.0, 3.0, 2.0, 5.0]) == stats.bootstrap_ci([5.0, 2.0, 3.0, 1.0])
    assert all(math.isnan(v) for v in stats.bootstrap_ci([2.0]))  # one seed has no interval
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 30.0])
    lo, hi = stats.iqm_ci(x)
    assert stats.iqm(x) == pytest.approx(4.5) and lo <= 4.5 <= hi


def test_arm_summary_counts_a_seed_without_a_study_as_missing_and_names_it():
    values = pd.DataFrame({"arm": ["a"] * 5 + ["b"] * 4, "seed": [*range(5), *range(4)],
                           "value": [1.0, 2.0, 3.0, 4.0, np.nan, 1.0, 2.0, 3.0, 4.0]})
    summary = stats.arm_summary(values)
    assert summary.loc["a", ["n", "n_missing", "missing_seeds"]].tolist() == [4, 1, "4 (no result)"]
    # b was never run on seed 4: missing too (it read n 4, missing 0 before)
    assert summary.loc["b", ["n", "n_missing", "missing_seeds"]].tolist() == [4, 1, "4 (no study)"]
    row = summary.loc["a"]
    assert row["mean"] == 2.5 and row["median"] == 2.5 and row["iqm"] == pytest.approx(2.5)
    assert (row["mean_lo"], row["mean_hi"]) == pytest.approx(sps.t.interval(0.95, 3, loc=2.5, scale=sps.sem([1, 2, 3, 4])))
    for agg in ("mean", "median", "iqm"):
        assert row[f"{agg}_lo"] <= row[agg] <= row[f"{agg}_hi"]


def test_a_seed_run_twice_is_refused_instead_of_counted_twice():
    values = pd.DataFrame({"arm": ["a"] * 3 + ["b"] * 2, "seed": [0, 1, 1, 0, 1], "value": [1.0, 2.0, 2.5, 1.5, 2.5],
                           "study_id": ["a0", "a1", "a1-again", "b0", "b1"]})
    with pytest.raises(stats.SeedError, match=r"^a has seed 1 2 times \(a1, a1-again\): one study per arm and seed"):
        stats.arm_summary(values)
    with pytest.raises(stats.SeedError):
        stats.pairwise(values)


def test_arms_run_on_different_seeds_are_paired_only_when_asked():
    values = pd.DataFrame({"arm": ["a"] * 8 + ["b"] * 7, "seed": [*range(8), *range(7)],
                           "value": [*np.arange(8.0), *(np.arange(7.0) + 1)]})
    with pytest.raises(stats.SeedError, match="b has no study for seed 7") as refused:
        stats.pairwise(values)
    assert "\n" not in str(refused.value)
    row = stats.pairwise(values, unmatched_ok=True).iloc[0]
    assert (row["n"], row["n_a"], row["n_b"], row["missing_a"], row["missing_b"]) == (7, 8, 7, "", "7 (no study)")
    sentence = claims.claims(per_study_frame(values), unmatched_ok=True)["claim"].iloc[0]
    assert "7 seed pairs (a: n = 8; b: n = 7, missing seed 7 (no study))" in sentence


def test_pairwise_numbers_are_scipys_on_the_seed_differences():
    rng = np.random.default_rng(8)
    a, b = rng.normal(1.74, 0.006, 8), rng.normal(1.75, 0.006, 8)
    values = pd.DataFrame({"arm": ["a"] * 8 + ["b"] * 8, "seed": [*range(8), *range(8)], "value": [*a, *b]})
    for test in ("wilcoxon", "permutation"):
        row = stats.pairwise(values, test=test).iloc[0]
        d = np.round(a - b, 12) if row["a"] == "a" else np.round(b - a, 12)
        if test == "wilcoxon":
            p = sps.wilcoxon(d, alternative="less", zero_method="pratt").pvalue
            p_rev = sps.wilcoxon(-d, alternative="less", zero_method="pratt").pvalue
        else:
            p = sps.permutation_test((d,), np.mean, permutation_type="samples", alternative="less",
                                     rng=np.random.default_rng(0)).pvalue
            p_rev = sps.permutation_test((-d,), np.mean, permutation_type="samples", alternative="less",
                                         rng=np.random.default_rng(0)).pvalue
        assert (row["p"], row["p_reverse"]) == pytest.approx((p, p_rev))
        assert (row["p_holm"], row["p_holm_reverse"]) == pytest.approx(multipletests([p, p_rev], method="holm")[1])
        assert (row["delta_lo"], row["delta_hi"]) == pytest.approx(sps.ttest_1samp(d, 0).confidence_interval())
        assert row["test"] == test


def test_friedman_statistic_and_nemenyi_critical_difference_match_the_hand_computed_values():
    # 3 arms, 4 seeds, always ranked a < b < c: chi2 = 12/(4*3*4) * (4^2 + 8^2 + 12^2) - 3*4*4 = 8
    rows = [{"arm": arm, "seed": s, "value": base + 0.01 * s} for s in range(4)
            for arm, base in (("a", 1.0), ("b", 2.0), ("c", 3.0))]
    rows.append({"arm": "a", "seed": 9, "value": 0.5})  # a seed b and c lack: dropped and counted
    f = stats.friedman_nemenyi(pd.DataFrame(rows))
    assert f.avg_rank == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert f.n_blocks == 4 and f.n_dropped == 1 and f.dropped_text == " (seed 9 lacking an arm left out)"
    assert f.statistic == pytest.approx(8.0)
    assert f.p == pytest.approx(math.exp(-4))
    # Demšar (2006), Table 5: q_0.05 = 2.343 (k=3), 2.728 (k=5)
    assert f.cd == pytest.approx(2.343 * math.sqrt(3 * 4 / (6 * 4)), rel=1e-3)
    assert stats.nemenyi_cd(5, 8) == pytest.approx(2.728 * math.sqrt(5 * 6 / 48), rel=1e-3)


def test_censored_ecdf_keeps_seeds_that_never_reached_the_target_in_the_denominator():
    ecdf = stats.censored_ecdf([10.0, 20.0, math.inf, math.nan], [5, 10, 15, 25, 1e9])
    assert list(ecdf) == [0.0, 0.25, 0.25, 0.5, 0.5]


def test_the_kaplan_meier_median_is_finite_when_exactly_half_the_seeds_reach_the_target():
    # survival 3/4 after t = 1, 1/2 after t = 2: the median is 2 (np.median said inf)
    assert stats.km_median([1.0, 2.0, math.inf, math.inf], [9.0, 9.0, 10.0, 10.0])[0] == 2.0
    # a seed censored at 2 leaves two at risk: S(3) = 3/4 * 1/2 = 3/8, so the median is 3
    assert stats.km_median([1.0, 3.0, math.inf, math.inf], [9.0, 9.0, 2.0, 10.0])[0] == 3.0
    assert stats.km_median([1.0, math.inf, math.inf], [5.0, 5.0, 5.0])[0] == math.inf
    median, lo, hi = stats.km_median(np.arange(1.0, 9.0), np.full(8, 10.0))
    assert median == 4.0 and lo <= median <= hi


def test_the_scipy_floor_is_enforced_at_import_in_one_line(monkeypatch):
    monkeypatch.setattr(scipy, "__version__", "1.14.1")
    with pytest.raises(ImportError) as refused:
        importlib.reload(stats)
    assert str(refused.value) == "analysis needs scipy >= 1.15 (found 1.14.1): pip install 'scipy>=1.15'"
    monkeypatch.undo()
    importlib.reload(stats)


# -- claims ---------------------------------------------------------------------------------------
BUDGET = Budget("trials", 24, "test")


def per_study(samples: dict[str, np.ndarray]) -> pd.DataFrame:
    frame = pd.DataFrame([{"arm": arm, "seed": s, BUDGET.column: v} for arm, xs in samples.items()
                          for s, v in enumerate(xs)])
    frame.attrs["budgets"] = [BUDGET]
    return frame


def per_study_frame(values: pd.DataFrame) -> pd.DataFrame:
    frame = values.rename(columns={"value": BUDGET.column})
    frame.attrs["budgets"] = [BUDGET]
    return frame


def test_two_arms_from_one_distribution_get_no_difference_detected():
    rng = np.random.default_rng(7)
    draws, false_claims = 40, 0
    for _ in range(draws):
        table = claims.claims(per_study({"tpe": rng.normal(1.75, 0.006, 8), "random": rng.normal(1.75, 0.006, 8)}))
        false_claims += int(table["supported"].sum())
        assert all(c.startswith(("no difference detected", "conflicting evidence"))
                   for c in table.loc[~table["supported"], "claim"])
    assert false_claims / draws <= 0.1  # alpha 0.05 over the family


def test_a_clear_difference_is_claimed_with_its_interval_p_and_n_per_arm():
    rng = np.random.default_rng(3)
    b = rng.normal(1.75, 0.006, 8)
    table = claims.claims(per_study({"tpe": b - 0.02 + rng.normal(0, 0.001, 8), "random": b}), unit="slot-h")
    row = table.iloc[0]
    assert row["supported"] and row["a"] == "tpe" and row["n"] == 8 and row["budget"] == "equal trials (24 per study)"
    # every seed pair favours tpe: exact one-sided p = 1/256, Holm over the 2 ordered pairs doubles it
    assert row["p"] == pytest.approx(1 / 256) and row["p_holm"] == pytest.approx(2 / 256)
    assert row["claim"].startswith("tpe < random at equal trials (24 per study): Δ = −0.02")
    assert row["claim"].endswith("wilcoxon p = 0.008 (Holm), 8 seed pairs (tpe: n = 8; random: n = 8)")
    assert row["delta_lo"] <= row["delta"] <= row["delta_hi"] < 0


def test_a_significant_difference_below_the_noise_floor_is_not_claimed():
    b = np.linspace(1.74, 1.76, 8)
    table = claims.claims(per_study({"tpe": b - 0.001, "random": b}), noise_floor=0.006)
    assert not table["supported"].any()
    assert "below the noise floor σ = 0.0060" in table["claim"].iloc[0]
    # without a measured floor the same data is a claim: every seed moved the same way
    assert claims.claims(per_study({"tpe": b - 0.001, "random": b}))["supported"].all()


def test_a_significant_test_with_a_zero_mean_difference_reads_conflicting_not_identical():
    # 11 seeds a little better for tpe, one much worse: Wilcoxon favours tpe, the mean difference is 0
    b = np.linspace(1.74, 1.76, 12)
    d = np.array([-0.001] * 11 + [0.011])
    table = claims.claims(per_study({"tpe": b + d, "random": b}))
    row = table.iloc[0]
    p = sps.wilcoxon(np.round(d, 12), alternative="less", zero_method="pratt").pvalue
    p_holm = multipletests([p, sps.wilcoxon(-np.round(d, 12), alternative="less", zero_method="pratt").pvalue],
                           method="holm")[1][0]
    assert p_holm < 0.05 and row["p_holm"] == pytest.approx(p_holm) and row["delta"] == pytest.approx(0, abs=1e-12)
    assert row["verdict"] == "conflicting evidence" and not row["supported"]
    assert row["claim"].startswith("conflicting evidence between tpe and random")
    assert "identical on every seed" not in row["claim"] and "the test favours tpe" in row["claim"]
    # every seed equal is what "identical" means
    same = claims.claims(per_study({"tpe": b, "random": b})).iloc[0]
    assert same["claim"].startswith("no difference detected") and same["claim"].endswith("identical on every seed")


def test_three_seeds_cannot_make_a_claim_and_the_table_says_why_and_names_missing_seeds():
    table = claims.claims(per_study({"tpe": np.array([1.0, 1.1, 1.2, np.nan]), "random": np.array([2.0, 2.1, 2.2, 2.3])}))
    row = table.iloc[0]
    assert row["n"] == 3 and row["n_missing"] == 1 and not row["supported"]
    assert "(tpe: n = 3, missing seed 3 (no result); random: n = 4)" in row["claim"]
    assert "smallest possible Holm p = 0.25" in row["claim"]
