"""The Claude code-editor searcher: Claude edits train.py in waves, a population of elites keeps
what works, and no slot waits for the model while there is something it could run.

How the slots stay busy: `ask(n)` never waits for the model when it has something to hand out. It
returns at once what needs no model call (the baseline's noise seeds, the keep rule's
confirmation re-runs, the agent's re-runs) and the candidates the model already queued; a wave
(a fresh tool-use conversation, claude_wave.py) runs in the background and puts each candidate in
the queue the moment it is submitted, asking for more than the free slots so the queue stays
`queue_depth` deep (one candidate per slot by default). Only when there is nothing at all to hand
out does `ask` wait for the model, until the wave queues its first candidate (at most `idle_wait_s`
per call), which under a simulated clock is charged as the slots' idle time. `background: false` runs each wave in line instead (deterministic, one ask = one wave).

`propose(k, ctx, extra_context)` is the entry point for other searchers (a hybrid that wants "N
candidates from the agent given this context"): one wave, in line, its candidates returned, not
queued.

Around the model: the frontier and keep rule (claude_board.py), the analysis tool over the whole
history (claude_evidence.py), tools confined to this wave's candidate files (claude_tools.py,
claude_merge.py), dollars per call from a dated price table (claude_cost.py), and the real API's
rules (claude_api.py).

What ends the agent, and what only pauses it:
- An error that retrying cannot fix (auth, permission, billing, spend limit) ends it cleanly, and
  so does `max_usd`.
- Transient errors (429, 529, 5xx, timeouts, dropped connections) and waves every model refused
  never count as waves without ideas: the agent backs off (`wave_backoff_s` doubling to
  `max_backoff_s`) and gives up only after `give_up_after_s` of nothing but such failures. A
  refusal is first retried on the fallback models (claude_wave.py), so a refusal storm on one
  model is survived on the next.
- Its alive/stopped state and its failure streak live in `agent/state.json`, so a resumed study
  continues the agent where it was (a stopped agent stays stopped unless `revive`).

The agent knows its budget: each wave's state says the trials, study hours and dollars left and
which phase that makes it (explore early, confirm late). With two device kinds of different speed
it may screen a candidate on the slower one; the searcher promotes the promising ones to the
faster one itself (`promote_top` per wave, `promote_seeds` runs each), without a model call.

Everything the agent did is written under `<study>/agent/` (transcripts, costs, notes,
reflections, state, promotions), which the study uploads to MLflow. The API key is read from the
environment into the client and nowhere else.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import string
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anthropic
from anthropic.lib.middleware import BetaRefusalFallbackMiddleware

from searchers.claude_api import Clock, ModelSpec, check_model, with_breakpoints
from searchers.claude_board import ANY_KIND, BASELINE, CONFIRM, RERUN, Board, code_key, unified_diff
from searchers.claude_cost import Ledger, PriceBook, Prices, Tokens
from searchers.claude_tools import ToolError, tool_definitions
from searchers.claude_wave import Wave
from study.core import PROJECT_ROOT, SearchContext, Searcher
from study.records import INFRA_STATUSES, Candidate, Result, Trial

log = logging.getLogger("arena.claude")



class ClaudeSearcherError(RuntimeError):
    """A configuration the searcher cannot start with (no API key, unknown model price)."""


PROMISING = ("kept", "confirming", "elite", "diverse elite")  # decisions that earn a screened run its promotion


class ClaudeSearcher(Searcher):
    name = "claude"

    def __init__(self, *, model: str, prices: dict[str, dict[str, float]], max_usd: float,
                 models: dict[str, dict[str, Any]] | None = None, fallback_models: list | None = None,
                 inference_geo: str | None = None, regional_multiplier: dict[str, float] | None = None,
                 give_up_after_s: float = 3600.0, max_backoff_s: float = 300.0, truncation_max_tokens: int = 32000,
                 estimate_output_tokens_per_s: float = 50.0, study_max_trials: int | None = None,
                 study_max_hours: float | None = None, promote_top: int = 2, promote_seeds: int = 1,
                 diverse_elites: int = 2, diverse_z: float = 2.0, revive: bool = False, clock: Any = None,
                 noise_margin: float = 0.01, noise_z: float = 2.0, noise_seeds: int = 3,
                 noise_store: str | None = None, confirm_seeds: int = 2, max_elites: int = 4,
                 queue_depth: int | None = None, background: bool = True, idle_wait_s: float = 5.0,
                 max_sweep: int = 8, max_turns_per_wave: int = 40,
                 max_tokens: int = 16000, thinking: dict | None = None, effort: str | None = None,
                 max_retries: int = 6, timeout_s: float = 600.0, max_call_s: float = 900.0,
                 max_wave_s: float = 2400.0, max_refusals: int = 2, max_nudges: int = 2, max_failed_waves: int = 5,
                 wave_backoff_s: float = 30.0,
                 run_baseline: bool = True, notes_max_chars: int = 4000, view_max_characters: int = 40000,
                 editor_tool: str = "text_editor_20250728", system_cache_ttl: str = "1h",
                 program: str = "searchers/program.md", base_url: str | None = None,
                 prices_checked: str | None = None, name: str = "claude", http_client: Any = None):
        key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
        if not key:
            raise ClaudeSearcherError("ANTHROPIC_API_KEY is not set: export your Anthropic API key to use "
                                      "searcher=claude (no trial was started)")
        if max_usd <= 0:
            raise ClaudeSearcherError(f"max_usd must be > 0, not {max_usd}")
        if noise_margin < 0 or confirm_seeds < 0 or max_turns_per_wave < 1 or noise_seeds < 1 or max_elites < 1:
            raise ClaudeSearcherError("noise_margin and confirm_seeds must be >= 0; max_turns_per_wave, noise_seeds "
                                      "and max_elites >= 1")
        program_path = Path(program) if Path(program).is_absolute() else PROJECT_ROOT / program
        if not program_path.is_file():
            raise ClaudeSearcherError(f"program prompt {str(program_path)!r} is not a file")
        if give_up_after_s <= 0 or max_backoff_s < 0 or promote_top < 0 or promote_seeds < 1 or diverse_elites < 0:
            raise ClaudeSearcherError("give_up_after_s must be > 0, max_backoff_s, promote_top and diverse_elites "
                                      ">= 0, promote_seeds >= 1")
        self.fallbacks = _fallback_entries(fallback_models or [])
        self.fallback_model_names = [f["model"] for f in self.fallbacks]
        try:
            self.prices = Prices.for_model(prices, model)
            self.book = PriceBook(prices, [model, *self.fallback_model_names], regional_multiplier)
            self._check_models(models, model, max_tokens, truncation_max_tokens, thinking, effort)
        except ValueError as e:
            raise ClaudeSearcherError(str(e)) from None
        self.name = name
        self.model = model
        self.inference_geo = inference_geo
        self.give_up_after_s, self.max_backoff_s = float(give_up_after_s), float(max_backoff_s)
        self.truncation_max_tokens = int(truncation_max_tokens)
        self.estimate_output_tokens_per_s = float(estimate_output_tokens_per_s)
        self.study_max_trials = int(study_max_trials) if study_max_trials is not None else None
        self.study_max_hours = float(study_max_hours) if study_max_hours is not None else None
        self.promote_top, self.promote_seeds = int(promote_top), int(promote_seeds)
        self.diverse_elites, self.diverse_z = int(diverse_elites), float(diverse_z)
        self.revive = bool(revive)
        self.clock = clock or Clock
        self.max_usd = float(max_usd)
        self.noise_margin, self.noise_z, self.noise_seeds = float(noise_margin), float(noise_z), int(noise_seeds)
        self.noise_store = noise_store
        self.confirm_seeds = int(confirm_seeds)
        self.max_elites = int(max_elites)
        self.queue_depth = queue_depth
        self.background = bool(background)
        self.idle_wait_s = float(idle_wait_s)
        self.max_sweep = int(max_sweep)
        self.max_turns = int(max_turns_per_wave)
        self.max_tokens = int(max_tokens)
        self.thinking = thinking
        self.effort = effort
        self.max_nudges = int(max_nudges)
        self.max_refusals = int(max_refusals)
        self.timeout_s, self.max_call_s, self.max_wave_s = float(timeout_s), float(max_call_s), float(max_wave_s)
        self.max_failed_waves = int(max_failed_waves)
        self.wave_backoff_s = float(wave_backoff_s)
        self.run_baseline = bool(run_baseline)
        self.notes_max_chars = int(notes_max_chars)
        self.view_max_characters = int(view_max_characters)
        self.editor_tool = editor_tool
        self.system_cache_ttl = system_cache_ttl
        self.program_template = program_path.read_text()
        self.prices_checked = prices_checked
        self.max_retries = int(max_retries)
        middleware = [BetaRefusalFallbackMiddleware(self.fallbacks)] if self.fallbacks else []
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=max_retries,
                                          timeout=timeout_s, http_client=http_client, middleware=middleware)
        self.stop_reason: str | None = None
        self.lock = threading.RLock()  # the board, queue and files: tell (loop thread) vs tools (wave thread)
        self.issued: set[tuple] = set()  # confirmation and baseline jobs handed out, not yet told
        self.queue: list[Candidate] = []  # ready for a slot
        self.proposed: dict[str, Candidate] = {}  # handed out or queued, not yet told (code key -> candidate)
        self.failed_in_a_row = 0  # waves the API answered without a candidate (max_failed_waves)
        self.failing_waves = 0  # waves lost to transient errors or to refusals by every model, in a row
        self.failing_for_s = 0.0  # how long those have lasted (give_up_after_s)
        self.promoted: dict[str, int | None] = {}  # screened trial -> its wave, once promoted
        self.unpriced = (0.0, Tokens())  # spent since the last accepted candidate
        self._thinking: Future | None = None  # the background wave
        self.closed = False
        self.waits = 0  # asks that had nothing to hand out and waited for the model
        self._queued = threading.Event()  # set when a waiting ask has something to hand out
        self.handed_out: deque[float] = deque(maxlen=32)  # when queued candidates went to slots (the take rate)
        self.waited_s = 0.0

    # -- the Searcher interface ------------------------------------------------------------------
    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        self.dir = Path(ctx.study_dir) / "agent"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.dir / "costs.jsonl", self.book, self.estimate_output_tokens_per_s)
        self.kind_sensitive = ctx.objective.get("budget_kind") == "seconds"
        self.board = Board(ctx.baseline_source, noise_margin=self.noise_margin, confirm_seeds=self.confirm_seeds,
                           kind_sensitive=self.kind_sensitive, wait_for_baseline=self.run_baseline,
                           noise_z=self.noise_z, max_elites=self.max_elites, stored_sigma=self._stored_sigma(ctx),
                           diverse_elites=self.diverse_elites, diverse_z=self.diverse_z)
        for row in _read_jsonl(self.dir / "reflections.jsonl"):
            self.board.reflect(row["trial_id"], row["text"])
        self.notes_path = self.dir / "notes.md"
        self.notes = self.notes_path.read_text() if self.notes_path.exists() else ""
        self.prefix_key: str | None = None
        self.kinds: list[str] = sorted(ctx.device_kinds)
        self.waves = _read_jsonl(self.dir / "waves.jsonl")  # earlier waves, on resume
        self.queue_path = self.dir / "queue.jsonl"  # paid-for candidates no slot took yet survive a restart
        self.queue = [Candidate.from_dict(row) for row in _read_jsonl(self.queue_path)]
        self.proposed.update((code_key(c.source), c) for c in self.queue)
        self.promoted = {row["trial_id"]: row.get("wave") for row in _read_jsonl(self.dir / "promotions.jsonl")}
        self._load_state()
        if self.ledger.usd >= self.max_usd:
            self.stop(f"max_usd={self.max_usd} already spent (${self.ledger.usd:.2f})")

    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        self._collect_wave()
        with self.lock:
            out = self.ready(n, ctx)
            wanted = n - len(out) + self._queue_target(ctx) - len(self.queue)
        if not self.background:
            if n > len(out) and self.stop_reason is None:
                out += self._in_line_wave(n - len(out), ctx)
            return out
        if wanted > 0 and self._thinking is None and self.stop_reason is None:
            # a wave costs the model's latency whatever its size: ask for at least half a queue, so
            # waves keep up with the slots instead of trickling one candidate each
            self._start_wave(max(wanted, math.ceil(self._queue_target(ctx) / 2)), ctx)
        if not out and self._thinking is not None:  # nothing to hand out: the slots wait for the model
            started = time.monotonic()
            self._queued.clear()
            thinking = self._thinking
            thinking.add_done_callback(lambda _: self._queued.set())
            if not self.queue:  # until its first candidate is queued (or it ends), not until the wave ends
                self._queued.wait(timeout=self.idle_wait_s)
            self.waits += 1
            self.waited_s += time.monotonic() - started
            self._collect_wave()
            with self.lock:
                out = self.ready(n, ctx)
        return out

    def propose(self, k: int, ctx: SearchContext, extra_context: str = "") -> list[Candidate]:
        """One wave for `k` candidates, run now, returned (not queued); `extra_context` is added to
        the wave's opening state (e.g. what another searcher learned). Waits for a background wave
        first: one conversation at a time."""
        if self._thinking is not None:
            self._thinking.exception()
            self._collect_wave()
        if self.stop_reason is not None:
            return []
        return self._in_line_wave(k, ctx, extra_context)

    def tell(self, trial: Trial, result: Result) -> None:
        with self.lock:
            run = self.board.record(trial, result)
            c = trial.candidate
            self.proposed.pop(run.code, None)
            if result.status in INFRA_STATUSES:  # the infrastructure, not the candidate, failed: run it again
                self.issued.discard(_job_key(c, self.board))
                if c.meta.get("role") not in (BASELINE, CONFIRM):
                    free = {"agent_usd": 0.0, **dict.fromkeys(Tokens().as_meta(), 0), "requeued": trial.trial_id}
                    again = Candidate.from_dict({**c.to_dict(), "meta": {**c.meta, **free}})  # paid with the lost trial
                    self.queue.insert(0, again)
                    self.proposed[run.code] = again
            else:  # on resume, the journal may show that a queued candidate did run
                self.queue = [q for q in self.queue if code_key(q.source) != run.code
                              or (q.meta.get("role") != "agent" and q.seed != run.seed)]
            self._promote_screened()
            self._save_queue()
        log.info("%s %s %s", trial.trial_id, result.status, run.decision)

    def done(self) -> bool:
        """Stopped, nothing queued or thinking, and no re-run the keep rule still waits for."""
        return (self.stop_reason is not None and not self.board.challenges and not self.queue
                and self._thinking is None)

    def summary(self) -> dict[str, Any]:
        total = lambda key: sum(w.get(key, 0) for w in self.waves)  # noqa: E731
        kept = [i for i in self.board.kept if self.board.runs[i].role != BASELINE]
        tools = Counter()
        for w in self.waves:
            tools.update(w.get("tools", {}))
        refusals = Counter(r.get("category") or "uncategorised" for w in self.waves for r in w.get("refusals", []))
        return {
            "agent_usd_total": self.ledger.usd,
            # spent on candidates that never ran (queued when the study stopped) or after the last one
            "agent_usd_not_run": self.unpriced[0] + sum(c.meta.get("agent_usd", 0.0) for c in self.proposed.values()),
            "agent_calls": self.ledger.calls,
            **self.ledger.tokens.as_meta(),
            "agent_waves": len(self.waves),
            "agent_waves_skipped": sum(w["outcome"] != "ok" for w in self.waves),
            "agent_candidates": total("candidates"),
            "agent_reruns": total("reruns"),
            "agent_broken_submissions": total("broken"),
            "agent_refused_tool_calls": total("refused"),
            "agent_tool_errors": total("tool_errors"),
            "agent_truncated_replies": total("truncations"),
            "agent_empty_replies": total("empty_replies"),
            "agent_api_retries": total("api_retries"),  # timeouts, dropped connections, 429/5xx the SDK retried
            "agent_refusals": sum(refusals.values()),
            **{f"agent_refusals_{c}": n for c, n in refusals.items()},
            "agent_fallback_answers": sum(len(w.get("fallbacks", [])) for w in self.waves),
            "agent_refused_waves": sum(w["outcome"] == "refused" for w in self.waves),
            "agent_error_waves": sum(w["outcome"] == "error" for w in self.waves),
            "agent_blank_blocks_dropped": total("blank_blocks"),
            "agent_larger_retries": total("larger_retries"),
            "agent_context_resets": total("context_resets"),
            "agent_estimated_calls": self.ledger.estimated,
            "agent_promotions": len(self.promoted),
            **{f"agent_tool_{name}": n for name, n in tools.items()},
            "agent_kept": len(kept),
            "agent_elites": len(self.board.frontier()),
            "agent_idle_waits": self.waits,
            "agent_idle_wait_seconds": self.waited_s,
            "agent_stop_reason": self.stop_reason or "",
        }

    def close(self) -> None:
        """A wave still talking stops before its next call (its thread is a daemon: a call in
        progress never holds up the process's exit for more than a few seconds)."""
        self.closed = True
        self.client.close()
        if self._thinking is not None:  # give its transcript a moment to land before the study uploads agent/
            try:
                self._thinking.exception(timeout=10)
            except TimeoutError:
                log.warning("a wave was still talking when the study ended; its transcript may come later")

    # -- handing out -------------------------------------------------------------------------------
    def ready(self, n: int, ctx: SearchContext) -> list[Candidate]:
        """Up to n candidates that need no model call: baseline seeds, confirmations, the queue."""
        out: list[Candidate] = []
        in_flight = {_job_key(t.candidate, self.board) for t in ctx.in_flight}
        if self.run_baseline:
            tiers = [k for k in self.kinds] if self.kind_sensitive and self.kinds else [ANY_KIND]
            seeds = [ctx.seed + i for i in range(self.noise_seeds)]
            for tier, seed in self.board.baseline_seeds_due(tiers, seeds, self.issued | in_flight)[:n]:
                kind = None if tier == ANY_KIND else tier
                c = Candidate(source=ctx.baseline_source, seed=seed, device_kind=kind,
                              hypothesis=f"baseline: the unmodified train.py (seed {seed}, measures the noise)",
                              meta={"role": BASELINE, "agent_usd": 0.0})
                self.issued.add(_job_key(c, self.board))
                out.append(c)
        for job in self.board.confirmations_due(self.issued | in_flight)[: n - len(out)]:
            of = self.board.runs[job.of]
            why = "its fresh re-run" if job.of == job.challenger else f"the incumbent's re-run to pair with {job.challenger}"
            c = Candidate(source=job.source, knobs=dict(of.knobs), parent=job.of, seed=job.seed,
                          device_kind=job.device_kind, hypothesis=f"{why}, seed {job.seed} (keep rule)",
                          meta={"role": CONFIRM, "confirms": job.challenger, "agent_usd": 0.0})
            self.issued.add(job.key)
            out.append(c)
        while self.queue and len(out) < n:
            out.append(self.queue.pop(0))
            self.handed_out.append(time.monotonic())
        self._save_queue()
        return out

    def _queue_target(self, ctx: SearchContext) -> int:
        """At least one candidate ready per slot (a slot that frees while the model thinks takes
        one at once, and a queued candidate is no staler than the trials now running), and more
        when the slots take candidates faster than a wave makes them: enough to cover one and a
        half waves at the recent rate (waves slow down under load, trials finish in bursts), at
        most four per slot."""
        if self.queue_depth is not None:
            return int(self.queue_depth)
        slots = sum(int(spec.get("count", 1)) for spec in ctx.device_kinds.values()) or 1
        taken = list(self.handed_out)
        recent = [w["seconds"] for w in self.waves[-5:] if w.get("candidates")]
        if len(taken) < 4 or not recent or taken[-1] <= taken[0]:
            return slots
        rate = (len(taken) - 1) / (taken[-1] - taken[0])
        return min(4 * slots, max(slots, math.ceil(1.5 * rate * statistics.median(recent))))

    def _accept(self, wave: Wave, candidates: list[Candidate]) -> None:
        """Called by the wave's tools (under the lock): price, record and (in background) queue."""
        usd, tokens = self.unpriced
        self.unpriced = (0.0, Tokens())
        share = 1.0 / len(candidates)
        for c in candidates:
            c.meta["agent_usd"] = usd * share
            c.meta.update({k: v * share for k, v in tokens.as_meta().items()})
            self.proposed[code_key(c.source)] = c
        wave.accepted.extend(candidates)
        if wave.stream:
            self.queue.extend(candidates)
            self._save_queue()
            self._queued.set()

    def _queue_reruns(self, candidates: list[Candidate]) -> None:
        """Re-runs go ahead of the queued new ideas, behind earlier re-runs: they are evidence the
        agent asked for now (like the keep rule's confirmations), and at the back of a queue one
        slot deep they could wait out a whole study."""
        for c in candidates:
            c.meta["agent_usd"] = 0.0
        at = next((i for i, q in enumerate(self.queue) if "reruns" not in q.meta), len(self.queue))
        self.queue[at:at] = candidates
        self._save_queue()
        self._queued.set()

    def _save_queue(self) -> None:
        tmp = self.queue_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in self.queue))
        tmp.replace(self.queue_path)

    def _fresh_seeds(self, code: str, count: int) -> list[int]:
        """Seeds of `code` that no finished, running, queued or issued job uses: a re-run on a seed
        still in flight would be a duplicate, dropped when that trial reports."""
        used = {r.seed for r in self.board.runs.values() if r.code == code}
        used |= {c.seed for c in self.queue if c.seed is not None and code_key(c.source) == code}
        used |= {t.seed for t in self.ctx.in_flight if code_key(t.candidate.source) == code}
        for key in filter(None, self.issued):  # baseline seeds (tier, seed); confirmations (challenger, of, seed)
            of_code = self.board.baseline_code if len(key) == 2 else getattr(self.board.runs.get(key[1]), "code", None)
            if of_code == code:
                used.add(key[-1])
        seeds, s = [], self.ctx.seed
        while len(seeds) < count:
            s += 1
            if s not in used:
                seeds.append(s)
        return seeds

    def _reflect(self, trial_id: str, text: str) -> None:
        self.board.reflect(trial_id, text)
        with (self.dir / "reflections.jsonl").open("a") as f:
            f.write(json.dumps({"trial_id": trial_id, "text": text}) + "\n")

    # -- waves -------------------------------------------------------------------------------------
    def _start_wave(self, k: int, ctx: SearchContext) -> None:
        """A wave on a thread of its own. A wave the API failed (an outage, every model refusing)
        is followed by the next one on the same thread after its backoff, so the agent is back as
        soon as the API is, instead of at the next ask (and a storm does not drain the queue one
        ask per failed wave)."""
        future: Future = Future()
        in_flight = list(ctx.in_flight)

        def think() -> None:
            try:
                accepted = self._wave(k, ctx, in_flight, "", True)
                while not accepted and self.failing_waves and self.stop_reason is None and not self.closed:
                    with self.lock:  # the slots kept taking candidates while the API was down
                        size = max(k, self._queue_target(ctx) - len(self.queue))
                    accepted = self._wave(size, ctx, list(ctx.in_flight), "", True)
                future.set_result(accepted)
            except BaseException as e:  # noqa: BLE001 - handed to the loop's thread by _collect_wave
                future.set_exception(e)

        self._thinking = future
        threading.Thread(target=think, name="claude-wave", daemon=True).start()

    def _collect_wave(self) -> None:
        fut = self._thinking
        if fut is None or not fut.done():
            return
        self._thinking = None
        error = fut.exception()
        if error is not None:  # a bug in a wave ends the searcher, not the study
            log.error("claude wave failed: %s: %s", type(error).__name__, error)
            self.stop(f"wave failed: {type(error).__name__}: {error}")

    def _in_line_wave(self, k: int, ctx: SearchContext, extra: str = "") -> list[Candidate]:
        return self._wave(k, ctx, list(ctx.in_flight), extra, False)

    def _wave(self, k: int, ctx: SearchContext, in_flight: list[Trial], extra: str, stream: bool) -> list[Candidate]:
        paused = self._backoff_s()
        if paused:  # the API failed past the SDK's retries, or every model refused: give it time to pass
            self.clock.sleep(paused)
        with self.lock:
            self._stable_prefix(ctx)
            number = 1 + max((w["wave"] for w in self.waves), default=0)
            wave = Wave(self, number, k, in_flight, extra, stream)
        started, began = time.time(), self.clock.monotonic()
        outcome, reason = "ok", ""
        try:
            outcome, reason = wave.run()
        finally:
            if self.stop_reason is not None and outcome == "ok" and not wave.accepted:
                outcome, reason = "stopped", self.stop_reason
            self._write_wave(wave, outcome, reason, started)
        self._after_wave(wave, outcome, reason, paused + self.clock.monotonic() - began)
        return wave.accepted

    def _backoff_s(self) -> float:
        if not self.failing_waves:
            return 0.0
        return min(self.max_backoff_s, self.wave_backoff_s * 2 ** (self.failing_waves - 1))

    def _after_wave(self, wave: Wave, outcome: str, reason: str, seconds: float) -> None:
        """Transient errors and refusals by every model are failures of the API, not of the
        agent's ideas: they extend the failure streak (backoff, give_up_after_s) and never count
        toward max_failed_waves. Any other answered wave ends the streak."""
        if outcome in ("error", "refused"):
            if wave.answered_ok:  # the API worked during this wave: its failures are not continuous
                self.failing_waves, self.failing_for_s = 0, 0.0
            self.failing_waves += 1
            self.failing_for_s += seconds
            if self.failing_for_s >= self.give_up_after_s:
                self.stop(f"the API failed for {self.failing_for_s / 60:.0f} min in a row ({self.failing_waves} waves; "
                          f"last: {reason or outcome}), over give_up_after_s={self.give_up_after_s:g}")
        elif outcome != "stopped":
            self.failing_waves, self.failing_for_s = 0, 0.0
            self.failed_in_a_row = 0 if wave.accepted else self.failed_in_a_row + 1
            if self.failed_in_a_row >= self.max_failed_waves:
                self.stop(f"{self.failed_in_a_row} waves in a row gave no candidate (last: {reason or outcome})")
        self._save_state()

    def _charge(self, usage: Any, wave: Wave, turn: int, *, model: str | None = None, stop_reason: str | None = None,
                refusal: dict | None = None) -> None:
        tokens, usd, _ = self.ledger.record(usage, model=model or self.model, wave=wave.number, turn=turn,
                                            stop_reason=stop_reason, refusal=refusal)
        self._carry(wave, tokens, usd)

    def _charge_cut(self, request: dict, seconds: float, wave: Wave, turn: int) -> None:
        tokens, usd, _ = self.ledger.record_cut(request, seconds, wave=wave.number, turn=turn)
        self._carry(wave, tokens, usd)

    def _carry(self, wave: Wave, tokens: Tokens, usd: float) -> None:
        wave.tokens += tokens
        wave.usd += usd
        with self.lock:
            carried_usd, carried = self.unpriced
            carried += tokens
            self.unpriced = (carried_usd + usd, carried)

    def _stable_prefix(self, ctx: SearchContext) -> None:
        """Tools and system prompt: the cached prefix of every call. They name the device kinds,
        which the study knows only once its launcher has started (after `setup`)."""
        key = json.dumps(ctx.device_kinds, sort_keys=True)
        if key == self.prefix_key:
            return
        self.prefix_key = key
        self.kinds = sorted(ctx.device_kinds)
        screen, promote = self.screen_kinds()
        self.tools = tool_definitions(self.editor_tool, self.view_max_characters, self.kinds, self.max_sweep,
                                      (screen, promote) if screen else None)
        self.system = self._system_prompt(ctx)
        (self.dir / "system_prompt.md").write_text(self.system)

    def _request(self, messages: list[dict], tail: tuple[int, int] | None, max_tokens: int | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model, "max_tokens": max_tokens or self.max_tokens, "tools": self.tools,
            "system": [{"type": "text", "text": self.system,
                        "cache_control": {"type": "ephemeral", "ttl": self.system_cache_ttl}}],
            "messages": with_breakpoints(messages, tail),
        }
        if self.thinking:
            request["thinking"] = self.thinking
        if self.effort:
            request["output_config"] = {"effort": self.effort}
        if self.inference_geo:
            request["inference_geo"] = self.inference_geo
        return request

    def _keep_note(self, args: dict) -> str:
        text = str(args.get("text", "")).strip()
        notes = text if args.get("mode") == "replace" else "\n".join(filter(None, [self.notes, text]))
        if len(notes) > self.notes_max_chars:
            raise ToolError(f"notes would be {len(notes)} characters, over the limit of {self.notes_max_chars}: "
                            "condense them with mode 'replace'")
        self.notes = notes
        self.notes_path.write_text(notes)
        return f"notes saved ({len(notes)} of {self.notes_max_chars} characters)"

    # -- prompts ---------------------------------------------------------------------------------
    def _system_prompt(self, ctx: SearchContext) -> str:
        o = ctx.objective
        limits = o.get("eval_limits") or {}
        unit = {"seconds": "seconds of training", "steps": "optimizer steps", "tokens": "training tokens"}
        kinds = [f"- `{kind}`: {spec.get('count', '?')} slot(s), relative speed {spec.get('speed', 1.0)}"
                 for kind, spec in sorted(ctx.device_kinds.items())]
        hardware = ("The budget is in seconds, so a faster kind trains more in the same budget. Every score is "
                    "judged against the baseline **on the same kind**: running on faster hardware earns nothing."
                    if self.kind_sensitive else
                    "The budget counts work, not time, so every kind does the same training; kinds differ in "
                    "speed only, and scores on any kind are compared directly.")
        program = string.Template(self.program_template).safe_substitute(
            budget=f"{o.get('budget')} {unit.get(o.get('budget_kind'), o.get('budget_kind'))}",
            warmup_steps=o.get("warmup_steps", 0), hard_limit_s=o.get("hard_limit_s"), corpus=o.get("corpus"),
            vocab_size=o.get("vocab_size"), noise_margin=self.noise_margin, noise_z=self.noise_z,
            noise_seeds=self.noise_seeds, confirm_seeds=self.confirm_seeds, max_elites=self.max_elites,
            max_sweep=self.max_sweep, device_kinds="\n".join(kinds) or "- one local slot", hardware=hardware,
            eval_seq_len=o.get("eval_seq_len"), eval_work_per_token=f"{limits.get('max_work_per_token', 1e9):.3g}",
            eval_memory_mb=limits.get("max_memory_mb", 2048), diverse_z=self.diverse_z,
            screening=self._screening_text(),
        )
        return f"{program}\n\n## The baseline train.py (every study starts from it)\n\n```python\n" \
               f"{ctx.baseline_source}\n```\n"

    def _screening_text(self) -> str:
        screen, fast = self.screen_kinds()
        if screen is None:
            return ("This study has one kind of hardware (or kinds of one speed), so there is nothing to screen on: "
                    "every candidate runs where a slot is free.")
        return (f"The study has a slower kind (`{screen}`) and a faster one (`{fast}`). Fast slots are the "
                f"scarce ones. Submit a risky candidate (or a sweep) with `screen: true`: it runs on `{screen}` "
                "first, judged against the baseline there. If the keep rule finds it promising (kept, confirming, "
                f"or on the frontier), the study re-runs it on `{fast}` itself ({self.promote_seeds} run(s), the "
                f"best {self.promote_top} of a wave), without waiting for you; its results count for it like any "
                "other run. Screening costs a slow slot instead of a fast one for ideas that fail, and a little "
                "time for the ones that work; use it for bold ideas, not for the incumbent's small refinements.")

    def _state_prompt(self, wave: Wave) -> str:
        b = self.board
        best = b.best()
        counts = ", ".join(f"{v} {k}" for k, v in sorted(b.counts().items())) or "none yet"
        if best:
            head = (f"Incumbent: {best.trial_id}, val_bpb {b.best_score():.4f} over {len(b.best_elite().evidence)} "
                    f"run(s) on {b.best_kind() or '?'}; its decision: {best.decision}.")
        else:
            head = "No incumbent yet: your candidates start from the baseline."
        in_flight = [f"- {t.trial_id} [{t.candidate.meta.get('role', 'agent')}, {t.device_kind or '?'}] "
                     f"{t.candidate.hypothesis}" for t in wave.in_flight.values()]
        in_flight += [f"- (waiting for a slot) {c.hypothesis}" for key, c in self.proposed.items()
                      if key not in wave.in_flight_codes]
        unreflected = [r.trial_id for r in sorted(b.runs.values(), key=lambda r: r.index)
                       if r.role == "agent" and not r.reflection and r.status not in INFRA_STATUSES][-8:]
        submitted = sorted(wave.files.submitted)
        diff = unified_diff(self.ctx.baseline_source, b.best_source(), "baseline/train.py", "best/train.py")
        start = best.trial_id if best else "the baseline"
        return "\n".join([
            f"# Wave {wave.number}: prepare {wave.k} candidate(s)", "",
            f"## Results so far ({len(b.runs)} finished: {counts}; {len(wave.in_flight)} in flight)", head, "",
            b.table(top=10, last=20), "",
            "## The frontier (elites within noise of the incumbent; start from any of them)",
            *(b.frontier_lines() or ["(empty until the baseline has run)"]), "",
            "## Noise and keep margins", *b.noise_lines(self.kinds), "",
            "## Budget left", *self._budget_lines(), "",
            "## In flight and queued (do not duplicate these)", *(in_flight or ["(none)"]), "",
            "## The incumbent's train.py against the baseline", "```diff", diff, "```", "",
            "## Your notes from earlier waves", self.notes or "(none yet)", "",
            *(["## Finished trials without your reflection", ", ".join(unreflected), ""] if unreflected else []),
            *([wave.extra, ""] if wave.extra else []),
            "## This wave",
            f"Candidate files: {', '.join(wave.files.files)}; each starts as a copy of {start}. "
            f"Submit {wave.k} candidate(s) with submit_candidate or sweep, each testing a different idea."
            + (f" Already submitted in this wave: {', '.join(submitted)}." if submitted else ""),
        ])

    # -- bookkeeping -----------------------------------------------------------------------------
    def _stored_sigma(self, ctx: SearchContext) -> dict[str, float]:
        """The noise floor `python -m analysis.noise` stored for this preset and kind (of the
        baseline's code if it was measured, else the latest on that preset and kind), if any."""
        if not self.noise_store:
            return {}
        from analysis.noise import lookup
        from study.mlflow_content import source_sha

        preset, sha = str(ctx.objective.get("preset", "")), source_sha(ctx.baseline_source)
        out = {}
        for kind in sorted(ctx.device_kinds):
            record = lookup(self.noise_store, preset, kind, sha)
            sigma = record.get("sigma") if record else None
            if isinstance(sigma, (int, float)) and math.isfinite(sigma):
                tier = kind if self.kind_sensitive else ANY_KIND
                out[tier] = max(out.get(tier, 0.0), float(sigma))  # one tier for all kinds: the noisiest bounds it
        if out:
            log.info("noise floor from %s: %s", self.noise_store, out)
        return out

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            log.warning("claude searcher stops: %s", reason)
            if hasattr(self, "dir"):
                self._save_state()

    # -- what survives a restart -------------------------------------------------------------------
    def _save_state(self) -> None:
        """The agent's alive/stopped state and failure streak, so a resumed study continues it."""
        state = {"stop_reason": self.stop_reason, "failing_waves": self.failing_waves,
                 "failing_for_s": self.failing_for_s, "failed_in_a_row": self.failed_in_a_row}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.dir / "state.json")

    def _load_state(self) -> None:
        path = self.dir / "state.json"
        if not path.exists():
            return
        state = json.loads(path.read_text())
        self.failing_waves = int(state.get("failing_waves", 0))
        self.failing_for_s = float(state.get("failing_for_s", 0.0))
        self.failed_in_a_row = int(state.get("failed_in_a_row", 0))
        reason = state.get("stop_reason")
        if reason and self.revive:
            log.warning("the agent had stopped (%s); revive=true starts it again", reason)
            self.failing_waves, self.failing_for_s, self.failed_in_a_row = 0, 0.0, 0
            self._save_state()
        elif reason:
            self.stop_reason = reason
            log.warning("the agent stopped before this resume (%s): it stays stopped (searcher.revive=true starts "
                        "it again); its queued candidates and re-runs still run", reason)

    # -- budget, screening ---------------------------------------------------------------------------
    def _budget_lines(self) -> list[str]:
        """Trials, study hours and dollars left, and what phase that puts the study in."""
        history, in_flight = list(self.ctx.history), list(self.ctx.in_flight)
        used_fractions = []
        lines = []
        if self.study_max_trials:
            used = len(history) + len(in_flight)
            left = max(0, self.study_max_trials - used)
            used_fractions.append(used / self.study_max_trials)
            lines.append(f"- trials: {left} of {self.study_max_trials} left ({len(history)} finished, "
                         f"{len(in_flight)} running, {len(self.queue)} queued here)")
        if self.study_max_hours:
            hours = _study_hours(history, in_flight)
            used_fractions.append(hours / self.study_max_hours)
            lines.append(f"- time: about {max(0.0, self.study_max_hours - hours):.2f} h of {self.study_max_hours:g} h left")
        spent = self.ledger.usd
        used_fractions.append(spent / self.max_usd)
        waves = [w["usd"] for w in self.waves if w.get("usd")]
        per_wave = statistics.fmean(waves[-5:]) if waves else None
        more = f", about {int((self.max_usd - spent) / per_wave)} more waves at the recent rate" if per_wave else ""
        lines.append(f"- money: ${max(0.0, self.max_usd - spent):.2f} of ${self.max_usd:g} left{more}")
        used = max(used_fractions)
        if used < 1 / 3:
            phase = ("Early (under a third used): explore. Try bold and different ideas, sweep knobs whose best "
                     "value is unknown, screen risky code edits on the slower kind if there is one.")
        elif used < 2 / 3:
            phase = ("Middle: exploit. Build on the frontier's most fertile elites, combine ideas that each "
                     "worked, drop directions the analysis shows as worse.")
        else:
            phase = ("Late (over two thirds used): confirm. Re-run the incumbent and close challengers, refine "
                     "with small safe changes; a bold idea now may not get the runs it needs to be kept.")
        return lines + [f"Phase: {phase}"]

    def screen_kinds(self) -> tuple[str | None, str | None]:
        """(the slowest kind, the fastest kind) when the study has kinds of different speeds."""
        kinds = getattr(self, "ctx", None) and self.ctx.device_kinds or {}
        speeds = {k: float(spec.get("speed", 1.0)) for k, spec in kinds.items()}
        if len(set(speeds.values())) < 2:
            return None, None
        return min(speeds, key=lambda k: (speeds[k], k)), max(speeds, key=lambda k: (speeds[k], k))

    def _promote_screened(self) -> None:
        """Each screened run the keep rule finds promising (kept, confirming, on the frontier) is
        re-run on the faster kind, at most `promote_top` per wave, best first. Call under the lock."""
        screen, fast = self.screen_kinds()
        if fast is None or not self.promote_top:
            return
        due = [r for r in self.board.runs.values() if r.meta.get("screen") and r.ok and r.trial_id not in self.promoted
               and r.decision.startswith(PROMISING)]
        for run in sorted(due, key=self.board.relative):
            wave = run.meta.get("agent_wave")
            if sum(w == wave for w in self.promoted.values()) >= self.promote_top:
                continue
            seeds = self._fresh_seeds(run.code, self.promote_seeds)
            self._queue_reruns([Candidate(
                source=run.source, knobs=dict(run.knobs), parent=run.trial_id, seed=s, device_kind=fast,
                hypothesis=f"promotion of {run.trial_id} from {screen} to {fast} (seed {s}): {run.decision}",
                meta={"role": RERUN, "reruns": run.trial_id, "promotes": run.trial_id, "agent_wave": wave})
                for s in seeds])
            self.promoted[run.trial_id] = wave
            with (self.dir / "promotions.jsonl").open("a") as f:
                f.write(json.dumps({"trial_id": run.trial_id, "wave": wave, "to": fast, "seeds": seeds}) + "\n")

    def _check_models(self, models: dict | None, model: str, max_tokens: int, truncation_max_tokens: int,
                      thinking: dict | None, effort: str | None) -> None:
        """The settings every model of the chain would be sent, checked against what it takes."""
        if not models:
            raise ValueError("searcher.models is empty: each model needs its max_tokens, context_window, thinking "
                             "types and effort levels")
        check_model(model, ModelSpec.for_model(models, model), max_tokens=max(max_tokens, truncation_max_tokens),
                    thinking=thinking, effort=effort)
        for entry in self.fallbacks:
            fb = entry["model"]
            fb_thinking = entry["thinking"] if "thinking" in entry else thinking
            fb_effort = entry.get("output_config", {}).get("effort", effort)
            fb_tokens = entry.get("max_tokens") or max(max_tokens, truncation_max_tokens)
            check_model(fb, ModelSpec.for_model(models, fb), max_tokens=fb_tokens, thinking=fb_thinking,
                        effort=fb_effort, what=f"searcher.fallback_models[{fb}]")

    def _write_wave(self, wave: Wave, outcome: str, reason: str, started: float) -> None:
        row = {
            "wave": wave.number, "asked": wave.k, "candidates": len(wave.accepted), "reruns": len(wave.reruns),
            "outcome": outcome, "reason": reason, "turns": wave.turns, "nudges": wave.nudges, "usd": wave.usd,
            "tokens": asdict(wave.tokens), "broken": wave.broken, "refused": wave.refused,
            "tool_errors": wave.tool_errors, "truncations": wave.truncations, "empty_replies": wave.empty,
            "refusals": wave.refusals, "fallbacks": wave.fallbacks, "api_retries": wave.retries,
            "blank_blocks": wave.blank_blocks, "larger_retries": wave.larger_retries,
            "context_resets": wave.context_resets, "estimated_calls": wave.estimated_calls,
            "tools": wave.tools_used, "seconds": round(time.time() - started, 3),
            "model": self.model, "fallback_models": self.fallback_model_names, "prices_checked": self.prices_checked,
        }
        with self.lock:
            self.waves.append(row)
            with (self.dir / "waves.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        transcript = {**row, "submitted": [{"hypothesis": c.hypothesis, "parent": c.parent, "knobs": c.knobs,
                                            "device_kind": c.device_kind, "file": c.meta["agent_candidate"],
                                            "combines": c.meta.get("combines")} for c in wave.accepted],
                      "system_prompt": "system_prompt.md", "messages": wave.messages}
        (self.dir / f"wave_{wave.number:04d}.json").write_text(json.dumps(transcript, indent=1, default=str))


