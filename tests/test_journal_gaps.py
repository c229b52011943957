"""The journal notices a line that is gone, not only a damaged one: lines are numbered and chained,
a folder with trials but no header is refused, and a trial folder whose result the journal does not
name is taken back only if its signed record proves it (refused with its path otherwise). Each
end-to-end test deletes real lines of a real study's journal and runs the same command again."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from study.journal import Journal, JournalDamaged, JournalState, encode
from tests.conftest import TINY, run_arena, sqlite_uri
from tests.test_reliability import journal_of, measured_once, parents_and_children

NAME = "tpe-local-tiny-s0"


def journal_with(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    for i in range(n):
        journal.append("submitted", n=i)
    journal.close()
    return path


def rewrite(path: Path, edit) -> None:
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"".join(line + b"\n" for line in edit(lines)))


# -- the numbering and the chain, on their own ----------------------------------------------------
@pytest.mark.parametrize("deleted", [1, 3, 5])
def test_a_deleted_line_anywhere_but_the_end_is_refused_saying_it_is_missing(tmp_path, deleted):
    path = journal_with(tmp_path, 6)
    rewrite(path, lambda lines: lines[:deleted - 1] + lines[deleted:])
    with pytest.raises(JournalDamaged, match=f"line {deleted} is damaged .*1 line before it is missing"):
        Journal.read(path)


def test_a_repeated_line_and_two_swapped_lines_are_refused(tmp_path):
    path = journal_with(tmp_path, 4)
    rewrite(path, lambda lines: lines[:3] + [lines[2]] + lines[3:])
    with pytest.raises(JournalDamaged, match="line 4 is damaged .*record #2 again"):
        Journal.read(path)
    path = journal_with(tmp_path, 4)
    rewrite(path, lambda lines: [lines[0], lines[2], lines[1], lines[3]])
    with pytest.raises(JournalDamaged, match="line 2 is damaged"):
        Journal.read(path)


def test_lines_renumbered_by_hand_after_a_deletion_still_break_the_chain(tmp_path):
    """Whoever deletes a line and fixes every number and checksum after it is still caught."""
    path = journal_with(tmp_path, 4)

    def delete_and_renumber(lines):  # each line's number and own checksum fixed; its `prev` kept
        out = []
        for seq, line in enumerate(lines[:1] + lines[2:]):
            record = json.loads(line)
            prev = record.pop("prev")
            for key in ("seq", "crc"):
                record.pop(key)
            out.append(encode(record, seq, prev)[:-1])
        return out

    rewrite(path, delete_and_renumber)
    with pytest.raises(JournalDamaged, match="line 2 is damaged .*does not follow the line before it"):
        Journal.read(path)


def test_a_journal_written_before_numbering_resumes_and_numbers_what_follows(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"".join(encode({"event": "submitted", "n": i}) for i in range(2)))  # checksums, no numbers
    journal = Journal(path)
    journal.append("submitted", n=2)
    journal.close()
    assert [r["n"] for r in Journal.read(path)] == [0, 1, 2]
    assert json.loads(path.read_bytes().split(b"\n")[2])["seq"] == 2
    rewrite(path, lambda lines: lines[1:])  # a line of the old part deleted shifts the numbered one
    with pytest.raises(JournalDamaged, match="line 2 is damaged"):
        Journal.read(path)


# -- real deleted lines of a real study -----------------------------------------------------------
@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A real two-trial study, finished; each test damages a copy of it."""
    workdir = tmp_path_factory.mktemp("gaps")
    run_arena(workdir, *TINY, "launcher.slots=1", "study.max_trials=2", f"mlflow.tracking_uri={sqlite_uri(workdir)}",
              timeout=600)
    return workdir


def copy_of(finished_study: Path, tmp_path: Path) -> Path:
    subprocess.run(["cp", "-a", f"{finished_study}/.", str(tmp_path)], check=True)
    return journal_of(tmp_path, NAME)


def resume(tmp_path: Path, max_trials: int = 3) -> subprocess.CompletedProcess:
    return run_arena(tmp_path, *TINY, "launcher.slots=1", f"study.max_trials={max_trials}",
                     f"mlflow.tracking_uri={sqlite_uri(tmp_path)}", check=False, timeout=600)


