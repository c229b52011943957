"""A trial's directory: the exact code that ran and everything needed to run it again anywhere."""
from __future__ import annotations

import json
import os
from pathlib import Path

from study.records import Trial
from train.contract import TRAIN_FILE, TRIAL_FILE
from train.integrity import ensure_study_key


def write_trial_dir(directory: Path, trial: Trial) -> Path:
    """Write the candidate (TRAIN_FILE) and its spec (TRIAL_FILE). The spec carries what the harness
    needs plus, for people, where the candidate came from; the harness reads only the spec keys."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ensure_study_key(directory.parent.parent)  # the harness signs the trial's result with it
    (directory / TRAIN_FILE).write_text(trial.candidate.source)
    spec = trial.harness_spec()
    spec["candidate"] = {
        "hypothesis": trial.candidate.hypothesis,
        "parent": trial.candidate.parent,
        "knobs": trial.candidate.knobs,
        "device_kind": trial.candidate.device_kind,
    }
    # The journal's record of the trial (its source is TRAIN_FILE): the harness signs this file with
    # its result, so a result whose journal line was lost can be proven and taken back on resume.
    record = {**trial.to_dict(), "directory": str(directory)}
    record["candidate"] = {**record["candidate"], "source": None}
    spec["record"] = record
    tmp = directory / f"{TRIAL_FILE}.tmp"
    tmp.write_text(json.dumps(spec, indent=2, default=str))
    os.replace(tmp, directory / TRIAL_FILE)
    return directory
