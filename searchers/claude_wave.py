"""One wave: a fresh tool-use conversation in which Claude prepares candidates, and the tools it
calls (each runs under the searcher's lock, since results keep arriving while the model thinks).

A wave starts from a compact state (results table, frontier, noise, budget, notes), never from
earlier transcripts, so a study of hundreds of trials does not grow the context. What the real API
returns besides tool calls is handled as claude_api.py explains:

- a refusal is first retried on the fallback models by the SDK's refusal-fallback middleware; the
  rest of the wave stays on the model that accepted (one `BetaFallbackState` per wave); only when
  every model refused is the conversation restarted;
- a reply cut off at max_tokens is dropped whole and asked again once at `truncation_max_tokens`
  (streamed when the SDK would not send that many non-streamed), then nudged;
- a reply that filled the context window restarts the conversation from the compact state;
- an empty reply is never sent back, nor is a blank text block;
- a call and the wave have time limits that hold across the SDK's retries.

Every accepted candidate carries the dollars and tokens spent since the previous one, so per-trial
MLflow metrics add up to the study's total (calls after a wave's last submission are carried to
the next candidate).
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anthropic
from anthropic.lib.middleware import BetaFallbackState

from searchers.claude_api import (
    CONTEXT_FULL, NONSTREAMING_MAX_TOKENS, CallTimeLimit, deadline, describe, is_stopping, observe, refusal_details,
    returned_turn, tail_of,
)
from searchers.claude_board import AGENT, BASELINE, RERUN, code_key, unified_diff
from searchers.claude_cost import Tokens
from searchers.claude_evidence import AnalysisError, analyze
from searchers.claude_merge import common_ancestor, merge
from searchers.claude_tools import (
    EDITOR_NAME, Broken, CandidateFiles, Refused, ToolError, changed_knobs, check_candidate,
)
from study.records import Candidate, Trial
from study.core import KnobError, read_knobs, write_knobs
from train.contract import LOG_FILE, read_tail

if TYPE_CHECKING:
    from searchers.claude import ClaudeSearcher

log = logging.getLogger("arena.claude")


class Wave:
    """One wave's working state and its tools."""

    def __init__(self, agent: "ClaudeSearcher", number: int, k: int, in_flight: list[Trial], extra: str = "",
                 stream: bool = True):
        self.agent, self.number, self.k, self.extra, self.stream = agent, number, k, extra, stream
        best = agent.board.best()
        self.files = CandidateFiles([f"c{i}" for i in range(1, k + 1)], agent.board.best_source(),
                                    best.trial_id if best else None, agent.view_max_characters)
        self.in_flight = {t.trial_id: t for t in in_flight}
        self.in_flight_codes = {code_key(t.candidate.source): t.trial_id for t in in_flight}
        self.accepted: list[Candidate] = []
        self.reruns: list[Candidate] = []
        self.tokens = Tokens()
        self.usd = 0.0
        self.turns = self.nudges = self.broken = self.refused = self.tool_errors = 0
        self.truncations = self.empty = self.retries = self.blank_blocks = self.context_resets = 0
        self.larger_retries = self.estimated_calls = self.answered_ok = 0  # answered_ok: answers that were not refusals
        self.refusals: list[dict] = []  # every refused hop: model, category, explanation, whether a fallback took over
        self.fallbacks: list[dict] = []  # each answer a fallback model gave after a refusal: from, to, category
        self.tools_used: dict[str, int] = {}
        self.messages: list[dict] = []
        self.reset_note = ""
        self.turn = 0

    # -- the conversation --------------------------------------------------------------------------
    def run(self) -> tuple[str, str]:
        """Talk until k candidates are submitted or the wave must end; (outcome, reason)."""
        a = self.agent
        clock = a.clock
        self.messages = self.fresh_conversation()
        wave_deadline = clock.monotonic() + a.max_wave_s
        tail: tuple[int, int] | None = None
        larger = False  # this turn is the one retry of a cut-off reply at truncation_max_tokens
        state = BetaFallbackState()  # the wave's conversation stays on the model that accepted
        try:
            with state:
                for turn in range(1, a.max_turns + 1):
                    if a.closed:
                        return "stopped", "the study ended"
                    if a.ledger.usd >= a.max_usd:
                        a.stop(f"max_usd={a.max_usd} reached (${a.ledger.usd:.2f})")
                        return "stopped", a.stop_reason
                    if clock.monotonic() >= wave_deadline:
                        return ("ok" if self.accepted else "timeout"), f"max_wave_s={a.max_wave_s} reached"
                    until = min(clock.monotonic() + a.max_call_s, wave_deadline)
                    self.turn = turn
                    response = self.call(tail, a.truncation_max_tokens if larger else a.max_tokens, until)
                    tail = tail_of(self.messages)
                    self.turns = turn
                    stop = response.stop_reason
                    blocks, blank, seams = returned_turn(response.content)
                    self.blank_blocks += blank
                    self.fallbacks += [{"from": s["from"]["model"], "to": s["to"]["model"],
                                        "category": (s.get("trigger") or {}).get("category")} for s in seams]
                    if stop == "refusal":  # every model refused: a refused context keeps refusing, start afresh
                        refused = [r for r in self.refusals if not r.get("fallback")]
                        log.warning("wave %d: refusal on every model (%s)", self.number,
                                    (refused[-1] if refused else {}).get("category"))
                        if len(refused) > a.max_refusals:
                            return "refused", f"{len(refused)} refusals by every model ({_categories(refused)})"
                        self.messages, tail = self.fresh_conversation(), None
                        continue
                    if stop == CONTEXT_FULL:  # the conversation outgrew the model: start again from the compact state
                        self.context_resets += 1
                        if self.context_resets > 1:
                            return ("ok" if self.accepted else "skipped"), "the context window filled twice"
                        self.reset_note = ("Your previous conversation in this wave filled the model's context "
                                           "window and was cut. Keep tool outputs small: view with view_range, "
                                           "read logs with few lines.")
                        self.messages, tail = self.fresh_conversation(), None
                        continue
                    if stop == "max_tokens" and not larger and a.truncation_max_tokens > a.max_tokens:
                        self.truncations += 1
                        self.larger_retries += 1
                        larger = True  # the same request once more, with room to finish
                        continue
                    larger = False
                    if stop == "max_tokens" or not blocks:  # never run a cut-off call, never send an empty turn
                        if stop == "max_tokens":
                            self.truncations += 1
                        else:
                            self.empty += 1
                        if self.truncations - self.larger_retries + self.empty > a.max_nudges:
                            return "skipped", f"{self.truncations} truncated and {self.empty} empty replies"
                        note = _cut_off(a.truncation_max_tokens) if stop == "max_tokens" else "Please continue."
                        self.messages[-1]["content"].append({"type": "text", "text": note})
                        continue
                    self.messages.append({"role": "assistant", "content": blocks})
                    uses = [b for b in response.content if b.type == "tool_use"]
                    if uses:
                        self.messages.append({"role": "user", "content": [self.tool_result(u) for u in uses]})
                    if len(self.accepted) >= self.k or (not uses and self.accepted):
                        return "ok", ""
                    if not uses:
                        if self.nudges >= a.max_nudges:
                            return "skipped", f"no usable candidate after {self.nudges} reminders (stop_reason {stop})"
                        self.nudges += 1
                        self.messages.append({"role": "user", "content": [{"type": "text", "text": self.nudge()}]})
            return ("ok", "") if self.accepted else ("skipped", f"no candidate within max_turns_per_wave={a.max_turns}")
        except (anthropic.APIError, CallTimeLimit) as e:
            if a.closed:  # the study ended and closed the client under this call
                return "stopped", "the study ended"
            reason = describe(e)
            stopping = isinstance(e, anthropic.APIStatusError) and is_stopping(e)
            if stopping:
                a.stop(f"API: {reason}")
            log.warning("wave %d: %s", self.number, reason)
            return ("stopped" if stopping else "error"), reason

    def call(self, tail: tuple[int, int] | None, max_tokens: int, until: float) -> Any:
        """One Messages call through the fallback middleware, with the deadline and the ledger's
        eyes on every attempt; streamed when the SDK would not send it otherwise."""
        a = self.agent
        request = a._request(self.messages, tail, max_tokens)
        client = a.client.with_middleware(
            deadline(until, a.timeout_s, max_retries=a.max_retries, clock=a.clock, on_retry=self.count_retry),
            observe(self.on_answer, self.on_cut, a.clock))
        if max_tokens <= NONSTREAMING_MAX_TOKENS:
            return client.beta.messages.create(**request)
        with client.beta.messages.stream(**request) as stream:
            for _ in stream:
                if a.clock.monotonic() > until:
                    raise CallTimeLimit("a streamed answer ran past the call's time limit")
            message = stream.get_final_message()
        iterations = getattr(message.usage, "iterations", None) or []
        if iterations:  # a stream the fallback middleware spliced: each hop priced at its own model
            for hop in iterations:
                self.charge(hop, getattr(hop, "model", None) or message.model, None, None)
        else:
            self.charge(message.usage, message.model, message.stop_reason, message.stop_details)
        return message

    def on_answer(self, message: dict, request: dict) -> None:
        """Every answered hop (the observe middleware): priced at the model that answered; a refused
        hop is kept with its stop_details, marked when a fallback model is configured to take over."""
        self.charge(message.get("usage") or {}, message.get("model") or request.get("model"),
                    message.get("stop_reason"), message.get("stop_details"))

    def charge(self, usage: Any, model: str | None, stop_reason: str | None, stop_details: Any) -> None:
        self.answered_ok += stop_reason != "refusal"
        refusal = None
        if stop_reason == "refusal":
            refusal = {"model": model, **refusal_details(stop_details)}
            chain = [self.agent.model, *self.agent.fallback_model_names]
            refusal["fallback"] = self.agent.book.row_name(model) in chain[:-1]  # the middleware sends it on
            self.refusals.append(refusal)
        self.agent._charge(usage, self, self.turn, model=model, stop_reason=stop_reason, refusal=refusal)

    def on_cut(self, request: dict, seconds: float) -> None:
        self.estimated_calls += 1
        self.agent._charge_cut(request, seconds, self, self.turn)

    def count_retry(self) -> None:
        self.retries += 1

    def fresh_conversation(self) -> list[dict]:
        """The wave's opening turn, also after a refusal or a full context (the old conversation is
        dropped, the candidates already submitted stay)."""
        with self.agent.lock:
            text = self.agent._state_prompt(self)
        if self.reset_note:
            text = f"{text}\n\n{self.reset_note}"
        return [{"role": "user", "content": [{"type": "text", "text": text}]}]

    def nudge(self) -> str:
        left = [n for n in self.files.starts if n not in self.files.submitted]
        return (f"No candidate has been submitted yet. Edit {', '.join(f'{n}/train.py' for n in left)} and call "
                f"submit_candidate (or sweep) for each ({self.k} wanted); a wave without a candidate leaves "
                "slots idle.")

    # -- tools -------------------------------------------------------------------------------------
    def tool_result(self, use: Any) -> dict[str, Any]:
        """Run one tool call. The editor touches only this wave's files and runs unlocked; submit
        and sweep check their code unlocked and take the lock to accept, combine merges unlocked;
        the rest read or change the board under the lock, so an ask from the loop never waits long
        for a tool."""
        locked = {
            "read_results": lambda a: self.agent.board.table(top=a.get("top", 10), last=a.get("last", 20),
                                                             ids=a.get("trial_ids")),
            "read_trial": self.read_trial,
            "start_from": self.start_from,
            "rerun": self.rerun,
            "reflect": self.reflect,
            "keep_note": self.agent._keep_note,
            "analyze": self.analyze,
        }
        unlocked = {EDITOR_NAME: self.files.editor, "submit_candidate": self.submit, "sweep": self.sweep,
                    "combine": self.combine}
        args = use.input if isinstance(use.input, dict) else {}
        self.tools_used[use.name] = self.tools_used.get(use.name, 0) + 1
        try:
            if use.name in unlocked:
                content = unlocked[use.name](args)
            elif use.name in locked:
                with self.agent.lock:
                    content = locked[use.name](args)
            else:
                raise ToolError(f"unknown tool {use.name!r}")
            return {"type": "tool_result", "tool_use_id": use.id, "content": content}
        except Exception as e:  # whatever a tool call does wrong, the model hears it, the study goes on
            if not isinstance(e, ToolError):
                log.exception("tool %s failed on %r", use.name, args)
                e = ToolError(f"{use.name} failed: {type(e).__name__}: {e}; check the arguments")
            self.tool_errors += 1
            self.broken += isinstance(e, Broken)
            self.refused += isinstance(e, Refused)
            return {"type": "tool_result", "tool_use_id": use.id, "content": str(e), "is_error": True}

    def submit(self, args: dict) -> str:
        name = str(args.get("candidate", ""))
        source = self._final_source(name)
        start, parent = self.files.starts[name]
        key = code_key(source)
        if key == code_key(start):
            raise ToolError(f"{name} runs the same code as its starting point ({parent or 'baseline'}): "
                            "comments and layout aside, nothing changed, so it would only re-run a seed")
        hypothesis = _hypothesis(args)
        kind = self._kind(args)
        candidate = self._candidate(name, source, hypothesis, kind, screen=bool(args.get("screen")))
        with self.agent.lock:
            owner = self._owner(key)
            if owner:
                raise ToolError(f"{name} runs the same code as {owner}; make it test a different idea")
            self.files.submitted.add(name)
            self.agent._accept(self, [candidate])
        return (f"accepted {name} ({len(self.accepted)} of {self.k}); knobs changed: "
                f"{candidate.knobs or 'none (code edit)'}")

    def sweep(self, args: dict) -> str:
        name = str(args.get("candidate", ""))
        source = self._final_source(name)
        knobs = args.get("knobs")
        if not isinstance(knobs, dict) or not knobs or not all(isinstance(v, list) and v for v in knobs.values()):
            raise ToolError("knobs must map knob names to non-empty lists of values")
        unknown = sorted(set(knobs) - set(read_knobs(source)))
        if unknown:
            raise ToolError(f"{', '.join(unknown)} not knobs of {name}/train.py (knobs are its ALL_CAPS constants)")
        combos = [dict(zip(knobs, values)) for values in itertools.product(*knobs.values())]
        if len(combos) > self.agent.max_sweep:
            raise ToolError(f"{len(combos)} combinations, over the limit of {self.agent.max_sweep}")
        hypothesis = _hypothesis(args)
        screen = bool(args.get("screen"))
        kind = self._kind(args)
        start_key = code_key(self.files.starts[name][0])
        variants: dict[str, tuple[str, Candidate]] = {}  # code key -> (label, candidate), in order
        for combo in combos:
            try:
                variant = write_knobs(source, combo)
            except KnobError as e:
                raise ToolError(f"{combo}: {e}") from None
            check_candidate(variant)
            label = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            candidate = self._candidate(name, variant, f"{hypothesis} [sweep {label}]", kind, screen=screen)
            variants.setdefault(code_key(variant), (label, candidate))
        out, skipped = [], []
        with self.agent.lock:
            for key, (label, candidate) in variants.items():
                if key == start_key or self._owner(key):
                    skipped.append(label)
                else:
                    out.append(candidate)
            if not out:
                raise ToolError(f"every combination already ran or is queued: {'; '.join(skipped)}")
            self.files.submitted.add(name)
            self.agent._accept(self, out)
        return (f"accepted {len(out)} sweep candidate(s) from {name}" +
                (f"; skipped (already run or queued): {'; '.join(skipped)}" if skipped else ""))

    def rerun(self, args: dict) -> str:
        board = self.agent.board
        tid = str(args.get("trial_id", ""))
        run = board.runs.get(tid)
        if run is None:
            raise ToolError(f"no finished trial {tid!r}; see read_results")
        kind = args.get("device_kind") or None
        if kind is not None and kind not in self.agent.kinds:
            raise ToolError(f"device_kind {kind!r} is not in this study's kinds {self.agent.kinds}")
        count = int(args.get("seeds") or 1)
        if not 1 <= count <= 4:
            raise ToolError("seeds must be 1 to 4")
        seeds = self.agent._fresh_seeds(run.code, count)
        role = BASELINE if run.code == board.baseline_code else RERUN
        out = [Candidate(source=run.source, knobs=dict(run.knobs), parent=tid, seed=s, device_kind=kind,
                         hypothesis=f"re-run of {tid} on {kind or 'any kind'} with seed {s}",
                         meta={"role": role, "agent_wave": self.number, "reruns": tid}) for s in seeds]
        self.reruns.extend(out)
        self.agent._queue_reruns(out)
        return f"queued {len(out)} re-run(s) of {tid} on {kind or 'any kind'} (seeds {seeds})"

    def analyze(self, args: dict) -> str:
        try:
            return analyze(self.agent.board, args)
        except AnalysisError as e:
            raise ToolError(str(e)) from None

    def reflect(self, args: dict) -> str:
        tid = str(args.get("trial_id", ""))
        if tid not in self.agent.board.runs:
            raise ToolError(f"no finished trial {tid!r}; reflect on a trial once its result is in")
        text = " ".join(str(args.get("text", "")).split())[:200]
        if not text:
            raise ToolError("a one-line text is required")
        self.agent._reflect(tid, text)
        return f"reflection on {tid} saved"

    def start_from(self, args: dict) -> str:
        tid = str(args.get("trial_id", ""))
        source, parent = self._lookup(tid)
        self.files.restart(str(args.get("candidate", "")), source, parent)
        return f"{args.get('candidate')}/train.py is now a copy of {tid}"

    def combine(self, args: dict) -> str:
        """Looks the trials up under the lock; the merge (a subprocess) runs outside it, so an ask
        from the loop never waits for git."""
        name = str(args.get("candidate", ""))
        first, second = str(args.get("first", "")), str(args.get("second", ""))
        with self.agent.lock:
            (a_src, a_id), (b_src, b_id) = self._lookup(first), self._lookup(second)
            parents = {t: r.parent for t, r in self.agent.board.runs.items()}
            parents.update({t: tr.candidate.parent for t, tr in self.in_flight.items()})
            ancestor = common_ancestor(a_id, b_id, parents)
            base, _ = self._lookup(ancestor or "baseline")
        merged, conflicts = merge(base, a_src, b_src, (first, second, ancestor or "baseline"))
        self.files.restart(name, merged, a_id)
        self.files.starts[name] = (a_src, a_id)
        self.files.combined[name] = b_id
        if conflicts:
            return (f"{name}/train.py merges {first} and {second} (ancestor {ancestor or 'baseline'}) with "
                    f"{conflicts} conflict(s) marked <<<<<<< ... >>>>>>>: resolve them before submitting")
        return f"{name}/train.py merges {first} and {second} (ancestor {ancestor or 'baseline'}) cleanly"

    def read_trial(self, args: dict) -> str:
        board = self.agent.board
        tid = str(args.get("trial_id", ""))
        if tid in ("best", "baseline"):
            best = board.best()
            tid = (best.trial_id if best else None) if tid == "best" else board.owner_of(board.baseline_source)
            if tid is None:
                raise ToolError(f"no finished trial is the {args.get('trial_id')} yet")
        source, _ = self._lookup(tid)
        run, trial = board.runs.get(tid), self.in_flight.get(tid)
        part = args.get("part")
        if part == "log":
            log_path = Path(run.directory if run else trial.directory) / LOG_FILE
            tail = read_tail(log_path, int(args.get("lines") or 60))
            return (tail or f"(no {LOG_FILE} yet)") + (f"\n(error: {run.error})" if run and run.error else "")
        if part == "source":
            return source[: self.agent.view_max_characters]
        if part == "diff":
            against = args.get("against") or "parent"
            parent = (run.parent if run else trial.candidate.parent) if against == "parent" else against
            old, _ = self._lookup(parent or "baseline")
            return unified_diff(old, source, f"{parent or 'baseline'}/train.py", f"{tid}/train.py")
        raise ToolError("part must be log, source or diff")

    # -- helpers -----------------------------------------------------------------------------------
    def _lookup(self, tid: str) -> tuple[str, str | None]:
        board = self.agent.board
        if tid == "best":
            best = board.best()
            return board.best_source(), best.trial_id if best else None
        if tid == "baseline":
            return board.baseline_source, board.owner_of(board.baseline_source)
        if tid in board.runs:
            return board.runs[tid].source, tid
        if tid in self.in_flight:
            return self.in_flight[tid].candidate.source, tid
        raise ToolError(f"no trial {tid!r}; see read_results")

    def _final_source(self, name: str) -> str:
        path = self.files.path_for(name)
        if name in self.files.submitted:
            raise ToolError(f"{name} was already submitted")
        source = self.files.files[path]
        check_candidate(source)
        return source

    def _owner(self, key: str) -> str | None:
        """Who already runs this code (by code_key): a finished trial, one in flight, or a queued
        candidate. Call under the lock."""
        queued = self.agent.proposed.get(key)
        return self.agent.board.owner_of("", key=key) or self.in_flight_codes.get(key) or (
            queued and f"candidate {queued.meta.get('agent_candidate')} of wave {queued.meta.get('agent_wave')}")

    def _kind(self, args: dict) -> str | None:
        kind = args.get("device_kind") or None
        if kind is not None and kind not in self.agent.kinds:
            raise ToolError(f"device_kind {kind!r} is not in this study's kinds {self.agent.kinds}")
        if args.get("screen"):
            screen, promote = self.agent.screen_kinds()
            if screen is None:
                raise ToolError("screening needs two device kinds of different speeds; this study has "
                                f"{self.agent.kinds}")
            if kind not in (None, screen):
                raise ToolError(f"a screened candidate runs on the slower kind {screen}, not {kind}")
            return screen
        return kind

    def _candidate(self, name: str, source: str, hypothesis: str, kind: str | None, screen: bool = False) -> Candidate:
        start, parent = self.files.starts[name]
        meta: dict[str, Any] = {"role": AGENT, "agent_wave": self.number, "agent_candidate": name}
        if name in self.files.combined:
            meta["combines"] = [parent, self.files.combined[name]]
        if screen:
            meta["screen"] = True
        return Candidate(source=source, knobs=changed_knobs(read_knobs(start), read_knobs(source)), parent=parent,
                         hypothesis=hypothesis, device_kind=kind, meta=meta)


def _hypothesis(args: dict) -> str:
    hypothesis = " ".join(str(args.get("hypothesis", "")).split())[:300]
    if not hypothesis:
        raise ToolError("a one-line hypothesis is required")
    return hypothesis


def _categories(refusals: list[dict]) -> str:
    return ", ".join(str(r.get("category") or "uncategorised") for r in refusals)


def _cut_off(max_tokens: int) -> str:
    return (f"Your last reply was cut off at max_tokens={max_tokens} before it finished, so none of its tool "
            "calls ran. Make smaller steps: one str_replace per change, never a whole-file create.")
