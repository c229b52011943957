"""From MLflow to the statements a paper makes, each with its uncertainty.

load      MLflow -> one row per study, one row per trial (arms named by searcher, slots, preset, device)
budget    the one point (trials, charged compute or active study time) every study is compared at
curves    best-so-far staircases per study, seed means with t bands (anytime curves)
stats     CIs whose coverage is measured, paired one-sided tests with Holm, effect sizes, Friedman +
          Nemenyi, censored ECDF and Kaplan-Meier median; seeds checked (one study each, matched arms)
claims    the sentences the data supports, "no difference detected" for the rest
ranks     average rank over compute, critical-difference diagram
ttt       time to target across seeds, unreached seeds kept in n
speedup   parallel over sequential, three ways
tables    per-study numbers at the comparison's budgets, mean/std and CI tables (Markdown, LaTeX, CSV)
noise     the measured noise floor per preset, device kind and code
report    python -m analysis.report: all of the above as Markdown + HTML, logged to MLflow
"""
