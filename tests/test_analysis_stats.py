"""analysis.stats and analysis.claims against cases computed by hand (exact Wilcoxon tails, Holm's
steps, Friedman's statistic, Demšar's critical differences) and against synthetic data whose truth
is known (coverage of a bootstrap CI, two arms drawn from one distribution)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import claims, stats


def test_wilcoxon_one_sided_p_is_the_exact_signed_rank_tail():
    # every seed better: only 1 of the 2^8 sign patterns is as extreme
    a = np.arange(8.0)
    assert stats.wilcoxon_less(a, a + np.arange(1, 9)) == pytest.approx(1 / 256)
    # d = -1..-7, +8: T+ = 8; subsets of {1..8} summing to <= 8: 1+1+1+2+2+3+4+5+6 = 25
    d = np.array([-1, -2, -3, -4, -5, -6, -7, 8.0])
    assert stats.wilcoxon_less(d, np.zeros(8)) == pytest.approx(25 / 256)
    assert stats.wilcoxon_less(np.ones(8), np.ones(8)) == 1.0


def test_permutation_test_is_exact_sign_flipping():
    # mean(d) < 0 with d = -1 x7 and +1 x1: patterns at least as negative have at most one +1 -> 9/256
    d = np.array([-1.0] * 7 + [1.0])
    assert stats.permutation_less(d, np.zeros(8)) == pytest.approx(9 / 256)


def test_holm_steps_down_and_stays_monotone():
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> kept at 0.06
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_effect_sizes():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0])
    assert stats.rank_biserial(a, b) == -1.0
    assert stats.rank_biserial(b, a) == 1.0
    # five tied seeds (ranks 1-5 share 3) and one win (rank 6): (0 - 6) / 21
    assert stats.rank_biserial([1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 2]) == pytest.approx(-6 / 21)
    # 1<2,1<3,1<4, 2=2 (half), 2<3,2<4, 3<4 + 3=3 (half): 6 + 2*0.5 = 7 of 9
    assert stats.probability_of_improvement(a, b) == pytest.approx(7 / 9)


def test_bootstrap_ci_contains_the_true_mean_at_the_stated_rate():
    rng = np.random.default_rng(1)
    draws = 300
    hits = 0
    for i in range(draws):
        x = rng.normal(1.75, 0.006, size=20)
        lo, hi = stats.bootstrap_ci(x, np.mean, seed=i, n_resamples=2000)
        hits += lo <= 1.75 <= hi
    # a percentile bootstrap at n = 20 covers ~93%; 300 draws put the rate within about +-0.04
    assert 0.88 <= hits / draws <= 0.99
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert stats.bootstrap_ci([1.0, 3.0, 2.0, 5.0]) == stats.bootstrap_ci([5.0, 2.0, 3.0, 1.0])
    assert all(math.isnan(v) for v in stats.bootstrap_ci([2.0]))  # one seed has no interval
    assert all(math.isnan(v) for v in stats.bootstrap_ci([]))


def test_arm_summary_counts_missing_seeds_and_brackets_each_aggregate():
    values = pd.DataFrame({"arm": ["a"] * 5, "seed": range(5), "value": [1.0, 2.0, 3.0, 4.0, np.nan]})
    row = stats.arm_summary(values).loc["a"]
    assert row["n"] == 4 and row["n_missing"] == 1
    assert row["mean"] == 2.5 and row["median"] == 2.5 and row["iqm"] == pytest.approx(2.5)
    for agg in ("mean", "median", "iqm"):
        assert row[f"{agg}_lo"] <= row[agg] <= row[f"{agg}_hi"]


def test_friedman_statistic_and_nemenyi_critical_difference_match_the_hand_computed_values():
    # 3 arms, 4 seeds, always ranked a < b < c: chi2 = 12/(4*3*4) * (4^2 + 8^2 + 12^2) - 3*4*4 = 8
    rows = [{"arm": arm, "seed": s, "value": base + 0.01 * s} for s in range(4)
            for arm, base in (("a", 1.0), ("b", 2.0), ("c", 3.0))]
    rows.append({"arm": "a", "seed": 9, "value": 0.5})  # a seed b and c lack: dropped and counted
    f = stats.friedman_nemenyi(pd.DataFrame(rows))
    assert f.avg_rank == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert f.n_blocks == 4 and f.n_dropped == 1
    assert f.statistic == pytest.approx(8.0)
    assert f.p == pytest.approx(math.exp(-4))
    # Demšar (2006), Table 5: q_0.05 = 2.343 (k=3), 2.728 (k=5)
    assert f.cd == pytest.approx(2.343 * math.sqrt(3 * 4 / (6 * 4)), rel=1e-3)
    assert stats.nemenyi_cd(5, 8) == pytest.approx(2.728 * math.sqrt(5 * 6 / 48), rel=1e-3)


def test_censored_ecdf_keeps_seeds_that_never_reached_the_target_in_the_denominator():
    ecdf = stats.censored_ecdf([10.0, 20.0, math.inf, math.nan], [5, 10, 15, 25, 1e9])
    assert list(ecdf) == [0.0, 0.25, 0.25, 0.5, 0.5]


def test_bootstrap_band_brackets_the_mean_curve():
    rng = np.random.default_rng(0)
    curves = rng.normal(0, 1, size=(5, 8)) + np.arange(5)[:, None]
    lo, hi = stats.bootstrap_band(curves)
    assert np.all(lo <= curves.mean(axis=1)) and np.all(curves.mean(axis=1) <= hi)


def per_study(samples: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame([{"arm": arm, "seed": s, "best_at_equal_gpu_h": v, "best_at_equal_wall": v}
                         for arm, xs in samples.items() for s, v in enumerate(xs)])


def test_two_arms_from_one_distribution_get_no_difference_detected():
    rng = np.random.default_rng(7)
    draws, false_claims = 40, 0
    for _ in range(draws):
        table = claims.claims(per_study({"tpe": rng.normal(1.75, 0.006, 8), "random": rng.normal(1.75, 0.006, 8)}))
        false_claims += int(table["supported"].sum())
        assert all(c.startswith("no difference detected") for c in table.loc[~table["supported"], "claim"])
    assert false_claims / (2 * draws) <= 0.1  # alpha 0.05 per pair and budget


def test_a_clear_difference_is_claimed_with_its_interval_p_and_n():
    rng = np.random.default_rng(3)
    b = rng.normal(1.75, 0.006, 8)
    table = claims.claims(per_study({"tpe": b - 0.02 + rng.normal(0, 0.001, 8), "random": b}), unit="slot-h")
    row = table[table["budget"] == "equal slot-h"].iloc[0]
    assert row["supported"] and row["a"] == "tpe" and row["n"] == 8
    # every seed pair favours tpe: exact one-sided p = 1/256, Holm over the 2 ordered pairs doubles it
    assert row["p"] == pytest.approx(1 / 256) and row["p_holm"] == pytest.approx(2 / 256)
    assert row["claim"].startswith("tpe < random at equal slot-h: Δ = −0.02")
    assert row["claim"].endswith("(Holm), n = 8")
    assert row["delta_lo"] <= row["delta"] <= row["delta_hi"] < 0


def test_a_significant_difference_below_the_noise_floor_is_not_claimed():
    b = np.linspace(1.74, 1.76, 8)
    table = claims.claims(per_study({"tpe": b - 0.001, "random": b}), noise_floor=0.006)
    assert not table["supported"].any()
    assert "below the noise floor σ = 0.0060" in table["claim"].iloc[0]
    # without a measured floor the same data is a claim: every seed moved the same way
    assert claims.claims(per_study({"tpe": b - 0.001, "random": b}))["supported"].all()


def test_three_seeds_cannot_make_a_claim_and_the_table_says_why_and_names_missing_seeds():
    table = claims.claims(per_study({"tpe": np.array([1.0, 1.1, 1.2, np.nan]), "random": np.array([2.0, 2.1, 2.2, 2.3])}))
    row = table.iloc[0]
    assert row["n"] == 3 and row["n_missing"] == 1 and not row["supported"]
    assert "1 seed(s) missing from one arm" in row["claim"]
    assert "smallest possible p = 0.125" in row["claim"]
