"""The end-of-study summary a person reads first: the best trials and where to look next."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_leaderboard(state, conf: dict, study_dir: Path, mirrored: bool, simulated: bool, top: int = 10) -> None:
    console = Console()
    ranked = sorted((tr for tr in state.history if tr[1].ok and tr[0].candidate.full_budget),
                    key=lambda tr: tr[1].score())
    table = Table(title=f"study {conf['study']['name']}: top {min(top, len(ranked))} of {len(state.history)} trials")
    for col in ("trial", "val_bpb", "steps", "train s", "device", "hypothesis"):
        table.add_column(col, justify="right" if col in ("val_bpb", "steps", "train s") else "left",
                         no_wrap=col == "hypothesis", overflow="ellipsis")
    for trial, result in ranked[:top]:
        table.add_row(trial.trial_id, f"{result.val_bpb:.4f}", str(result.num_steps or ""),
                      f"{result.training_seconds or 0:.1f}", result.device_kind or "",
                      (trial.candidate.hypothesis or "")[:70])
    console.print(table)
    counts = Counter(r.status for _, r in state.history)
    clock = " (simulated clock)" if simulated else ""
    console.print(f"statuses: {dict(counts)}  elapsed{clock}: {state.elapsed / 60:.1f} min  "
                  f"stopped: {state.stop_reason}")
    if state.best:
        console.print(f"best: {state.best[0].trial_id} val_bpb={state.best[1].val_bpb:.4f}  "
                      f"code: {study_dir / 'best_train.py'}  dir: {study_dir / 'best'}")
    if mirrored:
        uri = conf["mlflow"]["tracking_uri"]
        hint = (f"mlflow ui --backend-store-uri {uri} --port 5000" if not uri.startswith("http")
                else f"open {uri}")
        console.print(f"MLflow: {hint}  -> experiment '{conf['study']['experiment']}', run '{conf['study']['name']}'")
