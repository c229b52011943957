"""The trusted side of training: serve the train split to the sandboxed worker, count what it
trains on, keep the clock, and end it when the budget is spent.

Every figure of a trial (steps, tokens, training seconds, CPU seconds, tokens/s) is counted here,
from the requests the worker makes and from the kernel, never taken from the worker: a step is a
`run.step` request, a token is one this side served. Past the budget no batch is served, and a
worker that does not hand its weights over soon after is stopped (`timeout`).
"""
from __future__ import annotations

import math
import select
import time

import numpy as np

from train import wire
from train.contract import TrialFailed

EXPLODING_STEPS = 10  # consecutive steps with a loss above 3x a uniform guess's end the trial as nan
HANDOVER_S = 10.0  # from the budget being spent to train() returning and the model being exported
# The allowance for what a time budget does not count (starting the worker, importing train.py,
# build_model, compiling, the warm-up steps): at most this fraction of the budget, and this many
# seconds. Without a cap it was free training time: a warm-up step that trains for minutes on the
# 64 batches it may draw before its first step.
WARMUP_FRACTION, WARMUP_LIMIT_S = 0.2, 60.0
DRAW_AHEAD = 8  # tokens drawn since the last step, in units of the largest step so far, before refusal
FIRST_STEP_BATCHES = 64  # batches before the first step (gradient accumulation), before refusal
MAX_BATCH_TOKENS = 1 << 24
# run.batches() iterators the harness keeps for one worker: each holds ~400 bytes here for a
# 60-byte request, so a worker asking for one per message could fill the trusted side's memory.
MAX_STREAMS = 1 << 16
LOG_EVERY_S = 5.0


