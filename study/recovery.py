"""The journal against the trial folders beside it, checked on every start under the study lock.

The journal numbers and chains its lines (study/journal.py), so a line lost from its middle is
refused; what it cannot see is a study folder without its header (a journal deleted, or its first
line) and lines lost from its end (a journal restored from an older backup, a power cut inside the
one-second fsync window). Both leave trial folders the journal does not name. Starting afresh over
them would make a second study in one folder (two MLflow parents, reused ids); ignoring a folder
that holds a result would run one trial more than the study asked for. So:

- a folder that holds trials but no readable header is refused with one line;
- a trial folder with a result the journal does not name is taken back only if its record can be
  proven: its trial.json carries the journal's record of the trial, and the trusted harness signed
  that file, train.py and the result under the study's key. Anything less is refused with the path.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from study.core import Slot
from study.journal import Event, Journal, JournalState
from study.loop import stamp
from study.records import Result, Trial
from train.contract import RESULT_FILE, TRAIN_FILE, TRIAL_FILE, result_key_path
from train.integrity import verify_result

log = logging.getLogger("arena")

SET_ASIDE = ".unrecorded"  # a trial folder renamed so by hand is left out (its id stays used)


class FolderRefused(ValueError):
    """The study folder holds trials its journal cannot account for: one line, nothing started."""


def reconcile(study_dir: Path, journal: JournalState) -> JournalState:
    """Refuse a folder whose trials the journal cannot account for; take back the results it can
    prove (journalled as `recovered`, then `submitted` and `finished`). Returns the journal as it
    now stands."""
    folders = trial_folders(study_dir)
    path = study_dir / "journal.jsonl"
    if journal.header is None:
        if journal.first_event is not None:
            raise FolderRefused(f"{path} does not start with the study's header (its first line was deleted); "
                                "nothing was started. Restore the journal from a backup")
        if folders:
            raise FolderRefused(f"{study_dir} holds {len(folders)} trial folder(s) but "
                                f"{'no journal' if not path.exists() else 'a journal without a header'}; "
                                "nothing was started (a new study here would mix with them). Restore "
                                f"{path.name} from a backup, or choose another study.name")
        return journal
    named = {Path(d).name for d in journal.directories}
    unnamed = [f for f in folders if f.name not in named and (f / RESULT_FILE).exists()]
    proven = []
    for folder in unnamed:
        trial, result, why = prove(folder, journal.header.get("clock_origin", 0.0))
        if why is None and trial.trial_id in journal.results:
            why = f"the journal already holds a result for {trial.trial_id}"
        if why is not None:
            raise FolderRefused(f"{folder} holds a result the journal does not name, and {why}; nothing was "
                                "started. Restore the journal from a backup, or rename the folder to "
                                f"{folder.name}{SET_ASIDE} to leave it out (its id is never reused)")
        proven.append((trial, result))
    if not proven:
        return journal
    writer = Journal(path)
    try:
        for trial, result in proven:
            writer.append(Event.RECOVERED, trial_id=trial.trial_id, directory=trial.directory)
            writer.append(Event.SUBMITTED, trial=trial.to_dict())
            writer.append(Event.FINISHED, trial_id=trial.trial_id, result=result.to_dict())
            log.warning("%s: its result was missing from the journal; its signed record proves it, so it "
                        "counts", Path(trial.directory).name)
    finally:
        writer.close()
    return JournalState.load(path)


def trial_folders(study_dir: Path) -> list[Path]:
    """Every attempt's folder under trials/, but those set aside by hand."""
    root = study_dir / "trials"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("t*") if p.is_dir() and not p.name.endswith(SET_ASIDE))


def prove(folder: Path, clock_origin: float) -> tuple[Trial | None, Result | None, str | None]:
    """The trial and result a folder's signed files prove, or why they prove nothing."""
    try:
        record = json.loads((folder / TRIAL_FILE).read_text())["record"]
        trial = Trial.from_dict(record)
        trial.candidate.source = (folder / TRAIN_FILE).read_text()
        data = json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, None, f"its {TRIAL_FILE} holds no readable record of the trial ({type(e).__name__}: {e})"
    if not result_key_path(folder).exists():
        return None, None, "the study has no result key to check its signature with"
    forged = verify_result(folder, data) if isinstance(data, dict) else f"{RESULT_FILE} is not an object"
    if forged:
        return None, None, forged
    if Path(trial.directory).name != folder.name:
        return None, None, f"its record names another folder ({trial.directory})"
    trial.directory = str(folder.resolve())  # where it is now (a study folder may have moved)
    finished = (folder / RESULT_FILE).stat().st_mtime  # when it finished, as an adopted trial's
    if trial.submitted_at is None:
        trial.submitted_at = finished - clock_origin
    result = stamp(Result.from_dict(data), trial, Slot(trial.slot or "?", trial.device_kind), now=finished,
                   clock_origin=clock_origin)
    return trial, result, None