def _fallback_entries(raw: list) -> list[dict[str, Any]]:
    """`fallback_models` as the SDK's fallback entries: a model id, or {model, max_tokens,
    thinking, effort} where any setting left out is the requested one's (a patch, as the SDK applies it)."""
    out = []
    for item in raw:
        entry = {"model": item} if isinstance(item, str) else dict(item)
        if not entry.get("model"):
            raise ClaudeSearcherError(f"searcher.fallback_models entry {item!r} names no model")
        effort = entry.pop("effort", None)
        if effort is not None:
            entry["output_config"] = {"effort": effort}
        out.append(entry)
    return out


def _study_hours(history: list, in_flight: list[Trial]) -> float:
    """How far the study clock has come, as the trials show it: the latest submission or finish."""
    latest = [t.submitted_at or 0.0 for t in in_flight]
    for t, r in history:
        ran = (r.finished_at - r.started_at) if r.finished_at is not None and r.started_at is not None else 0.0
        latest.append((t.submitted_at or 0.0) + (r.queue_seconds or 0.0) + ran)
    return max(latest, default=0.0) / 3600


def _job_key(c: Candidate, board: Board) -> tuple | None:
    """What identifies a job the searcher issues itself, so it is not issued twice."""
    role = c.meta.get("role")
    if role == CONFIRM:
        of = c.parent
        return c.meta.get("confirms"), of, c.seed
    if role == BASELINE and c.source == board.baseline_source:
        return board.tier(c.device_kind), c.seed
    return None


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
