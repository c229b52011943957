"""How much of a difference is the hardware: the same candidate scored on different device kinds,
and a warning wherever a comparison mixes kinds.

A candidate is identified by `source_sha`, the hash of its exact train.py, so a classical
searcher's and an agent's candidates match alike. (SkyPilot saw the same config score ~0.005
better on an H200 than on an H100; under the simulated launcher an H200 slot's larger budget shows
up here the same way.)
"""
from __future__ import annotations

import pandas as pd


def kind_differences(trials: pd.DataFrame) -> pd.DataFrame:
    """For every candidate with ok results on more than one device kind: mean val_bpb per kind and
    its difference from the reference kind (the kind with the most ok trials overall; candidates
    never run on it have nothing to be compared with and are left out)."""
    ok = trials[(trials["status"] == "ok") & trials["val_bpb"].notna()]
    if "source_sha" not in ok or ok["source_sha"].isna().all():
        return pd.DataFrame(columns=["source_sha", "device_kind", "n", "val_bpb", "reference_kind", "diff_vs_reference"])
    ok = ok.dropna(subset=["source_sha", "device_kind"])
    reference = ok["device_kind"].value_counts().idxmax()
    per_kind = ok.groupby(["source_sha", "device_kind"])["val_bpb"].agg(n="size", val_bpb="mean").reset_index()
    kinds = per_kind.groupby("source_sha")["device_kind"].agg(set)
    shared = kinds[kinds.map(lambda k: len(k) > 1 and reference in k)].index
    per_kind = per_kind[per_kind["source_sha"].isin(shared)]
    if per_kind.empty:
        return per_kind.assign(reference_kind=reference, diff_vs_reference=0.0)
    ref_value = per_kind[per_kind["device_kind"] == reference].set_index("source_sha")["val_bpb"]
    per_kind = per_kind.assign(reference_kind=reference)
    per_kind["diff_vs_reference"] = per_kind["val_bpb"] - per_kind["source_sha"].map(ref_value)
    return per_kind.reset_index(drop=True)


def kind_summary(differences: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count of the per-candidate difference, per device kind."""
    other = differences[differences["device_kind"] != differences["reference_kind"]]
    return other.groupby(["device_kind", "reference_kind"])["diff_vs_reference"].agg(["mean", "std", "count"]).reset_index()


def mixed_kind_warnings(trials: pd.DataFrame) -> list[str]:
    """One line per study whose trials ran on more than one device kind, and one if the compared
    arms ran on different kinds: their val_bpb gaps then include hardware, not only search."""
    warnings = []
    for study_id, g in trials.groupby("study_id"):
        counts = g["device_kind"].dropna().value_counts()
        if len(counts) > 1:
            mix = ", ".join(f"{k} ({n} trials)" for k, n in counts.sort_index().items())
            warnings.append(f"study {study_id} mixes device kinds: {mix}; its val_bpb include hardware differences")
    kinds_per_arm = trials.dropna(subset=["device_kind"]).groupby("arm")["device_kind"].agg(lambda k: tuple(sorted(set(k))))
    if kinds_per_arm.nunique() > 1:
        detail = "; ".join(f"{arm}: {'+'.join(k)}" for arm, k in kinds_per_arm.items())
        warnings.append(f"compared arms ran on different device kinds ({detail})")
    return warnings
