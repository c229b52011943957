"""How the Claude searcher talks to the Messages API safely: which settings a model takes, which
errors end the agent and which only pause it, how long one call may take, where the cache
breakpoints go, what goes back in a returned turn, and what each stop_reason means.

Kept apart from the searcher so the rules the real API enforces (checked in tests against a strict
fake, tests/fake_anthropic.py) are in one place. What it relies on, read from the installed SDK
(anthropic 2.17: `_base_client.py`, `lib/middleware/_fallbacks.py`, `types/`) and the API docs:

- Models: each model takes some thinking types (an always-adaptive model refuses `enabled` and
  `disabled` with a 400), some effort levels, a max_tokens up to its output limit, and no forced
  `tool_choice` while it thinks. `check_model` turns any of these into one line before any trial.
- Time: the SDK retries a timed-out call (408/409/429/5xx/529 too), so one `create` could block for
  (max_retries + 1) x timeout, and it sleeps whatever `retry-after` a 429 names. `deadline` is SDK
  middleware that runs once per attempt: it gives the attempt only what is left of the deadline,
  refuses a new attempt once it has passed, and raises at once, naming the status, when the API
  asks for a wait longer than what is left.
- Refusals: `stop_reason: "refusal"` is a 200 with `stop_details` (category, explanation). The
  SDK's `BetaRefusalFallbackMiddleware` (beta messages surface) re-sends a refused request to the
  configured fallback models in order, with the refusal's fallback credit token, and a shared
  `BetaFallbackState` keeps the rest of the conversation on the model that accepted.
- Money: `observe` is the innermost middleware, so it sees every answered hop (a refused one the
  fallback middleware retries included) with its own model and usage, and every attempt a read
  timeout cut after the request went out (the model may have generated, and billed, tokens).
- Cache: a breakpoint reads back a cached prefix only if one was written at it or within 20 blocks
  before it; a turn that adds more blocks (many parallel tool calls) would miss with one sliding
  breakpoint, so the previous request's tail keeps its breakpoint too: 1h system + 2 x 5m <= 4.
- Replies: an empty reply is never appended (the API refuses an empty assistant turn); a blank
  text block is dropped before a turn goes back (the API refuses whitespace-only text; thinking
  blocks go back untouched); a reply cut off at max_tokens is dropped whole, tool calls included.
"""
from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import anthropic
import httpx2

# error.details.error_code values that mean "no more requests will succeed until a person acts".
STOPPING_CODES = {
    "enforced_spend_limit_reached", "contract_spend_limit_reached", "linked_organization_spend_limit_reached",
    "linked_organization_billing_unavailable", "organization_on_hold",
}
# The API reports an exhausted prepaid balance and a console usage limit as plain 400s.
STOPPING_MESSAGES = ("credit balance", "usage limit", "spend limit")
CONTEXT_FULL = "model_context_window_exceeded"
# The SDK sends a call non-streamed only if it cannot take over 10 minutes at 128,000 tokens an hour
# (anthropic/_base_client.py `_calculate_nonstreaming_timeout`); above that it must be streamed.
NONSTREAMING_MAX_TOKENS = 128_000 * 600 // 3600
THINKING_TYPES = ("adaptive", "enabled", "disabled")


