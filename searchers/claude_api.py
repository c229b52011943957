"""How the Claude searcher talks to the Messages API safely: which errors end it, how long one call
may take, where the cache breakpoints go, and what each stop_reason means for the conversation.

Kept apart from the searcher so the rules the real API enforces (checked in tests against a strict
fake, tests/fake_anthropic.py) are in one place:

- Time: the SDK retries a timed-out call (408/5xx/529 too), so one `create` could block for
  (max_retries + 1) x timeout. `deadline` is SDK middleware that runs before every attempt: it gives
  the attempt only what is left of the call's deadline and refuses a new attempt once it has passed.
- Cache: a breakpoint reads back a cached prefix only if one was written at it or within 20 blocks
  before it; a turn that adds more blocks (many parallel tool calls) would miss with one sliding
  breakpoint, so the previous request's tail keeps its breakpoint too: 1h system + 2 x 5m <= 4.
- Replies: an empty reply is never appended (the API refuses an empty assistant turn); a reply cut
  off at max_tokens is dropped whole, tool calls included (the last one's input may be cut off);
  a refusal means the conversation is reset, since a refused context keeps refusing.
"""
from __future__ import annotations

import time
from typing import Any

import anthropic

# error.details.error_code values that mean "no more requests will succeed until a person acts".
STOPPING_CODES = {
    "enforced_spend_limit_reached", "contract_spend_limit_reached", "linked_organization_spend_limit_reached",
    "linked_organization_billing_unavailable", "organization_on_hold",
}
# The API reports an exhausted prepaid balance and a console usage limit as plain 400s.
STOPPING_MESSAGES = ("credit balance", "usage limit", "spend limit")
TRUNCATED = ("max_tokens", "model_context_window_exceeded")


class CallTimeLimit(RuntimeError):
    """A call (with the SDK's retries) or a wave ran past its time limit. Raised by middleware, so
    the SDK does not retry it."""


def deadline(until: float, attempt_timeout: float, on_retry=lambda: None):
    """SDK middleware: each attempt gets at most what is left until `until` (time.monotonic());
    `on_retry` counts the attempts the SDK makes after the first (timeouts, 429, 5xx, dropped
    connections), which a response never shows."""
    def handle(request, call_next):
        if request.retries_taken:
            on_retry()
        left = until - time.monotonic()
        if left <= 0:
            raise CallTimeLimit(f"no answer within the time limit ({request.retries_taken} attempt(s) timed out "
                                "or failed)")
        return call_next(request.copy(timeout=min(attempt_timeout, left)))
    return handle


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


def refusal_category(response: Any) -> str:
    details = getattr(response, "stop_details", None)
    return (getattr(details, "category", None) or "uncategorised") if details else "uncategorised"


def is_stopping(e: anthropic.APIStatusError) -> bool:
    """True for errors no retry can fix: they need a person (a key, a permission, money)."""
    if isinstance(e, (anthropic.AuthenticationError, anthropic.PermissionDeniedError,
                      anthropic.PaymentRequiredError, anthropic.NotFoundError)):
        return True
    if e.error_code in STOPPING_CODES:
        return True
    message = (e.api_message or "").lower()
    return isinstance(e, anthropic.BadRequestError) and any(m in message for m in STOPPING_MESSAGES)


def describe(e: Exception) -> str:
    if isinstance(e, anthropic.APIStatusError):
        code = f" ({e.error_code})" if e.error_code else ""
        return f"{type(e).__name__} {e.status_code}{code}: {e.api_message or e.message}"
    if isinstance(e, anthropic.APIError):
        return f"{type(e).__name__}: {e.message}"
    return f"{type(e).__name__}: {e}"