def events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_bytes().split(b"\n") if line]


def refused(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["study", "submitted"])
def test_a_deleted_header_or_submitted_line_stops_the_resume_and_starts_nothing(finished_study, tmp_path, target):
    """A deleted `submitted` line used to make the resume run one trial more than asked and leave a
    result no record named; a deleted header, a second study over the first (two MLflow parents)."""
    path = copy_of(finished_study, tmp_path)
    index = events(path).index(target)
    rewrite(path, lambda lines: lines[:index] + lines[index + 1:])
    before, folders = path.read_bytes(), sorted(p.name for p in (path.parent / "trials").iterdir())

    line = refused(resume(tmp_path))
    assert f"line {index + 1} is damaged" in line and "missing" in line, line
    assert "delete line" not in line, "the message must not send users to delete lines by hand"
    assert path.read_bytes() == before
    assert sorted(p.name for p in (path.parent / "trials").iterdir()) == folders
    parents, children = parents_and_children(sqlite_uri(tmp_path))
    assert len(parents) == 1 and len(children) == 2


@pytest.mark.slow
def test_a_folder_with_trials_but_no_journal_is_refused_not_started_afresh(finished_study, tmp_path):
    path = copy_of(finished_study, tmp_path)
    path.unlink()
    line = refused(resume(tmp_path))
    assert "holds 2 trial folder(s) but no journal" in line, line
    assert not path.exists()
    parents, _ = parents_and_children(sqlite_uri(tmp_path))
    assert len(parents) == 1


@pytest.mark.slow
def test_a_result_whose_lines_were_lost_from_the_end_is_proven_and_counted_not_run_again(finished_study, tmp_path):
    """The journal lost its last lines (restored from an older backup, or a power cut inside the
    fsync window): the last trial's folder holds a result the journal does not name. Its signed
    record proves it, so it counts; the study asked for 2 trials and runs no third."""
    path = copy_of(finished_study, tmp_path)
    kinds = events(path)
    cut = len(kinds) - 1 - kinds[::-1].index("submitted")  # t0001's submitted line and all after it
    rewrite(path, lambda lines: lines[:cut])
    assert set(JournalState.load(path).trials) == {"t0000"}

    proc = resume(tmp_path, max_trials=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    js = JournalState.load(path)
    measured_once(js, 2)
    assert "recovered" in events(path)
    assert sorted(p.name for p in (path.parent / "trials").iterdir()) == ["t0000", "t0001"], "a trial ran again"
    assert js.results["t0001"].val_bpb == json.loads((path.parent / "trials/t0001/result.json").read_text())["val_bpb"]
    parents, children = parents_and_children(sqlite_uri(tmp_path))
    assert len(parents) == 1 and sorted(c.data.tags["arena.trial_id"] for c in children) == ["t0000", "t0001"]


@pytest.mark.slow
def test_a_result_the_journal_does_not_name_and_nothing_proves_is_refused_with_its_path(finished_study, tmp_path):
    path = copy_of(finished_study, tmp_path)
    kinds = events(path)
    cut = len(kinds) - 1 - kinds[::-1].index("submitted")
    rewrite(path, lambda lines: lines[:cut])
    result = path.parent / "trials" / "t0001" / "result.json"
    data = json.loads(result.read_text())
    data["val_bpb"] = 0.5  # edited by hand: the harness's signature no longer holds
    result.write_text(json.dumps(data))
    before = path.read_bytes()

    line = refused(resume(tmp_path, max_trials=2))
    assert str(result.parent) in line and "not signed by the trusted harness" in line, line
    assert "t0001.unrecorded" in line
    assert path.read_bytes() == before
    (result.parent).rename(result.parent.with_name("t0001.unrecorded"))  # the way out the message names
    proc = resume(tmp_path, max_trials=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    js = JournalState.load(path)
    measured_once(js, 2)
    assert "t0001" not in js.trials and "t0002" in js.results, "a set-aside folder's id was reused"