class CallTimeLimit(RuntimeError):
    """A call (with the SDK's retries) or a wave ran past its time limit, or the API asked for a
    wait past it. Raised by middleware, so the SDK does not retry it. `status` is the HTTP status
    that asked for the wait, if one did."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Clock:
    """Real time; tests and benchmarks pass one whose sleep moves time on at once."""

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)


# -- what each model takes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    max_tokens: int
    context_window: int
    thinking: tuple[str, ...]  # thinking types it accepts; ("adaptive",) = always thinks
    effort: tuple[str, ...]

    @classmethod
    def for_model(cls, table: dict[str, dict[str, Any]], model: str) -> "ModelSpec":
        if model not in table:
            raise ValueError(f"no limits for model {model!r} in searcher.models (known: {sorted(table)}); add its "
                             "max_tokens, context_window, thinking types and effort levels from its model page")
        row = table[model]
        try:
            return cls(int(row["max_tokens"]), int(row["context_window"]), tuple(row["thinking"]), tuple(row["effort"]))
        except KeyError as e:
            raise ValueError(f"searcher.models.{model} lacks {e.args[0]}") from None

    def thinks(self, thinking: dict | None) -> bool:
        kind = (thinking or {}).get("type")
        return kind in ("adaptive", "enabled") or (kind is None and self.thinking == ("adaptive",))


def check_model(model: str, spec: ModelSpec, *, max_tokens: int, thinking: dict | None, effort: str | None,
                what: str = "searcher") -> None:
    """One line for a combination the API refuses with a 400, before any compute."""
    kind = (thinking or {}).get("type")
    if thinking is not None and kind not in THINKING_TYPES:
        raise ValueError(f"{what}.thinking.type must be one of {', '.join(THINKING_TYPES)}, not {kind!r}")
    if thinking is not None and kind not in spec.thinking:
        raise ValueError(f"{model} does not take thinking type {kind!r} (it takes {', '.join(spec.thinking)}): "
                         f"set {what}.thinking to {{type: {spec.thinking[0]}}} and use effort for depth")
    if kind == "enabled" and not 1024 <= int((thinking or {}).get("budget_tokens", 0)) < max_tokens:
        raise ValueError(f"{what}.thinking.budget_tokens must be >= 1024 and below max_tokens ({max_tokens})")
    if not 1 <= max_tokens <= spec.max_tokens:
        raise ValueError(f"{what}.max_tokens={max_tokens} is outside 1..{spec.max_tokens}, {model}'s output limit")
    if effort is not None and effort not in spec.effort:
        raise ValueError(f"{model} has no effort {effort!r} (it has {', '.join(spec.effort)})")


# -- middleware ---------------------------------------------------------------------------------------
def retryable(response: httpx2.Response) -> bool:
    """The SDK's own retry policy for an error response (`_should_retry` in anthropic/_base_client.py)."""
    header = response.headers.get("x-should-retry")
    if header in ("true", "false"):
        return header == "true"
    return response.status_code in (408, 409, 429) or response.status_code >= 500


def retry_after(headers: httpx2.Headers) -> float | None:
    """The wait the API asks for, in seconds, read as the SDK reads it: retry-after-ms, then
    retry-after as seconds, then as an HTTP date."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return float(headers[name]) / scale
        except (KeyError, TypeError, ValueError):
            pass
    parsed = email.utils.parsedate_tz(headers.get("retry-after") or "")
    return None if parsed is None else float(email.utils.mktime_tz(parsed) - time.time())


def deadline(until: float, attempt_timeout: float, *, max_retries: int, clock: Any = Clock,
             on_retry: Callable[[], None] = lambda: None):
    """SDK middleware: each attempt gets at most what is left until `until` (clock.monotonic());
    a retry the API asks to wait for past `until` raises now, naming the status, instead of letting
    the SDK sleep past the deadline. `on_retry` counts the attempts after the first (timeouts,
    429, 5xx, dropped connections), which a response never shows."""
    def handle(request, call_next):
        if request.retries_taken:
            on_retry()
        left = until - clock.monotonic()
        if left <= 0:
            raise CallTimeLimit(f"no answer within the time limit ({request.retries_taken} attempt(s) timed out "
                                "or failed)")
        response = call_next(request.copy(timeout=min(attempt_timeout, left)))
        raw = response.http_response
        if raw.is_success or request.retries_taken >= max_retries or not retryable(raw):
            return response
        wait, left = retry_after(raw.headers), until - clock.monotonic()
        if wait is not None and wait > left:
            raise CallTimeLimit(f"{raw.status_code} {_error_type(raw)}: the API asks to retry after {wait:g} s, "
                                f"past the call's deadline ({max(0.0, left):.1f} s left)", status=raw.status_code)
        return response
    return handle


def observe(on_answer: Callable[[dict, dict], None], on_cut: Callable[[dict, float], None], clock: Any = Clock):
    """SDK middleware, innermost: `on_answer(message, request_body)` for every answered hop of a
    non-streamed call (each refused hop the fallback middleware retries included), `on_cut(request_body,
    seconds)` for every attempt a read timeout ended after the request went out."""
    def handle(request, call_next):
        started = clock.monotonic()
        try:
            response = call_next(request)
        except anthropic.APITimeoutError as e:
            if isinstance(e.__cause__, httpx2.ReadTimeout) and isinstance(request.json, dict):
                on_cut(request.json, clock.monotonic() - started)
            raise
        if response.http_response.is_success and not request.stream and isinstance(request.json, dict):
            try:
                body = json.loads(response.http_response.read())
            except ValueError:
                return response
            if isinstance(body, dict) and body.get("type") == "message":
                on_answer(body, request.json)
        return response
    return handle


def _error_type(response: httpx2.Response) -> str:
    try:
        return str(json.loads(response.read())["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return "error"


# -- conversations -------------------------------------------------------------------------------------
def with_breakpoints(messages: list[dict], previous_tail: tuple[int, int] | None) -> list[dict]:
    """`messages` with a 5-minute breakpoint on the last block (written for the next turn) and on
    the previous request's last block (read back now, however many blocks this turn added)."""
    marks = {(len(messages) - 1, len(messages[-1]["content"]) - 1)}
    if previous_tail is not None:
        marks.add(previous_tail)
    out = []
    for i, m in enumerate(messages):
        if any(mi == i for mi, _ in marks):
            m = {**m, "content": [dict(b, cache_control={"type": "ephemeral"}) if (i, j) in marks else b
                                  for j, b in enumerate(m["content"])]}
        out.append(m)
    return out