class Ledger:
    """The trusted count of one trial's training. The first `warmup_steps` steps (compilation,
    allocator warm-up) do not count against a seconds or CPU-seconds budget; they do count as steps
    and tokens, since they train the model. What the uncounted start may take, from this ledger's
    creation (the worker's start) to the end of the warm-up, is `warmup_limit_s` (None: unbounded);
    beyond it the clock runs."""

    def __init__(self, budget_kind: str, budget: float, warmup_steps: int, vocab_size: int,
                 clock=time.perf_counter, cpu_seconds=lambda: 0.0, warmup_limit_s: float | None = None):
        self.kind, self.budget, self.warmup_steps, self.vocab_size = budget_kind, budget, warmup_steps, vocab_size
        self.clock, self.cpu, self.warmup_limit_s = clock, cpu_seconds, warmup_limit_s
        self._t_born, self._cpu_born = clock(), cpu_seconds()
        self.num_steps = self.drawn = self.stepped_tokens = self.largest_step = 0
        self.seq_len = None
        self._warm_tokens = 0
        self._t_counted = self._cpu_counted = self._t_end = self._cpu_end = None
        self._high_loss_steps = 0
        self.done_at = self._spent_seen = self.warmup_seconds = self.handover_seconds = None
        self.refused = None  # why a batch was refused, if one was: such a trial is never `ok`

    def start(self) -> None:
        """The first batch is asked for: with no warm-up steps, the clock starts here."""
        if self._t_counted is None and self.warmup_steps == 0:
            self._start_clocks(self.clock())

    def draw(self, batch_size: int, seq_len: int) -> str | None:
        """Account for a batch about to be served; the reason it is refused, if it is."""
        if self.done_at is not None:
            return "run.step() already said the budget is spent: no more batches"
        since_step, batch = self.drawn - self.stepped_tokens, batch_size * seq_len
        cap = DRAW_AHEAD * max(self.largest_step, batch) if self.num_steps else FIRST_STEP_BATCHES * batch
        if since_step + batch > cap:
            self.refused = (f"{since_step} tokens drawn since the last run.step() (at most {cap} allowed): "
                            "call run.step() once per optimizer step")
            return self.refused
        self.seq_len = max(self.seq_len or 0, seq_len)
        self.drawn += batch_size * seq_len
        return None

    def step(self, loss) -> bool:
        """Count one optimizer step; True once the budget is spent."""
        try:
            loss = float(loss)
        except (TypeError, ValueError, OverflowError):  # the worker's JSON: an int of 400 digits is valid
            loss = math.nan
        now = self.clock()
        self.num_steps += 1
        self.largest_step = max(self.largest_step, self.drawn - self.stepped_tokens)
        self.stepped_tokens = self.drawn
        if not math.isfinite(loss):
            raise TrialFailed("nan", f"loss is {loss} at step {self.num_steps}")
        if self.num_steps > self.warmup_steps and loss > 3 * math.log(self.vocab_size):
            self._high_loss_steps += 1
            if self._high_loss_steps >= EXPLODING_STEPS:
                raise TrialFailed("nan", f"loss exploding: {loss:.2f} for {EXPLODING_STEPS} steps "
                                         f"(step {self.num_steps})")
        else:
            self._high_loss_steps = 0
        if self.num_steps == self.warmup_steps:
            self._start_clocks(now)
            self._warm_tokens = self.stepped_tokens
        done = self.progress >= 1.0
        if done and self.done_at is None:
            self._t_end, self._cpu_end, self.done_at = now, self.cpu(), now
        return done

    def _start_clocks(self, now: float) -> None:
        """The counted clocks start now, or earlier by what the start took beyond its allowance."""
        cpu, limit = self.cpu(), self.warmup_limit_s
        self.warmup_seconds = now - self._t_born
        self._t_counted = now if limit is None else self._t_born + min(now - self._t_born, limit)
        self._cpu_counted = cpu if limit is None else self._cpu_born + min(cpu - self._cpu_born, limit)

    @property
    def progress(self) -> float:
        """Fraction of the budget spent, 0..1: the clock for learning-rate schedules."""
        spent = {"steps": lambda: self.num_steps, "tokens": lambda: self.stepped_tokens,
                 "seconds": lambda: self.training_seconds, "cpu_seconds": lambda: self.cpu_seconds}[self.kind]()
        return min(1.0, spent / self.budget)

    @property
    def training_seconds(self) -> float:
        if self._t_counted is None:  # still starting: only what exceeds the allowance counts
            return 0.0 if self.warmup_limit_s is None else max(0.0, self.clock() - self._t_born - self.warmup_limit_s)
        return (self._t_end or self.clock()) - self._t_counted

    @property
    def cpu_seconds(self) -> float:
        if self._cpu_counted is None:
            return 0.0 if self.warmup_limit_s is None else max(0.0, self.cpu() - self._cpu_born - self.warmup_limit_s)
        return (self._cpu_end if self._cpu_end is not None else self.cpu()) - self._cpu_counted

    def overdue(self) -> str | None:
        """Why the worker must be stopped now, if it must: it kept going well past its budget."""
        now = self.clock()
        if self.done_at is not None and now - self.done_at > HANDOVER_S:
            return f"train() did not return within {HANDOVER_S:.0f} s of run.step() saying the budget was spent"
        if self.kind in ("seconds", "cpu_seconds") and self.done_at is None and self.progress >= 1.0:
            self._spent_seen = self._spent_seen or now
            if now - self._spent_seen > HANDOVER_S:
                return f"trained {HANDOVER_S:.0f} s past its {self.budget} {self.kind} budget without calling run.step()"
        return None

    def uncounted(self) -> str | None:
        """Why a finished train() overdrew, if it did: under a tokens budget the tokens it drew after
        its last run.step() (up to DRAW_AHEAD steps' worth, trained on and never counted) would go
        past the budget; one step's worth is a prefetch left unused."""
        unstepped = self.drawn - self.stepped_tokens
        if self.kind == "tokens" and unstepped > self.largest_step:
            return (f"train() drew {unstepped} tokens after its last run.step() and returned without counting "
                    f"them (at most one step's worth, {self.largest_step}, may be left unused)")
        return None

    def stats(self) -> dict:
        seconds = self.training_seconds
        counted = self.stepped_tokens - self._warm_tokens
        return {
            "num_steps": self.num_steps,
            "tokens": self.drawn,
            "training_seconds": round(seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "tokens_per_second": round(counted / seconds, 1) if seconds > 0 else None,
            "warmup_seconds": None if self.warmup_seconds is None else round(self.warmup_seconds, 3),
            "handover_seconds": None if self.handover_seconds is None else round(self.handover_seconds, 3),
        }


def warmup_limit(objective: dict) -> float | None:
    """The start's allowance under a time budget (objective.warmup_limit_s, or the default)."""
    if objective["budget_kind"] not in ("seconds", "cpu_seconds"):
        return None
    given = objective.get("warmup_limit_s")
    return float(given) if given is not None else min(WARMUP_LIMIT_S, WARMUP_FRACTION * float(objective["budget"]))


def batch_stream(train_tokens: np.ndarray, seed: int, stream: int, batch_size: int, seq_len: int):
    """Random windows of the train split, [batch_size, seq_len + 1] int64, forever: the same
    sequence for the same seed and stream (the order of run.batches calls)."""
    rng = np.random.default_rng([seed, stream])
    window = np.arange(seq_len + 1)
    while True:
        starts = rng.integers(0, len(train_tokens) - seq_len, size=batch_size)
        yield train_tokens[starts[:, None] + window].astype(np.int64)


def serve_training(worker, ledger: Ledger, train_tokens: np.ndarray, seed: int, deadline: float, log,
                   watch=lambda force=False: None, log_step=None, limit_s: float | None = None) -> None:
    """Answer the worker until it hands its weights over; raise TrialFailed for every other end.
    `deadline` is the hard limit on the wall clock (time.time()), `limit_s` its length for the
    message; `watch` samples whatever this side
    watches while the worker trains (forced when the worker reports a failure); `log_step` takes
    the step lines (default: `log`). Every read and write of the socket ends by the deadline: a
    worker that never read a batch it asked for, or sent half a message, held the harness for good."""
    try:
        _serve(worker, ledger, train_tokens, seed, deadline, log, watch, log_step, limit_s)
    except TimeoutError:
        raise TrialFailed("timeout", "killed at the hard limit" + (f" of {limit_s:g} s" if limit_s else "")
                          + ": the worker stopped half-way through a message") from None


def _serve(worker, ledger: Ledger, train_tokens: np.ndarray, seed: int, deadline: float, log, watch, log_step,
           limit_s: float | None) -> None:
    log_step = log_step or log
    streams: list = []
    said_started = said_exporting = False
    last_log = time.perf_counter()
    while True:
        watch()
        if time.time() >= deadline:
            raise TrialFailed("timeout", "killed at the hard limit" + (f" of {limit_s:g} s" if limit_s else ""))
        if why := ledger.overdue():
            raise TrialFailed("timeout", why)
        if not select.select([worker.sock], [], [], 0.1)[0]:
            continue
        worker.sock.settimeout(max(0.01, deadline - time.time()))  # for this request and its answer
        try:
            request, _, _ = wire.recv(worker.sock)
        except (wire.HungUp, ConnectionError):
            raise WorkerGone() from None
        except wire.WireError as e:
            raise TrialFailed("crash", f"the worker sent the harness something that is not a request ({e})") from None
        op = request.get("op")
        if op == "started":  # the worker's word, good for one log line only (not one per message)
            if not said_started:
                log("harness: worker: the model is built, train() starts")
            said_started = True
        elif op == "exporting":  # the worker's word again: one log line, and the hand-over clock runs on
            if not said_exporting:
                log("harness: worker: train() returned, exporting the model")
            said_exporting = True
        elif op == "batches":
            batch_size, seq_len = request.get("batch_size"), request.get("seq_len")
            if not all(type(v) is int and v >= 1 for v in (batch_size, seq_len)) \
                    or batch_size * (seq_len + 1) > MAX_BATCH_TOKENS:
                raise TrialFailed("invalid", f"run.batches({batch_size!r}, {seq_len!r}): need positive ints, "
                                             f"at most {MAX_BATCH_TOKENS} tokens a batch")
            if seq_len + 1 > len(train_tokens):
                raise TrialFailed("invalid", f"seq_len {seq_len} is longer than the train split "
                                             f"({len(train_tokens)} tokens)")
            if len(streams) >= MAX_STREAMS:
                raise TrialFailed("invalid", f"run.batches() was called {MAX_STREAMS + 1} times: make an iterator "
                                             f"once and draw from it (at most {MAX_STREAMS})")
            streams.append((batch_stream(train_tokens, seed, len(streams), batch_size, seq_len), batch_size, seq_len))
            if len(streams) == 1:
                log(f"harness: train() asked for batches of {batch_size} x {seq_len} tokens")
            ledger.start()
            wire.send(worker.sock, {"stream": len(streams) - 1})
        elif op == "next":
            index = request.get("stream")
            if not isinstance(index, int) or not 0 <= index < len(streams):
                raise TrialFailed("crash", f"asked for a batch of stream {index!r}, which run.batches() never made")
            stream, batch_size, seq_len = streams[index]
            refused = ledger.draw(batch_size, seq_len)
            if refused:
                wire.send(worker.sock, {"refused": refused})
            else:
                wire.send(worker.sock, {}, memoryview(next(stream)).cast("B"))
        elif op == "step":
            done = ledger.step(request.get("loss"))
            wire.send(worker.sock, {"done": done})
            now = time.perf_counter()
            if done or now - last_log >= LOG_EVERY_S:
                last_log = now
                log_step(f"step={ledger.num_steps} loss={float(request.get('loss'))} progress={ledger.progress:.3f} "
                    f"training_seconds={ledger.training_seconds:.2f}")
        elif op == "progress":
            wire.send(worker.sock, {"progress": ledger.progress})
        elif op == "finished":
            if ledger.done_at is not None:
                ledger.handover_seconds = ledger.clock() - ledger.done_at
            if ledger.num_steps == 0 or ledger.seq_len is None:
                raise TrialFailed("invalid", "train() returned without drawing a batch and calling run.step()")
            if ledger.refused:
                raise TrialFailed("invalid", f"train() went on training without counting its steps: {ledger.refused}")
            if why := ledger.uncounted():
                raise TrialFailed("invalid", why)
            return
        elif op == "failed":
            watch(force=True)
            raise WorkerFailed(request.get("status"), str(request.get("error") or "")[-4000:])
        else:
            raise TrialFailed("crash", f"the worker sent an unknown request {op!r}")


class WorkerGone(Exception):
    """The worker's socket closed without it handing the weights over: it died or was killed."""


class WorkerFailed(Exception):
    """The worker says train() or build_model() failed; `claimed` is its (untrusted) status."""

    def __init__(self, claimed, error: str):
        super().__init__(error)
        self.claimed = claimed
