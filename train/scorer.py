"""The trusted scorer: val_bpb of the exported model, computed in this process from data alone.

The worker hands over its trained model as a pure tensor program (train/export.py, read and checked
by train/graph.py): no pickle, no candidate code. This process evaluates it on every validation row
in one pass with prepare.evaluate_bpb, the fixed metric, whose causality checks are exact for a pure
function. It reads the validation tokens only after the worker's whole process tree is dead, so no
process that runs candidate code ever holds one.
"""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from train import graph, prepare
from train.contract import EVAL_LIMIT_KEYS, TrialFailed


def read_model(path: Path, max_bytes: int) -> bytes:
    """The exported model's bytes. The file is the sandbox's: opened without following a link (a
    symlink would make this process read any file of the host as the model, a FIFO would block it),
    and only a regular file of at most `max_bytes` is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TrialFailed("crash", "the worker said it finished but wrote no exported model") from None
    except OSError as e:
        raise TrialFailed("invalid", f"the exported model is not a regular file of the scratch ({e.strerror})") from None
    with os.fdopen(fd, "rb") as saved:
        info = os.fstat(saved.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            raise TrialFailed("invalid", f"the exported model is not a regular file of the scratch of at most "
                                         f"{max_bytes} bytes")
        raw = saved.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise TrialFailed("invalid", f"the exported model grew past {max_bytes} bytes while it was read")
    return raw


def limits(objective: dict, max_bytes: int) -> graph.Limits:
    """The objective's bounds on one exported program (objective.eval_limits), the tensors bounded by
    what the worker's scratch could hold."""
    given = objective.get("eval_limits") or {}
    return graph.Limits(**{k: given[k] for k in EVAL_LIMIT_KEYS if given.get(k) is not None},
                        max_tensor_bytes=max_bytes)


def load_program(raw: bytes, objective: dict, vocab_size: int, max_bytes: int,
                 deadline: float | None = None) -> graph.Program:
    """The checked program; past `deadline` (time.time(): the trial's hard limit) checking it or
    evaluating it is a timeout."""
    try:
        return graph.load(raw, limits(objective, max_bytes), vocab_size=vocab_size,
                          seq_len=objective["eval_seq_len"], deadline=deadline)
    except graph.GraphInvalid as e:
        raise TrialFailed("invalid", f"the exported model cannot be scored: {e}") from None
    except graph.OutOfTime as e:
        raise TrialFailed("timeout", str(e)) from None


def batch_rows(program: graph.Program, objective: dict) -> int:
    """Rows evaluated at once: the objective's eval_batch_size, fewer if a batch and its seam
    probes (1 + SEAMS_PER_ROW times the rows) would pass the memory the objective allows. Sized at
    the full length; a program that needs more at a shorter one (a prefix-only run) is refused in
    evaluate()."""
    budget = program.limits.max_memory_mb * (1 << 20)
    at_once = (1 + prepare.SEAMS_PER_ROW) * max(1, program.peak_memory_bytes)
    return max(1, min(int(objective["eval_batch_size"]), int(budget // at_once)))


def evaluate(program: graph.Program, data: prepare.DataSpec, objective: dict, device, log) -> dict:
    """val_bpb by the fixed metric; integrity failures are statuses."""
    import torch

    program.to(device)
    rows = batch_rows(program, objective)
    t0 = time.time()

    def check_lengths(lengths):
        try:
            program.check_lengths(lengths)
        except graph.GraphInvalid as e:
            raise TrialFailed("invalid", f"the exported model cannot be scored: {e}") from None
        budget = program.limits.max_memory_mb * (1 << 20)
        for length in lengths:  # a prefix-only run evaluates up to `rows` rows at once at its length
            if rows * program.checked[length] > budget:
                raise TrialFailed("invalid", f"the exported model cannot be scored: a row at length {length} needs "
                                             f"{program.checked[length] / (1 << 20):.0f} MB of intermediate tensors, more "
                                             f"than at the full length ({program.peak_memory_bytes / (1 << 20):.0f} MB) "
                                             f"by which {rows} rows a batch were sized ({program.limits.max_memory_mb:.0f} "
                                             "MB allowed in all)")

    try:
        scores = prepare.evaluate_bpb(program, data, objective["eval_tokens"], objective["eval_seq_len"], rows,
                                      torch.device(device), check_lengths=check_lengths)
    except graph.OutOfTime as e:
        raise TrialFailed("timeout", str(e)) from None
    except prepare.NonFinite as e:
        raise TrialFailed("nan", str(e)) from None
    except (prepare.NotCausal, graph.GraphInvalid) as e:
        raise TrialFailed("invalid", str(e)) from None
    except ValueError as e:
        raise TrialFailed("invalid", str(e)) from None
    except (RuntimeError, IndexError, TypeError) as e:  # an operator that refused its real inputs
        raise TrialFailed("invalid", f"the exported model failed on a validation row: "
                                     f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
    seconds = time.time() - t0
    log(f"harness: eval of {scores['tokens']} tokens ({scores['rows']} rows of {objective['eval_seq_len']}, "
        f"{scores['causality_checks']} causality checks, {rows} rows a batch) in {seconds:.2f} s")
    return {**scores, "eval_seconds": round(seconds, 3)}