def tail_of(messages: list[dict]) -> tuple[int, int]:
    return len(messages) - 1, len(messages[-1]["content"]) - 1


def returned_turn(content: list[Any]) -> tuple[list[dict], int, list[dict]]:
    """What of a reply goes back as its assistant turn: every block as returned (thinking blocks
    untouched), except blank text blocks, which the API refuses, and the fallback middleware's
    seam markers. Returns (blocks, blank blocks dropped, seams)."""
    blocks, blank, seams = [], 0, []
    for b in content:
        d = b.to_dict() if hasattr(b, "to_dict") else dict(b)
        if d.get("type") == "fallback":
            seams.append(d)
        elif d.get("type") == "text" and not str(d.get("text", "")).strip():
            blank += 1
        else:
            blocks.append(d)
    return blocks, blank, seams


def refusal_details(stop_details: Any) -> dict[str, str | None]:
    """stop_details of a refusal as the transcript and the ledger keep it (category and explanation)."""
    get = stop_details.get if isinstance(stop_details, dict) else lambda k: getattr(stop_details, k, None)
    if not stop_details:
        return {"category": None, "explanation": None}
    return {"category": get("category"), "explanation": get("explanation")}


def is_stopping(e: anthropic.APIStatusError) -> bool:
    """True for errors no retry can fix: they need a person (a key, a permission, money)."""
    if isinstance(e, (anthropic.AuthenticationError, anthropic.PermissionDeniedError,
                      anthropic.PaymentRequiredError, anthropic.NotFoundError)):
        return True
    if e.error_code in STOPPING_CODES:
        return True
    message = (e.api_message or "").lower()
    return isinstance(e, anthropic.BadRequestError) and any(m in message for m in STOPPING_MESSAGES)


def is_transient(e: BaseException) -> bool:
    """An outage, not a mistake: rate limits, overload, server errors, timeouts, dropped
    connections, a deadline. They pause the agent; they never end it before `give_up_after_s`."""
    if isinstance(e, CallTimeLimit | anthropic.APIConnectionError):
        return True
    return isinstance(e, anthropic.APIStatusError) and not is_stopping(e) and (
        e.status_code in (408, 409, 429) or e.status_code >= 500)


def describe(e: BaseException) -> str:
    if isinstance(e, anthropic.APIStatusError):
        code = f" ({e.error_code})" if e.error_code else ""
        return f"{type(e).__name__} {e.status_code}{code}: {e.api_message or e.message}"
    if isinstance(e, anthropic.APIError):
        return f"{type(e).__name__}: {e.message}"
    return f"{type(e).__name__}: {e}"
