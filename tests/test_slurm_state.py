"""Slurm's word on a job -> the trial's status, from squeue/sacct text as Slurm prints it: no cluster.

The same rules run against a real Slurm in tests/test_slurm.py; here every state, and the races
between the harness's result file and Slurm's final state, are checked one by one.
"""
from __future__ import annotations

import pytest

from launchers.slurm_state import (
    SACCT_FIELDS, SQUEUE_FIELDS, Patience, SlurmJob, apply_row, base_state, epoch, outcome, parse_rows,
)
from study.core import Slot
from study.records import Candidate, Result, Trial

NOW = 1_800_000_000.0
# `squeue -h --states=all -o '%i|%j|%T|%V|%S|%e|%N|%l'` under SLURM_TIME_FORMAT=%s
SQUEUE = """\
41|arena-t0000|RUNNING|1799999900|1799999910|1800003510|node1|1:00:00
42|arena-t0001|PENDING|1799999950|1800003600|1800007200||1:00:00
"""
# `sacct -X -n -P -o JobID,JobName,State,Submit,Start,End,ExitCode,NodeList,Timelimit`
SACCT = """\
41|arena-t0000|COMPLETED|1799999900|1799999910|1799999990|0:0|node1|01:00:00
43|arena-t0002|CANCELLED by 0|1799999900|1799999910|1799999950|0:15|node1|01:00:00
44|arena-t0003|TIMEOUT|1799999900|1799999910|1800000000|0:0|node1|00:01:00
45|arena-t0004|NODE_FAIL|1799999900|1799999910|1799999920|0:0|node2|01:00:00
46|arena-t0005|OUT_OF_MEMORY|1799999900|1799999910|1799999920|0:125|node1|01:00:00
47|arena-t0006|FAILED|1799999900|1799999910|1799999920|1:0|node1|01:00:00
"""


def job(job_id: str, index: int, **kw) -> SlurmJob:
    trial = Trial(trial_id=f"t{index:04d}", index=index, candidate=Candidate(source=""), objective={})
    return SlurmJob(trial, Slot(name="slurm0"), job_id, "", NOW - 100, f"arena-t{index:04d}", NOW - 100, **kw)


def polled(job_id: str, index: int, table: str, fields, **kw) -> SlurmJob:
    j = job(job_id, index, **kw)
    assert any(apply_row(j, row, NOW) for row in parse_rows(tuple(fields), table))
    return j


def test_rows_are_read_by_field_name():
    rows = parse_rows(tuple(SQUEUE_FIELDS), SQUEUE)
    assert [r["JobID"] for r in rows] == ["41", "42"]
    assert rows[0]["NodeList"] == "node1" and rows[1]["NodeList"] == ""
    assert base_state("CANCELLED by 0") == "CANCELLED" and base_state(None) is None
    assert epoch("1799999910") == 1799999910.0
    assert [epoch(v) for v in ("Unknown", "None", "N/A", "0", "", None)] == [None] * 6


def test_squeue_estimates_are_not_taken_for_times():
    running = polled("41", 0, SQUEUE, SQUEUE_FIELDS)
    assert running.state == "RUNNING" and running.info["Start"] == "1799999910" and "End" not in running.info
    pending = polled("42", 1, SQUEUE, SQUEUE_FIELDS)
    assert "Start" not in pending.info and "End" not in pending.info


def test_a_reused_job_id_of_another_job_is_ignored():
    stranger = job("41", 9)  # same id, another name: a wiped Slurm state handed it out again
    assert not any(apply_row(stranger, row, NOW) for row in parse_rows(SACCT_FIELDS, SACCT))
    assert stranger.state is None


@pytest.mark.parametrize("job_id, index, status, reason", [
    ("43", 2, "cancelled", "CANCELLED by 0"),
    ("44", 3, "timeout", "killed by Slurm at its time limit (00:01:00, Slurm job 44 TIMEOUT)"),
    ("45", 4, "lost", "NODE_FAIL on node2"),
    ("46", 5, "oom", "OUT_OF_MEMORY"),
    ("47", 6, "crash", "FAILED (exit 1:0) and the harness wrote no result.json"),
])
def test_a_final_state_without_a_result_file_is_the_trials_status(job_id, index, status, reason):
    result = outcome(polled(job_id, index, SACCT, SACCT_FIELDS), NOW, harness_result=None, last_answer=NOW,
                     evidence=lambda: "the log tail")
    assert result.status == status and reason in result.reason
    if status in ("oom", "crash"):
        assert result.error == "the log tail"


def test_the_harness_result_stands_once_written():
    ok = Result(status="ok", val_bpb=1.5)
    running = polled("41", 0, SQUEUE, SQUEUE_FIELDS)
    assert outcome(running, NOW, harness_result=ok, last_answer=NOW) is ok


def test_a_completed_job_gets_a_moment_for_its_result_file_to_show():
    completed = polled("41", 0, SACCT, SACCT_FIELDS)
    grace = Patience(result_grace_s=30)
    assert outcome(completed, NOW, harness_result=None, last_answer=NOW, patience=grace) is None
    late = outcome(completed, NOW + 31, harness_result=None, last_answer=NOW, patience=grace)
    assert late.status == "crash" and "COMPLETED" in late.reason


@pytest.mark.parametrize("answered, what", [(True, "not in squeue"), (False, "slurmctld does not answer")])
def test_a_job_slurm_stops_showing_is_lost_after_a_while(answered, what):
    running = polled("41", 0, SQUEUE, SQUEUE_FIELDS)
    later = NOW + 301
    assert outcome(running, NOW + 10, harness_result=None, last_answer=NOW + 10) is None
    result = outcome(running, later, harness_result=None, last_answer=later if answered else NOW)
    assert result.status == "lost" and what in result.reason


@pytest.mark.parametrize("state, cancel_requested, status, reason", [
    ("CANCELLED by 0", False, "cancelled", "CANCELLED by 0"),
    ("CANCELLED by 0", True, "cancelled", "CANCELLED by the study"),
    ("TIMEOUT", False, "timeout", "killed by Slurm at its time limit"),
    ("NODE_FAIL", False, "lost", "NODE_FAIL"),
    ("COMPLETED", False, "cancelled", "stopped by SIGTERM"),
    ("RUNNING", False, None, None),
])
def test_a_harness_that_saw_its_worker_signalled_defers_to_slurms_final_state(state, cancel_requested, status,
                                                                              reason):
    """scancel, the time limit and a failing node all SIGTERM every process of the job; when the
    worker gets it first, the harness writes `cancelled`, and Slurm's final state says which it was
    (the race that made CI call a study's cancel a crash, then a time limit a cancel)."""
    written = Result(status="cancelled", error="the worker was stopped by SIGTERM from outside (the job was cancelled)")
    j = job("42", 1, state=state, cancel_requested=cancel_requested)
    result = outcome(j, NOW, harness_result=written, last_answer=NOW)
    if status is None:
        assert result is None  # still running as far as Slurm knows: wait for its verdict
    else:
        assert result.status == status and reason in (result.reason or result.error)
