"""The measured noise floor: σ of val_bpb when the same train.py is trained on different seeds,
per device kind, and the offset between kinds.

    python -m analysis.noise [objective=cpu] [launcher=...]     # run +experiment=noise, then measure
    python -m analysis.noise --study NOISE_STUDY --tracking-uri sqlite:///mlflow.db   # measure only

A gain smaller than σ is what re-running the same code gives, so analysis.claims refuses to call
it a difference, and a searcher can take its keep margin from it. The result is stored per
objective preset, device kind and code hash (store/<preset>/<kind>/<source_sha>.json, where any
study can read it with `lookup`), and logged on the noise study's MLflow parent run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import stats
from analysis.load import AnalysisError, load
from study.core import PROJECT_ROOT

DEFAULT_STORE = Path("noise_floor")
NOISE_EXPERIMENT = "autoresearch-arena-noise"


def measure(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (source_sha, device kind): n ok runs, n failed, mean, σ (sample std) with its
    chi-square 95% CI (stats.sigma_ci: 95% on normal noise, where a bootstrap of σ covers 76% at n = 8), and the offset of the mean from the reference kind (the kind with the most ok runs)."""
    done = trials[trials["t_finished"].notna() & trials["status"].ne("cancelled")]
    # the same seed twice on one kind is the same run twice, not two draws of the noise
    done = done.sort_values("trial_index").drop_duplicates(["source_sha", "device_kind", "seed"])
    rows = []
    for (sha, kind), g in done.groupby(["source_sha", "device_kind"]):
        ok = g["val_bpb"].dropna().to_numpy(dtype=float)
        sigma = float(np.std(ok, ddof=1)) if len(ok) > 1 else math.nan
        lo, hi = stats.sigma_ci(ok)
        rows.append({"source_sha": sha, "device_kind": kind, "n": len(ok), "n_failed": len(g) - len(ok),
                     "mean": float(ok.mean()) if len(ok) else math.nan, "sigma": sigma, "sigma_lo": lo, "sigma_hi": hi})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["reference_kind"] = out.groupby("source_sha")["device_kind"].transform(
        lambda k: k.loc[out.loc[k.index, "n"].idxmax()])
    ref_mean = out.set_index(["source_sha", "device_kind"])["mean"]
    out["offset_vs_reference"] = [m - ref_mean[(s, r)] for s, r, m in zip(out["source_sha"], out["reference_kind"], out["mean"])]
    return out


def save(store: str | Path, preset: str, row: pd.Series, study_id: str) -> Path:
    path = Path(store) / preset / str(row["device_kind"]) / f"{row['source_sha']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    record.update(preset=preset, study_id=study_id, measured_at=dt.datetime.now(dt.timezone.utc).isoformat())
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def lookup(store: str | Path, preset: str, device_kind: str, source_sha: str | None = None) -> dict | None:
    """The stored floor for a preset and device kind: of this exact code if given and measured,
    else the latest of any code on that preset and kind."""
    folder = Path(store) / preset / device_kind
    if source_sha and (folder / f"{source_sha}.json").is_file():
        return json.loads((folder / f"{source_sha}.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return max(records, key=lambda r: r.get("measured_at", ""), default=None)


def floor_for(store: str | Path, preset: str, device_kinds: list[str]) -> tuple[float | None, str]:
    """The floor a comparison on these kinds uses: the largest σ among them (the noisiest kind
    bounds what can be told apart), and a note saying where it came from."""
    found = {k: r for k in device_kinds if (r := lookup(store, preset, k)) and not math.isnan(r.get("sigma", math.nan))}
    if not found:
        return None, ""
    kind, rec = max(found.items(), key=lambda kv: kv[1]["sigma"])
    missing = sorted(set(device_kinds) - set(found))
    note = (f"measured on {preset}/{kind}, code {rec['source_sha']}, n = {rec['n']}, study {rec['study_id']}"
            + (f"; no floor measured for {missing}" if missing else ""))
    return float(rec["sigma"]), note


def display_note(store: str | Path, preset: str, device_kinds: list[str]) -> str:
    """' [noise floor σ 0.0060 on cpu]' for a study's live display, so a person watching a "new
    best" knows how big a gain must be to mean anything; '' when none is stored."""
    sigma, note = floor_for(store, preset, device_kinds)
    if sigma is None:
        return ""
    kinds = ", ".join(f"{k} {r['sigma']:.4f}" for k in device_kinds if (r := lookup(store, preset, k)))
    return f" [noise floor σ: {kinds}]"


def log_to_mlflow(tracking_uri: str, run_id: str, table: pd.DataFrame, files: list[Path]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for _, r in table.iterrows():
        for name in ("sigma", "mean", "offset_vs_reference", "n"):
            if not pd.isna(r[name]):
                client.log_metric(run_id, f"noise_{name}.{r['device_kind']}", float(r[name]))
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="noise_floor")


def run_noise_study(overrides: list[str]) -> dict:
    """`python run.py +experiment=noise overrides...`, as a user would type it; returns the
    resolved study config (name, MLflow experiment and URI, preset) to measure it afterwards."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = ["+experiment=noise", *overrides]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    study, uri = OmegaConf.to_container(cfg.study, resolve=True), cfg.mlflow.tracking_uri
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "run.py"), *overrides])
    if proc.returncode != 0:
        raise AnalysisError(f"the noise study failed (run.py exit {proc.returncode})")
    return {"study": study["name"], "experiment": study["experiment"], "tracking_uri": uri}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.noise", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the noise study (objective=, launcher=, seed=...)")
    p.add_argument("--study", help="measure this finished noise study (id or name) instead of running one")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default=NOISE_EXPERIMENT)
    p.add_argument("--store", default=str(DEFAULT_STORE), help="folder the floors are stored in")
    args = p.parse_args(argv)
    try:
        where = {"study": args.study, "experiment": args.experiment, "tracking_uri": args.tracking_uri}
        if not args.study:
            where = run_noise_study(args.overrides)
        studies, trials = load(where["tracking_uri"], where["experiment"], [where["study"]])
        table = measure(trials)
        if table.empty or table["n"].max() < 2:
            raise AnalysisError(f"study {where['study']} has fewer than 2 ok runs of one train.py on one kind: no spread")
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    study = studies.iloc[0]
    files = [save(args.store, str(study["objective"]), r, study["study_id"]) for _, r in table.iterrows()]
    log_to_mlflow(where["tracking_uri"], study["run_id"], table, files)
    print(f"noise floor of study {study['study_id']} (objective preset {study['objective']}):")
    print(table.drop(columns=["source_sha"]).to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    for f in files:
        print(f"stored: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
