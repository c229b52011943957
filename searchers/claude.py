"""The Claude code-editor searcher: Claude edits train.py in waves sized to the free slots.

Each `ask(n)` is one wave: a fresh multi-turn tool-use conversation (official `anthropic` SDK) that
starts from a compact state (the results table, the kept best's diff against the baseline, the notes
the agent chose to keep), never from the previous waves' transcripts, so a study of hundreds of
trials does not grow the context. The stable prefix (tools, the program prompt of
`searchers/program.md`, the baseline train.py) is cached for an hour; the conversation tail of the
current wave for five minutes.

Around the model: a scoreboard with the keep rule (claude_board.py), tools confined to this wave's
candidate files (claude_tools.py), dollars per call from a dated price table (claude_cost.py), and
the rules of the real API (claude_api.py): a call and a wave have time limits however often the SDK
retries; an empty reply is never sent back and a reply cut off at max_tokens never runs its tool
calls; a refusal restarts the wave from a fresh context and is counted by category. The SDK retries
429/529/5xx; an error that retrying cannot fix (auth, permission, billing, spend limit) ends the
searcher cleanly, and so does `max_usd`. Everything the agent did is written under
`<study>/agent/` (transcripts, costs, notes), which the study uploads to MLflow. The API key is
read from the environment into the client and nowhere else.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
import os
import string
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anthropic

from searchers.base import SearchContext, Searcher
from searchers.claude_api import (
    TRUNCATED, CallTimeLimit, deadline, describe, is_stopping, refusal_category, tail_of, with_breakpoints,
)
from searchers.claude_board import AGENT, BASELINE, CONFIRM, Board, code_key, unified_diff
from searchers.claude_cost import Ledger, Prices, Tokens
from searchers.claude_tools import (
    EDITOR_NAME, Broken, CandidateFiles, Refused, ToolError, changed_knobs, check_candidate, tool_definitions,
)
from study.records import INFRA_STATUSES, Candidate, Result, Trial
from train.knobs import read_knobs

log = logging.getLogger("arena.claude")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
class ClaudeSearcherError(RuntimeError):
    """A configuration the searcher cannot start with (no API key, unknown model price)."""


class ClaudeSearcher(Searcher):
    name = "claude"

    def __init__(self, *, model: str, prices: dict[str, dict[str, float]], max_usd: float,
                 noise_margin: float = 0.01, confirm_seeds: int = 2, max_turns_per_wave: int = 40,
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
        if noise_margin < 0 or confirm_seeds < 0 or max_turns_per_wave < 1:
            raise ClaudeSearcherError("noise_margin and confirm_seeds must be >= 0, max_turns_per_wave >= 1")
        program_path = Path(program) if Path(program).is_absolute() else PROJECT_ROOT / program
        if not program_path.is_file():
            raise ClaudeSearcherError(f"program prompt {str(program_path)!r} is not a file")
        try:
            self.prices = Prices.for_model(prices, model)
        except ValueError as e:
            raise ClaudeSearcherError(str(e)) from None
        self.name = name
        self.model = model
        self.max_usd = float(max_usd)
        self.noise_margin = float(noise_margin)
        self.confirm_seeds = int(confirm_seeds)
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
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=max_retries,
                                          timeout=timeout_s, http_client=http_client)
        self.stop_reason: str | None = None
        self.issued: set[tuple[str, int]] = set()
        self.baseline_issued = False
        self.failed_in_a_row = 0
        self.errors_in_a_row = 0
        self.queued: dict[str, Candidate] = {}  # proposed, not yet told back (code key -> candidate)

    # -- the Searcher interface ------------------------------------------------------------------
    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        self.dir = Path(ctx.study_dir) / "agent"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.dir / "costs.jsonl", self.prices, self.model)
        self.board = Board(ctx.baseline_source, noise_margin=self.noise_margin, confirm_seeds=self.confirm_seeds,
                           kind_sensitive=ctx.objective.get("budget_kind") == "seconds",
                           wait_for_baseline=self.run_baseline)
        self.notes_path = self.dir / "notes.md"
        self.notes = self.notes_path.read_text() if self.notes_path.exists() else ""
        self.prefix_key: str | None = None
        self.waves = _read_jsonl(self.dir / "waves.jsonl")  # earlier waves, on resume
        if self.ledger.usd >= self.max_usd:
            self._stop(f"max_usd={self.max_usd} already spent (${self.ledger.usd:.2f})")

    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        out: list[Candidate] = []
        if self.stop_reason is None and self._baseline_missing(ctx):
            self.baseline_issued = True
            out.append(Candidate(source=ctx.baseline_source, hypothesis="baseline: the unmodified train.py",
                                 meta={"role": BASELINE, "agent_usd": 0.0}))
        issued = self.issued | {(t.candidate.meta.get("confirms"), t.candidate.seed) for t in ctx.in_flight
                                if t.candidate.meta.get("role") == CONFIRM}
        for job in self.board.confirmations_due(issued)[: n - len(out)]:
            self.issued.add((job.challenger, job.seed))
            challenger = self.board.runs[job.challenger]
            out.append(Candidate(
                source=job.source, knobs=dict(challenger.knobs), parent=job.challenger, seed=job.seed,
                device_kind=job.device_kind, hypothesis=f"re-run of {job.challenger} with seed {job.seed} (keep rule)",
                meta={"role": CONFIRM, "confirms": job.challenger, "agent_usd": 0.0}))
        if n - len(out) > 0 and self.stop_reason is None:
            out.extend(self._wave(n - len(out), ctx))
        return out

    def tell(self, trial: Trial, result: Result) -> None:
        run = self.board.record(trial, result)
        self.queued.pop(run.code, None)
        if result.status in INFRA_STATUSES:  # the infrastructure, not the candidate, failed: run it again
            self.issued.discard((run.confirms, run.seed))
            self.baseline_issued = self.baseline_issued and run.role != BASELINE
        log.info("%s %s %s", trial.trial_id, result.status, run.decision)

    def done(self) -> bool:
        """Stopped, and no re-run the keep rule still waits for (those cost no API call)."""
        return self.stop_reason is not None and not self.board.challenges

    def summary(self) -> dict[str, Any]:
        total = lambda key: sum(w.get(key, 0) for w in self.waves)  # noqa: E731
        kept = [i for i in self.board.kept if self.board.runs[i].role != BASELINE]
        return {
            "agent_usd_total": self.ledger.usd,
            "agent_calls": self.ledger.calls,
            **self.ledger.tokens.as_meta(),
            "agent_waves": len(self.waves),
            "agent_waves_skipped": sum(w["outcome"] != "ok" for w in self.waves),
            "agent_candidates": total("candidates"),
            "agent_broken_submissions": total("broken"),
            "agent_refused_tool_calls": total("refused"),
            "agent_tool_errors": total("tool_errors"),
            "agent_truncated_replies": total("truncations"),
            "agent_empty_replies": total("empty_replies"),
            "agent_refusals": sum(len(w.get("refusals", [])) for w in self.waves),
            **{f"agent_refusals_{c}": n for c, n in Counter(c for w in self.waves for c in w.get("refusals", [])).items()},
            "agent_kept": len(kept),
            "agent_stop_reason": self.stop_reason or "",
        }

    def close(self) -> None:
        self.client.close()

    # -- one wave --------------------------------------------------------------------------------
    def _stable_prefix(self, ctx: SearchContext) -> None:
        """Tools and system prompt: the cached prefix of every call. They name the device kinds,
        which the study knows only once its launcher has started (after `setup`)."""
        key = json.dumps(ctx.device_kinds, sort_keys=True)
        if key == self.prefix_key:
            return
        self.prefix_key = key
        self.kinds = sorted(ctx.device_kinds)
        self.tools = tool_definitions(self.editor_tool, self.view_max_characters, self.kinds)
        self.system = self._system_prompt(ctx)
        (self.dir / "system_prompt.md").write_text(self.system)

    def _wave(self, k: int, ctx: SearchContext) -> list[Candidate]:
        if self.errors_in_a_row:  # the API failed past the SDK's retries: give an outage time to pass
            time.sleep(min(300.0, self.wave_backoff_s * 2 ** (self.errors_in_a_row - 1)))
        self._stable_prefix(ctx)
        number = 1 + max((w["wave"] for w in self.waves), default=0)
        best = self.board.best()
        names = [f"c{i}" for i in range(1, k + 1)]
        files = CandidateFiles(names, self.board.best_source(), best.trial_id if best else None,
                               self.view_max_characters)
        wave = _Wave(number, k, files, ctx)
        messages = self._fresh_conversation(wave)
        outcome, reason = "ok", ""
        started = time.time()
        wave_deadline = time.monotonic() + self.max_wave_s
        tail: tuple[int, int] | None = None
        try:
            for turn in range(1, self.max_turns + 1):
                if self.ledger.usd >= self.max_usd:
                    self._stop(f"max_usd={self.max_usd} reached (${self.ledger.usd:.2f})")
                    break
                if time.monotonic() >= wave_deadline:
                    outcome, reason = "timeout", f"max_wave_s={self.max_wave_s} reached"
                    break
                until = min(time.monotonic() + self.max_call_s, wave_deadline)
                client = self.client.with_middleware(deadline(until, self.timeout_s))
                response = client.messages.create(**self._request(messages, tail))
                tail = tail_of(messages)
                tokens, usd = self.ledger.record(response.usage, wave=number, turn=turn)
                wave.tokens += tokens
                wave.usd += usd
                wave.turns = turn
                stop = response.stop_reason
                if stop == "refusal":  # a refused context keeps refusing: start the wave's conversation again
                    wave.refusals.append(refusal_category(response))
                    log.warning("wave %d: refusal (%s)", number, wave.refusals[-1])
                    if len(wave.refusals) > self.max_refusals:
                        outcome, reason = "refused", f"{len(wave.refusals)} refusals ({', '.join(wave.refusals)})"
                        break
                    messages, tail = self._fresh_conversation(wave), None
                    continue
                if stop in TRUNCATED or not response.content:  # never run a cut-off call, never send an empty turn
                    kind = "truncations" if stop in TRUNCATED else "empty"
                    setattr(wave, kind, getattr(wave, kind) + 1)
                    if wave.truncations + wave.empty > self.max_nudges:
                        outcome, reason = "skipped", f"{wave.truncations} truncated and {wave.empty} empty replies"
                        break
                    messages[-1]["content"].append({"type": "text", "text": _cut_off(self.max_tokens) if
                                                    stop in TRUNCATED else "Please continue."})
                    continue
                messages.append({"role": "assistant", "content": [b.to_dict() for b in response.content]})
                uses = [b for b in response.content if b.type == "tool_use"]
                if uses:
                    messages.append({"role": "user", "content": [self._tool_result(u, wave) for u in uses]})
                if len(wave.accepted) == k or (not uses and wave.accepted):
                    break
                if not uses:
                    if wave.nudges >= self.max_nudges:
                        outcome, reason = "skipped", (f"no usable candidate after {wave.nudges} reminders "
                                                      f"(stop_reason {stop})")
                        break
                    wave.nudges += 1
                    messages.append({"role": "user", "content": [{"type": "text", "text": _nudge(wave)}]})
            else:
                if not wave.accepted:
                    outcome, reason = "skipped", f"no candidate within max_turns_per_wave={self.max_turns}"
        except (anthropic.APIError, CallTimeLimit) as e:
            reason = describe(e)
            stopping = isinstance(e, anthropic.APIStatusError) and is_stopping(e)
            outcome = "stopped" if stopping else "error"
            if stopping:
                self._stop(f"API: {reason}")
            log.warning("wave %d: %s", number, reason)
        finally:
            if self.done() and outcome == "ok" and not wave.accepted:
                outcome, reason = "stopped", self.stop_reason
            self._write_wave(wave, messages, outcome, reason, started)
        self.failed_in_a_row = 0 if wave.accepted else self.failed_in_a_row + 1
        self.errors_in_a_row = self.errors_in_a_row + 1 if outcome == "error" else 0
        if self.failed_in_a_row >= self.max_failed_waves:
            self._stop(f"{self.failed_in_a_row} waves in a row gave no candidate (last: {reason or outcome})")
        return self._priced(wave)

    def _fresh_conversation(self, wave: "_Wave") -> list[dict]:
        """The wave's opening turn, also after a refusal (the refused context is dropped, the
        candidates already submitted stay)."""
        return [{"role": "user", "content": [{"type": "text", "text": self._state_prompt(wave)}]}]

    def _request(self, messages: list[dict], tail: tuple[int, int] | None) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model, "max_tokens": self.max_tokens, "tools": self.tools,
            "system": [{"type": "text", "text": self.system,
                        "cache_control": {"type": "ephemeral", "ttl": self.system_cache_ttl}}],
            "messages": with_breakpoints(messages, tail),
        }
        if self.thinking:
            request["thinking"] = self.thinking
        if self.effort:
            request["output_config"] = {"effort": self.effort}
        return request

    def _priced(self, wave: "_Wave") -> list[Candidate]:
        """Split the wave's dollars and tokens over its candidates, so per-trial MLflow metrics add
        up to the study's total."""
        share = 1.0 / max(1, len(wave.accepted))
        for c in wave.accepted:
            c.meta["agent_usd"] = wave.usd * share
            c.meta.update({k: v * share for k, v in wave.tokens.as_meta().items()})
        return wave.accepted

    # -- tools -----------------------------------------------------------------------------------
    def _tool_result(self, use: Any, wave: "_Wave") -> dict[str, Any]:
        handlers = {
            EDITOR_NAME: lambda a: wave.files.editor(a),
            "read_results": lambda a: self.board.table(top=a.get("top", 10), last=a.get("last", 20),
                                                       ids=a.get("trial_ids")),
            "read_trial": lambda a: self._read_trial(a, wave),
            "start_from": lambda a: self._start_from(a, wave),
            "submit_candidate": lambda a: self._submit(a, wave),
            "keep_note": self._keep_note,
        }
        args = use.input if isinstance(use.input, dict) else {}
        try:
            if use.name not in handlers:
                raise ToolError(f"unknown tool {use.name!r}")
            return {"type": "tool_result", "tool_use_id": use.id, "content": handlers[use.name](args)}
        except Exception as e:  # noqa: BLE001 - whatever a tool call does wrong, the model hears it, the study goes on
            if not isinstance(e, ToolError):
                log.exception("tool %s failed on %r", use.name, args)
                e = ToolError(f"{use.name} failed: {type(e).__name__}: {e}; check the arguments")
            wave.tool_errors += 1
            wave.broken += isinstance(e, Broken)
            wave.refused += isinstance(e, Refused)
            return {"type": "tool_result", "tool_use_id": use.id, "content": str(e), "is_error": True}

    def _submit(self, args: dict, wave: "_Wave") -> str:
        name = str(args.get("candidate", ""))
        path = wave.files.path_for(name)
        if name in wave.files.submitted:
            raise ToolError(f"{name} was already submitted")
        source = wave.files.files[path]
        knobs = check_candidate(source)
        start, parent = wave.files.starts[name]
        key = code_key(source)
        if key == code_key(start):
            raise ToolError(f"{name} runs the same code as its starting point ({parent or 'baseline'}): "
                            "comments and layout aside, nothing changed, so it would only re-run a seed")
        queued = self.queued.get(key)
        owner = self.board.owner_of(source) or wave.in_flight_codes.get(key) or \
            (queued and f"candidate {queued.meta['agent_candidate']} of wave {queued.meta['agent_wave']}")
        if owner:
            raise ToolError(f"{name} runs the same code as {owner}; make it test a different idea")
        hypothesis = " ".join(str(args.get("hypothesis", "")).split())[:300]
        if not hypothesis:
            raise ToolError("a one-line hypothesis is required")
        kind = args.get("device_kind") or None
        if kind is not None and kind not in self.kinds:
            raise ToolError(f"device_kind {kind!r} is not in this study's kinds {self.kinds}")
        changed = changed_knobs(read_knobs(start), knobs)
        candidate = Candidate(source=source, knobs=changed, parent=parent, hypothesis=hypothesis, device_kind=kind,
                              meta={"role": AGENT, "agent_wave": wave.number, "agent_candidate": name})
        wave.accepted.append(candidate)
        self.queued[key] = candidate
        wave.files.submitted.add(name)
        return (f"accepted {name} ({len(wave.accepted)} of {wave.k}); knobs changed: {changed or 'none (code edit)'}")

    def _start_from(self, args: dict, wave: "_Wave") -> str:
        tid = str(args.get("trial_id", ""))
        source, parent = self._lookup_source(tid, wave)
        wave.files.restart(str(args.get("candidate", "")), source, parent)
        return f"{args.get('candidate')}/train.py is now a copy of {tid}"

    def _lookup_source(self, tid: str, wave: "_Wave") -> tuple[str, str | None]:
        best = self.board.best()
        if tid == "best":
            return self.board.best_source(), best.trial_id if best else None
        if tid == "baseline":
            owner = self.board.owner_of(self.ctx.baseline_source)
            return self.ctx.baseline_source, owner
        if tid in self.board.runs:
            return self.board.runs[tid].source, tid
        if tid in wave.in_flight:
            return wave.in_flight[tid].candidate.source, tid
        raise ToolError(f"no trial {tid!r}; see read_results")

    def _read_trial(self, args: dict, wave: "_Wave") -> str:
        tid = str(args.get("trial_id", ""))
        if tid in ("best", "baseline"):
            best = self.board.best()
            tid = (best.trial_id if best else None) if tid == "best" else self.board.owner_of(self.ctx.baseline_source)
            if tid is None:
                raise ToolError(f"no finished trial is the {args.get('trial_id')} yet")
        source, _ = self._lookup_source(tid, wave)
        run = self.board.runs.get(tid)
        trial = wave.in_flight.get(tid)
        part = args.get("part")
        if part == "log":
            directory = run.directory if run else trial.directory
            lines = int(args.get("lines") or 60)
            log_path = Path(directory) / "run.log"
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            error = f"\n(error: {run.error})" if run and run.error else ""
            return (tail or "(no run.log yet)") + error
        if part == "source":
            return source[: self.view_max_characters]
        if part == "diff":
            against = args.get("against") or "parent"
            parent = (run.parent if run else trial.candidate.parent) if against == "parent" else against
            old, _ = self._lookup_source(parent or "baseline", wave)
            return unified_diff(old, source, f"{parent or 'baseline'}/train.py", f"{tid}/train.py")
        raise ToolError("part must be log, source or diff")

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
        unit = {"seconds": "seconds of training", "steps": "optimizer steps", "tokens": "training tokens"}
        kinds = [f"- `{kind}`: {spec.get('count', '?')} slot(s), relative speed {spec.get('speed', 1.0)}"
                 for kind, spec in sorted(ctx.device_kinds.items())]
        program = string.Template(self.program_template).safe_substitute(
            budget=f"{o.get('budget')} {unit.get(o.get('budget_kind'), o.get('budget_kind'))}",
            warmup_steps=o.get("warmup_steps", 0), hard_limit_s=o.get("hard_limit_s"), corpus=o.get("corpus"),
            vocab_size=o.get("vocab_size"), noise_margin=self.noise_margin, confirm_seeds=self.confirm_seeds,
            device_kinds="\n".join(kinds) or "- one local slot",
        )
        return f"{program}\n\n## The baseline train.py (every study starts from it)\n\n```python\n" \
               f"{ctx.baseline_source}\n```\n"

    def _state_prompt(self, wave: "_Wave") -> str:
        b = self.board
        best = b.best()
        counts = ", ".join(f"{v} {k}" for k, v in sorted(b.counts().items())) or "none yet"
        if best:
            head = (f"Best (kept): {best.trial_id}, val_bpb {b.best_score():.4f} over {len(b.best_runs)} run(s) "
                    f"on {b.best_kind() or '?'}; its decision: {best.decision}.")
        else:
            head = "No kept best yet: your candidates start from the baseline."
        in_flight = [f"- {t.trial_id} [{t.candidate.meta.get('role', AGENT)}, {t.device_kind or '?'}] "
                     f"{t.candidate.hypothesis}" for t in wave.in_flight.values()]
        in_flight += [f"- (waiting for a slot) {c.hypothesis}" for key, c in self.queued.items()
                      if key not in wave.in_flight_codes]
        diff = unified_diff(self.ctx.baseline_source, b.best_source(), "baseline/train.py", "best/train.py")
        start = best.trial_id if best else "the baseline"
        return "\n".join([
            f"# Wave {wave.number}: prepare {wave.k} candidate(s)", "",
            f"## Results so far ({len(b.runs)} finished: {counts}; {len(wave.in_flight)} in flight)", head, "",
            b.table(top=10, last=20), "",
            "## In flight (do not duplicate these)", *(in_flight or ["(none)"]), "",
            "## The current best train.py against the baseline", "```diff", diff, "```", "",
            "## Your notes from earlier waves", self.notes or "(none yet)", "",
            "## This wave",
            f"Candidate files: {', '.join(wave.files.files)}; each starts as a copy of {start}. "
            f"Submit {wave.k} candidate(s) with submit_candidate, each testing a different idea.",
        ])

    # -- bookkeeping -----------------------------------------------------------------------------
    def _baseline_missing(self, ctx: SearchContext) -> bool:
        if not self.run_baseline or self.baseline_issued:
            return False
        known = [r.source for r in self.board.runs.values() if r.status not in INFRA_STATUSES]
        known += [t.candidate.source for t in ctx.in_flight]
        return ctx.baseline_source not in known

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            log.warning("claude searcher stops: %s", reason)

    def _write_wave(self, wave: "_Wave", messages: list[dict], outcome: str, reason: str, started: float) -> None:
        row = {
            "wave": wave.number, "asked": wave.k, "candidates": len(wave.accepted), "outcome": outcome,
            "reason": reason, "turns": wave.turns, "nudges": wave.nudges, "usd": wave.usd,
            "tokens": asdict(wave.tokens), "broken": wave.broken, "refused": wave.refused,
            "tool_errors": wave.tool_errors, "truncations": wave.truncations, "empty_replies": wave.empty,
            "refusals": wave.refusals, "seconds": round(time.time() - started, 3), "model": self.model,
            "prices_checked": self.prices_checked,
        }
        self.waves.append(row)
        with (self.dir / "waves.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        transcript = {**row, "submitted": [{"hypothesis": c.hypothesis, "parent": c.parent, "knobs": c.knobs,
                                            "device_kind": c.device_kind, "file": c.meta["agent_candidate"]}
                                           for c in wave.accepted],
                      "system_prompt": "system_prompt.md", "messages": messages}
        (self.dir / f"wave_{wave.number:04d}.json").write_text(json.dumps(transcript, indent=1, default=str))


class _Wave:
    """One wave's working state."""

    def __init__(self, number: int, k: int, files: CandidateFiles, ctx: SearchContext):
        self.number, self.k, self.files = number, k, files
        self.in_flight = {t.trial_id: t for t in ctx.in_flight}
        self.in_flight_codes = {code_key(t.candidate.source): t.trial_id for t in ctx.in_flight}
        self.accepted: list[Candidate] = []
        self.tokens = Tokens()
        self.usd = 0.0
        self.turns = self.nudges = self.broken = self.refused = self.tool_errors = 0
        self.truncations = self.empty = 0
        self.refusals: list[str] = []  # stop_details.category of each refusal


def _cut_off(max_tokens: int) -> str:
    return (f"Your last reply was cut off at max_tokens={max_tokens} before it finished, so none of its tool "
            "calls ran. Make smaller steps: one str_replace per change, never a whole-file create.")


def _nudge(wave: _Wave) -> str:
    return (f"No candidate has been submitted yet. Edit {', '.join(wave.files.files)} and call submit_candidate "
            f"for each ({wave.k} wanted); a wave without a candidate leaves slots idle.")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
