"""A strict, scripted Messages API behind `httpx2.MockTransport`, so the real `anthropic` SDK (its
request building, retries, timeouts, middleware, error classes, streaming and response parsing) is
exercised without the network.

Strict in both directions, as the API is (Messages API reference and the SDK 2.17 types):

- It refuses what the API refuses, with the API's error envelope: an unknown model (404); max_tokens
  over the model's output limit; a thinking type the model does not take (`enabled` or `disabled`
  on an always-adaptive model), a forced `tool_choice` while thinking is on, an effort level the
  model lacks; malformed tool definitions (bad names, a schema that is not an object, duplicates);
  an empty content or a blank (whitespace-only) text block; a tool_use not answered by a
  tool_result at the start of the next user turn, a tool_result for no tool_use; a thinking block
  not passed back exactly as it was returned; more than 4 cache breakpoints or a 1h one after a
  5m one; unknown request fields; a `fallback_credit_token` without its beta header or one it never
  minted.
- It accepts what the API accepts: a returned assistant turn whose text blocks were changed or
  dropped (only thinking blocks, with their signatures, must come back unchanged).

Responses have the API's shape (thinking / text / tool_use blocks, stop_reason, stop_details for a
refusal with a fallback credit token under the fallback-credit beta, usage with the cache fields
and their TTL split and inference_geo), as JSON or, for `stream: true`, as the server-sent events
the SDK accumulates. Errors carry what the API sends: a 429 has `retry-after` in whole seconds and
the rate-limit headers; a 529 has none (the SDK backs off on its own).

A step of the script is a ready response, a function of the request body, or a failure the
transport raises (a timeout, a dropped connection). With `cache=True` usage is computed from the
request by a model of prompt caching (per model: prefixes written at breakpoints, read back within
the 20-block lookback), so the cost ledger is tested against what the request's layout would cost.

Every fake registers itself; the shared `strict_fake` fixture asserts after each test that no fake
rejected a request the test did not expect it to (`FakeMessagesAPI.expect_rejection`), and that no
call the SDK only sends streamed went out unstreamed.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import httpx2
import pytest

EDITOR = "str_replace_based_edit_tool"
EDITOR_TYPES = {"text_editor_20250728", "text_editor_20250429"}
LOOKBACK_BLOCKS = 20  # the API checks this many blocks before a breakpoint for an earlier cache entry
MAX_BREAKPOINTS = 4
FALLBACK_CREDIT_BETA = "fallback-credit-2026-07-01"
SERVER_FALLBACK_BETA = "server-side-fallback-2026-07-01"
CREDIT_TTL_S = 300  # a fallback credit token expires 5 minutes after the refusal
# The SDK refuses to send a call non-streamed that could take over 10 minutes: 128,000 tokens take an hour.
SDK_NONSTREAMING_TOKENS = 128_000 * 600 // 3600
# The fields of the beta MessageCreateParams in anthropic 2.17 (types/beta/message_create_params.py),
# `betas` aside (it travels as the anthropic-beta header), plus `stream`.
REQUEST_FIELDS = {"max_tokens", "messages", "model", "billing_policy", "cache_control", "compaction", "container",
                  "context_management", "diagnostics", "fallback_credit_token", "fallbacks", "inference_geo",
                  "mcp_servers", "metadata", "output_config", "service_tier", "speed", "stop_sequences", "system",
                  "thinking", "thread", "tool_choice", "tools", "user_profile_id", "workspace_id", "stream"}
BLOCK_FIELDS = {
    "user": {"text": {"type", "text", "cache_control", "citations"},
             "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control"},
             "image": {"type", "source", "cache_control"}, "document": {"type", "source", "cache_control", "title"}},
    "assistant": {"text": {"type", "text", "citations"}, "tool_use": {"type", "id", "name", "input"},
                  "thinking": {"type", "thinking", "signature"}, "redacted_thinking": {"type", "data"}},
}
CUSTOM_TOOL_FIELDS = {"name", "description", "input_schema", "cache_control", "type", "strict", "input_examples",
                      "allowed_callers", "defer_loading", "eager_input_streaming"}
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
THINKING_BLOCKS = ("thinking", "redacted_thinking")
# What the API takes of each model it serves (the models overview and thinking pages, as of the
# price check in conf/searcher/claude.yaml): output limit, the thinking types it accepts (an
# always-adaptive model takes only `adaptive`, and thinks when `thinking` is left out), effort levels.
MODELS: dict[str, dict[str, Any]] = {
    "claude-opus-5-5": {"max_tokens": 128_000, "context_window": 1_000_000, "thinking": ["adaptive"],
                        "effort": ["low", "medium", "high", "xhigh", "max"]},
    "claude-opus-5": {"max_tokens": 128_000, "context_window": 1_000_000, "thinking": ["adaptive"],
                      "effort": ["low", "medium", "high", "xhigh", "max"]},
    "claude-sonnet-5-5": {"max_tokens": 64_000, "context_window": 1_000_000, "thinking": ["adaptive"],
                          "effort": ["low", "medium", "high", "max"]},
    "claude-opus-4-8": {"max_tokens": 128_000, "context_window": 1_000_000, "thinking": ["adaptive", "disabled"],
                        "effort": ["low", "medium", "high", "xhigh", "max"]},
}
_ids = itertools.count(1)
LIVE: list["FakeMessagesAPI"] = []  # every fake made since the strictness fixture last looked


# -- responses -------------------------------------------------------------------------------------
def usage(input_tokens=1500, cache_write_1h=0, cache_write_5m=0, cache_read=0, output_tokens=400,
          inference_geo="global") -> dict:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_write_1h + cache_write_5m,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_1h_input_tokens": cache_write_1h, "ephemeral_5m_input_tokens": cache_write_5m},
        "output_tokens": output_tokens,
        "service_tier": "standard",
        "inference_geo": inference_geo,
    }


def thinking(text: str = "") -> dict:
    """Opus 5.5 returns thinking blocks with empty text unless display is 'summarized'."""
    return {"type": "thinking", "thinking": text, "signature": f"sig-{next(_ids)}-" + "A" * 24}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def tool_use(name: str, input: dict) -> dict:
    return {"type": "tool_use", "id": f"toolu_{next(_ids):06d}", "name": name, "input": input}


def message(*blocks: dict, stop_reason: str | None = None, stop_details: dict | None = None,
            model: str | None = None, **usage_kw) -> tuple:
    """A 200 answer; its `model` is the requested one unless given (the fake answers as that model)."""
    stop = stop_reason or ("tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn")
    body = {"id": f"msg_{next(_ids):08d}", "type": "message", "role": "assistant", "model": model,
            "content": list(blocks), "stop_reason": stop, "stop_sequence": None, "stop_details": stop_details,
            "usage": usage(**usage_kw)}
    return 200, body, {"request-id": f"req_{next(_ids):08d}"}


def empty_reply() -> tuple:
    """end_turn with no content: what Claude 4+ models return when text followed tool results."""
    return message(output_tokens=3)


def truncated(*blocks: dict) -> tuple:
    """Cut off at max_tokens: the last tool call's input may be incomplete (a create with half a file)."""
    return message(*blocks, stop_reason="max_tokens", output_tokens=16000)


def context_full(*blocks: dict) -> tuple:
    """The conversation filled the model's context window mid-reply."""
    return message(*blocks, stop_reason="model_context_window_exceeded", output_tokens=900)


def refusal(category: str | None = "frontier_llm", explanation: str | None = "This request may assist "
            "the development of competing AI models.", before_output: bool = False) -> tuple:
    """stop_reason refusal with stop_details; `before_output`: declined before any output (not billed)."""
    details = {"type": "refusal", "category": category, "explanation": explanation}
    blocks = () if before_output else (text("I can't help with"),)
    return message(*blocks, stop_reason="refusal", stop_details=details, output_tokens=0 if before_output else 12)


class Hang:
    """A call that never answers: the transport waits out the request's read timeout (at most
    `seconds`), then raises the timeout, which the SDK retries."""

    def __init__(self, seconds: float = 60.0):
        self.seconds = seconds

    def fail(self, request: httpx2.Request):
        read = (request.extensions.get("timeout") or {}).get("read") or self.seconds
        time.sleep(min(self.seconds, read))
        raise httpx2.ReadTimeout("timed out", request=request)


class Drop:
    """A connection that fails before any answer (reset, DNS, proxy)."""

    def fail(self, request: httpx2.Request):
        raise httpx2.ConnectError("connection reset by peer", request=request)


def error(status: int, type_: str, msg: str, code: str | None = None, retry_after: int | None = None,
          headers: dict | None = None) -> tuple:
    err: dict[str, Any] = {"type": type_, "message": msg}
    if code:
        err["details"] = {"error_code": code}
    out = {"request-id": f"req_{next(_ids):08d}", **(headers or {})}
    if retry_after is not None:  # the API's own header: whole seconds
        out["retry-after"] = str(int(retry_after))
    return status, {"type": "error", "error": err, "request_id": out["request-id"]}, out


def rate_limited(retry_after: int = 9) -> tuple:
    """A 429 as the API sends it: retry-after in whole seconds and the rate-limit headers."""
    reset = (datetime.now(timezone.utc) + timedelta(seconds=retry_after)).strftime("%Y-%m-%dT%H:%M:%SZ")
    limits = {"anthropic-ratelimit-input-tokens-limit": "2000000", "anthropic-ratelimit-input-tokens-remaining": "0",
              "anthropic-ratelimit-input-tokens-reset": reset, "anthropic-ratelimit-requests-limit": "4000",
              "anthropic-ratelimit-requests-remaining": "3990", "anthropic-ratelimit-requests-reset": reset}
    return error(429, "rate_limit_error", "This request would exceed your organization's rate limit of 2,000,000 "
                 "input tokens per minute.", retry_after=retry_after, headers=limits)


def overloaded() -> tuple:
    """A 529: the API gives no retry-after, so the SDK's own backoff (0.5 s doubling to 8 s) applies."""
    return error(529, "overloaded_error", "Overloaded")


def server_error() -> tuple:
    return error(500, "api_error", "Internal server error")


def spend_limit() -> tuple:
    return error(429, "rate_limit_error", "Your organization has reached its monthly API usage limit.",
                 code="enforced_spend_limit_reached")


def credit_too_low() -> tuple:
    return error(400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API. "
                 "Please go to Plans & Billing to upgrade or purchase credits.")


def bad_key() -> tuple:
    return error(401, "authentication_error", "invalid x-api-key")


# -- what the real API refuses ---------------------------------------------------------------------
class Invalid(Exception):
    """A request the real API answers with an error (400 invalid_request_error unless `status`)."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.type = status, type_


def _strip(block: dict) -> dict:
    return {k: v for k, v in block.items() if k != "cache_control"}


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"))


def _thinking_of(blocks: list[dict]) -> str:
    return _canon([b for b in blocks if b.get("type") in THINKING_BLOCKS])


def thinks(body: dict) -> bool:
    """Whether the model thinks on this request: an always-adaptive model does when `thinking` is left out."""
    kind = (body.get("thinking") or {}).get("type")
    accepted = MODELS.get(body.get("model"), {}).get("thinking", [])
    return kind in ("adaptive", "enabled") or (kind is None and accepted == ["adaptive"])


def validate(body: dict, issued: dict[str, set[str]], betas: set[str] | frozenset = frozenset(),
             minted: dict[str, tuple] | None = None) -> None:
    """Raise Invalid with the API's wording for anything the Messages API rejects. `issued` maps
    each returned tool_use id (or a returned turn's own thinking) to the thinking blocks returned
    with it; `minted` holds the fallback credit tokens the fake gave out."""
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise Invalid(f"{unknown[0]}: Extra inputs are not permitted")
    _validate_model(body)
    _validate_tools(body)
    if "fallbacks" in body and SERVER_FALLBACK_BETA not in betas:
        raise Invalid(f"fallbacks: requires the anthropic-beta header {SERVER_FALLBACK_BETA}")
    if "fallback_credit_token" in body:
        if FALLBACK_CREDIT_BETA not in betas:
            raise Invalid(f"fallback_credit_token: requires the anthropic-beta header {FALLBACK_CREDIT_BETA}")
        token = body["fallback_credit_token"]
        token = token.get("token") if isinstance(token, dict) else token
        if not isinstance(token, str) or token not in (minted or {}):
            raise Invalid("fallback_credit_token: malformed or unknown token")
    system = body.get("system") or []
    for j, b in enumerate([{"type": "text", "text": system}] if isinstance(system, str) else system):
        if b.get("type") == "text" and not str(b.get("text", "")).strip():
            raise Invalid(f"system.{j}.text: text content blocks must contain non-whitespace text")
    messages = body.get("messages") or []
    if not messages or messages[0].get("role") != "user":
        raise Invalid("messages: the first message must use the \"user\" role")
    turns: list[tuple[str, list[dict]]] = []  # consecutive same-role messages are combined, as the API does
    for i, m in enumerate(messages):
        content = m.get("content")
        if set(m) - {"role", "content"}:
            raise Invalid(f"messages.{i}: Extra inputs are not permitted")
        if not content:
            raise Invalid(f"messages.{i}: all messages must have non-empty content except for the optional "
                          "final assistant message")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for j, b in enumerate(blocks):
            allowed = BLOCK_FIELDS[m["role"]].get(b.get("type"))
            if allowed is None:
                raise Invalid(f"messages.{i}.content.{j}: block type {b.get('type')!r} is not allowed in a "
                              f"{m['role']} message")
            if set(b) - allowed:
                raise Invalid(f"messages.{i}.content.{j}.{sorted(set(b) - allowed)[0]}: Extra inputs are not permitted")
            if b["type"] == "text" and not str(b.get("text", "")).strip():
                raise Invalid(f"messages.{i}.content.{j}.text: text content blocks must contain non-whitespace text")
        if m["role"] == "assistant" and i < len(messages) - 1:
            _check_thinking_returned(i, blocks, issued)
        if turns and turns[-1][0] == m["role"]:
            turns[-1][1].extend(blocks)
        else:
            turns.append((m["role"], list(blocks)))
    for k, (role, blocks) in enumerate(turns):
        if role != "assistant":
            continue
        uses = [b["id"] for b in blocks if b["type"] == "tool_use"]
        following = turns[k + 1][1] if k + 1 < len(turns) else []
        n_results = next((i for i, b in enumerate(following) if b["type"] != "tool_result"), len(following))
        answered = {b["tool_use_id"] for b in following[:n_results]}
        missing = [u for u in uses if u not in answered]
        if missing and k + 1 < len(turns):
            raise Invalid(f"messages: `tool_use` ids were found without `tool_result` blocks immediately after: "
                          f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` "
                          "block in the next message.")
    for k, (role, blocks) in enumerate(turns):
        results = [b for b in blocks if b["type"] == "tool_result"]
        if role != "user" or not results:
            continue
        previous = {b["id"] for b in turns[k - 1][1] if b["type"] == "tool_use"} if k else set()
        stray = [b["tool_use_id"] for b in results if b["tool_use_id"] not in previous]
        if stray:
            raise Invalid(f"messages: unexpected `tool_use_id` found in `tool_result` blocks: {stray[0]}. Each "
                          "`tool_result` block must have a corresponding `tool_use` block in the previous message.")
        if any(b["type"] != "tool_result" for b in blocks[:len(results)]):
            raise Invalid("messages: `tool_result` blocks must come first in the user message content")
    if turns[-1][0] != "user":
        raise Invalid("messages: this model does not support assistant message prefill; the conversation must "
                      "end with a user turn")
    marks = [b["cache_control"] for b in _prefix_blocks(body) if "cache_control" in b]
    if len(marks) > MAX_BREAKPOINTS:
        raise Invalid(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(marks)}.")
    ttls = [c.get("ttl", "5m") for c in marks]
    if "5m" in ttls and "1h" in ttls[ttls.index("5m"):]:
        raise Invalid("a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block")


def _check_thinking_returned(i: int, blocks: list[dict], issued: dict[str, set[str]]) -> None:
    """A returned turn's thinking blocks must come back exactly as the API sent them with its tool
    calls (or with its text); its text blocks may be changed or dropped."""
    uses = [b["id"] for b in blocks if b.get("type") == "tool_use"]
    mine = _thinking_of(blocks)
    unknown = [u for u in uses if u not in issued]
    if unknown:
        raise Invalid(f"messages.{i}: tool_use {unknown[0]} was never returned by the API")
    if any(mine not in issued[u] for u in uses):
        raise Invalid(f"messages.{i}: thinking blocks must be passed back exactly as they were returned "
                      "(unmodified, with their signatures) in the turn of their tool calls")
    if not uses and mine != "[]" and mine not in issued.get("turn", set()):
        raise Invalid(f"messages.{i}: a thinking block was modified: its signature does not match")


def _validate_model(body: dict) -> None:
    model = body.get("model")
    spec = MODELS.get(model)
    if spec is None:
        raise Invalid(f"model: {model}", status=404, type_="not_found_error")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise Invalid("max_tokens: Input should be a valid integer >= 0")
    if max_tokens > spec["max_tokens"]:
        raise Invalid(f"max_tokens: {max_tokens} > {spec['max_tokens']}, which is the maximum allowed number of "
                      f"output tokens for {model}")
    config = body.get("thinking")
    kind = config.get("type") if isinstance(config, dict) else None
    if config is not None and kind not in spec["thinking"]:
        raise Invalid(f"\"thinking.type.{kind}\" is not supported for this model. Use \"thinking.type.adaptive\" "
                      "and \"output_config.effort\" to control thinking behavior.")
    if kind == "enabled" and not 1024 <= int(config.get("budget_tokens", 0)) < max_tokens:
        raise Invalid("thinking.budget_tokens: must be >= 1024 and less than max_tokens")
    if kind == "adaptive" and config.get("display") not in (None, "summarized", "omitted"):
        raise Invalid("thinking.display: Input should be 'summarized' or 'omitted'")
    effort = (body.get("output_config") or {}).get("effort")
    if effort is not None and effort not in spec["effort"]:
        raise Invalid(f"output_config.effort: {effort!r} is not supported by {model}; use one of {spec['effort']}")
    choice = (body.get("tool_choice") or {}).get("type")
    if choice in ("any", "tool") and thinks(body):
        raise Invalid("Thinking may not be enabled when tool_choice forces tool use.")
    if choice == "tool" and body["tool_choice"].get("name") not in {t.get("name") for t in body.get("tools") or []}:
        raise Invalid("tool_choice.name: no tool of that name")


def _validate_tools(body: dict) -> None:
    names = set()
    for i, tool in enumerate(body.get("tools") or []):
        kind = tool.get("type")
        if kind in EDITOR_TYPES:
            if tool.get("name") != EDITOR:
                raise Invalid(f"tools.{i}.name: Input should be '{EDITOR}'")
            if "max_characters" in tool and (not isinstance(tool["max_characters"], int) or tool["max_characters"] < 1):
                raise Invalid(f"tools.{i}.max_characters: Input should be an integer >= 1")
        elif kind in (None, "custom"):
            extra = sorted(set(tool) - CUSTOM_TOOL_FIELDS)
            if extra:
                raise Invalid(f"tools.{i}.{extra[0]}: Extra inputs are not permitted")
            if not TOOL_NAME.match(str(tool.get("name", ""))):
                raise Invalid(f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type") != "object":
                raise Invalid(f"tools.{i}.input_schema.type: Input should be 'object'")
            if not isinstance(schema.get("properties", {}), dict) or not isinstance(schema.get("required", []), list):
                raise Invalid(f"tools.{i}.input_schema: JSON schema is invalid")
            if "description" in tool and not isinstance(tool["description"], str):
                raise Invalid(f"tools.{i}.description: Input should be a valid string")
        else:
            raise Invalid(f"tools.{i}.type: unknown tool type {kind!r}")
        if tool.get("name") in names:
            raise Invalid(f"tools: Tool names must be unique: {tool.get('name')}")
        names.add(tool.get("name"))


def _prefix_blocks(body: dict) -> list[dict]:
    """The blocks of a request in cache-prefix order: tools, system, messages."""
    system = body.get("system") or []
    out = list(body.get("tools") or []) + ([{"type": "text", "text": system}] if isinstance(system, str) else list(system))
    for m in body["messages"]:
        content = m["content"]
        out += [{"type": "text", "text": content}] if isinstance(content, str) else [dict(b, _role=m["role"]) for b in content]
    return out


class PromptCache:
    """Prompt caching as the docs describe it, per model (a fallback model does not read the
    requested model's cache): a breakpoint writes the prefix through its block; a request reads the
    longest prefix written before that ends at a breakpoint or up to LOOKBACK_BLOCKS blocks before
    one. Tokens are ~4 characters of the block's JSON."""

    def __init__(self):
        self.written: set[str] = set()

    def usage(self, body: dict, output_tokens: int, inference_geo: str = "global") -> dict:
        blocks = _prefix_blocks(body)
        sizes = [max(1, len(_canon(_strip(b))) // 4) for b in blocks]
        hashes, h = [], hashlib.sha256(str(body.get("model")).encode())
        for b in blocks:
            h.update(_canon(_strip(b)).encode())
            hashes.append(h.copy().hexdigest())
        marks = [(i, b["cache_control"].get("ttl", "5m")) for i, b in enumerate(blocks) if "cache_control" in b]
        read_to = -1
        for i, _ in marks:
            hits = [j for j in range(i, max(-1, i - LOOKBACK_BLOCKS - 1), -1) if hashes[j] in self.written]
            read_to = max([read_to, *hits[:1]])
        last = marks[-1][0] if marks else -1
        last_1h = max((i for i, ttl in marks if ttl == "1h"), default=-1)
        w1h = sum(sizes[read_to + 1:last_1h + 1])
        w5m = sum(sizes[max(read_to, last_1h) + 1:last + 1])
        self.written.update(hashes[i] for i, _ in marks)
        return usage(input_tokens=sum(sizes[max(read_to, last) + 1:]), cache_read=sum(sizes[:read_to + 1]),
                     cache_write_1h=w1h, cache_write_5m=w5m, output_tokens=output_tokens, inference_geo=inference_geo)


# -- the fake API ----------------------------------------------------------------------------------
Step = tuple | Callable[[dict], tuple] | Hang | Drop


class FakeMessagesAPI:
    """Plays `script` one step per HTTP request, then hands requests to `policy` if one is given,
    and keeps every request and response it saw. Running out of both is a test failure, reported as
    a 500 with x-should-retry: false so the SDK stops. A request the real API would refuse gets its
    error and is kept in `rejected`; the strictness fixture fails the test for any the test did not
    announce with `expect_rejection`. `gate`, when set, holds every answer until the test opens it
    (a model that is still thinking). `inference_geo` is where inference runs unless the request
    names one (the workspace default)."""

    def __init__(self, script: list[Step] | None = None, policy: Callable[[dict], tuple] | None = None,
                 cache: bool = False, gate: threading.Event | None = None, inference_geo: str = "global"):
        self.script = list(script or [])
        self.policy = policy
        self.cache = PromptCache() if cache else None
        self.gate = gate
        self.inference_geo = inference_geo
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.timeouts: list[float | None] = []
        self.responses: list[tuple[int, dict]] = []
        self.rejected: list[str] = []
        self.expected: list[str] = []  # substrings of rejections a test provokes on purpose
        self.unstreamed: list[int] = []  # max_tokens of calls the SDK would only send streamed
        self.issued: dict[str, set[str]] = {}  # tool_use id ("turn": any turn) -> the thinking returned with it
        self.minted: dict[str, tuple] = {}  # fallback credit token -> (expiry, model)
        self.lock = threading.Lock()
        LIVE.append(self)

    def expect_rejection(self, words: str) -> None:
        self.expected.append(words)

    def unexpected(self) -> list[str]:
        return [r for r in self.rejected if not any(w in r for w in self.expected)]

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        if request.method != "POST" or request.url.path != "/v1/messages":
            return httpx2.Response(404, json={"type": "error", "error": {"type": "not_found_error",
                                                                          "message": f"{request.url.path}"}})
        if self.gate is not None:
            self.gate.wait(60)
        betas = {b.strip() for b in request.headers.get("anthropic-beta", "").split(",") if b.strip()}
        with self.lock:
            body = json.loads(request.content)
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            self.timeouts.append((request.extensions.get("timeout") or {}).get("read"))
            try:
                validate(body, self.issued, betas, self.minted)
            except Invalid as e:
                self.rejected.append(str(e))
                status, payload, headers = error(e.status, e.type, str(e))
                self.responses.append((status, payload))
                return httpx2.Response(status, json=payload, headers=headers)
            if not body.get("stream") and body["max_tokens"] > SDK_NONSTREAMING_TOKENS:
                self.unstreamed.append(body["max_tokens"])
            step = self.script.pop(0) if self.script else self.policy
        if isinstance(step, (Hang, Drop)):
            step.fail(request)
        if step is None:
            return httpx2.Response(500, headers={"x-should-retry": "false"},
                                   json={"type": "error", "error": {"type": "api_error", "message": "script exhausted"}})
        status, payload, headers = step(body) if callable(step) else step
        with self.lock:
            if status == 200:
                payload = self._answer(copy.deepcopy(payload), body, betas)
            self.responses.append((status, payload))
        if status == 200 and body.get("stream"):
            return httpx2.Response(status, content=sse(payload), headers={**headers, "content-type": "text/event-stream"})
        return httpx2.Response(status, json=payload, headers=headers)

    def _answer(self, payload: dict, body: dict, betas: set[str]) -> dict:
        """The answer as the requested model gives it: its model id, its thinking remembered for the
        next turn, a credit token on a refusal under the beta, the usage the request's layout costs."""
        payload["model"] = payload.get("model") or body["model"]
        thought = _thinking_of(payload["content"])
        for b in payload["content"]:
            if b["type"] == "tool_use":
                self.issued.setdefault(b["id"], set()).add(thought)
        self.issued.setdefault("turn", set()).add(thought)
        geo = body.get("inference_geo") or self.inference_geo
        payload["usage"]["inference_geo"] = geo
        details = payload.get("stop_details")
        if payload["stop_reason"] == "refusal" and details is not None and FALLBACK_CREDIT_BETA in betas:
            token = f"fct_{next(_ids):010d}"
            self.minted[token] = (time.time() + CREDIT_TTL_S, body["model"])
            details.update(fallback_credit_token=token, fallback_has_prefill_claim=False, recommended_model=None)
        if self.cache is not None:
            payload["usage"] = self.cache.usage(body, payload["usage"]["output_tokens"], geo)
        credit = body.get("fallback_credit_token")
        if credit is not None:
            token = credit.get("token") if isinstance(credit, dict) else credit
            expiry, _ = self.minted.pop(token, (0.0, None))
            u = payload["usage"]
            if expiry >= time.time():  # billed as if the conversation had been on this model all along
                moved = u["cache_creation_input_tokens"]
                u.update(cache_read_input_tokens=u["cache_read_input_tokens"] + moved, cache_creation_input_tokens=0,
                         cache_creation={"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0})
                u["fallback_credit"] = {"status": {"type": "redeemed"}}
            else:
                u["fallback_credit"] = {"status": {"type": "not_applied", "reason": "expired"}}
        return payload

    def client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle))

    def usages(self) -> list[dict]:
        """The usage blocks of the messages it answered (what the searcher must have paid for)."""
        return [payload["usage"] for status, payload in self.responses if status == 200]

    def models(self) -> list[str]:
        """The model of each request it answered or refused, in order."""
        return [r["model"] for r in self.requests]


def sse(message: dict) -> bytes:
    """A message as the server-sent events of a streamed answer (message_start, one start, delta
    and stop per block, message_delta with the stop reason and final usage, message_stop)."""
    events = [("message_start", {"type": "message_start", "message": {
        **message, "content": [], "stop_reason": None, "stop_sequence": None, "stop_details": None,
        "usage": {**message["usage"], "output_tokens": 1}}})]
    for i, b in enumerate(message["content"]):
        if b["type"] == "text":
            start, deltas = {"type": "text", "text": ""}, [{"type": "text_delta", "text": b["text"]}]
        elif b["type"] == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = ([{"type": "thinking_delta", "thinking": b["thinking"]}] if b["thinking"] else []) + \
                [{"type": "signature_delta", "signature": b["signature"]}]
        elif b["type"] == "tool_use":
            start, deltas = {**b, "input": {}}, [{"type": "input_json_delta", "partial_json": json.dumps(b["input"])}]
        else:
            start, deltas = b, []
        events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    u = message["usage"]
    events.append(("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": message["stop_reason"], "stop_sequence": None, "stop_details": message.get("stop_details")},
        "usage": {k: u[k] for k in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                                    "cache_read_input_tokens")}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


class VirtualClock:
    """The searcher's clock (and the SDK's retry sleeps) in tests: `sleep` moves time on at once,
    so a 20-minute storm of 529s or a 60 s retry-after costs no real time; real time still passes
    underneath (timeouts of hung calls stay real)."""

    def __init__(self):
        self.offset = 0.0
        self.slept: list[float] = []
        self.lock = threading.Lock()

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time() + self.offset

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.slept.append(float(seconds))
            self.offset += max(0.0, float(seconds))
        time.sleep(0)

    def install_in_sdk(self, monkeypatch) -> "VirtualClock":
        """The SDK's retry loop sleeps through `anthropic._base_client.time`: this clock's sleep instead."""
        import anthropic._base_client as base

        monkeypatch.setattr(base, "time", _SdkTime(self))
        return self

    @contextlib.contextmanager
    def in_sdk(self):
        """`install_in_sdk` outside pytest (the benchmarks), undone on exit."""
        import anthropic._base_client as base

        real, base.time = base.time, _SdkTime(self)
        try:
            yield self
        finally:
            base.time = real


class _SdkTime:
    def __init__(self, clock: VirtualClock):
        self._clock = clock

    def sleep(self, seconds: float) -> None:
        self._clock.sleep(seconds)

    def time(self) -> float:
        return self._clock.time()

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture(autouse=True)
def strict_fake():
    """Every request any fake saw in this test is one the real API accepts (or one the test
    provoked on purpose), and nothing the SDK sends only streamed went out unstreamed."""
    LIVE.clear()
    yield LIVE
    for api in LIVE:
        assert api.unexpected() == [], api.unexpected()
        assert api.unstreamed == [], f"non-streamed calls over the SDK's limit: {api.unstreamed}"
    LIVE.clear()


# -- a scripted agent -------------------------------------------------------------------------------
def last_tool_results(body: dict) -> list[dict]:
    last = body["messages"][-1]
    return [b for b in last["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]


def state_text(body: dict) -> str:
    return body["messages"][0]["content"][0]["text"]


def wave_size(body: dict) -> int:
    return int(re.search(r"prepare (\d+) candidate", state_text(body)).group(1))


def knob_line(view_output: str, knob: str) -> str:
    """The source line of `knob` in a `view` result (line numbers stripped)."""
    for line in view_output.splitlines():
        code = line.split("\t", 1)[-1]
        if re.match(rf"{knob}\s*=", code):
            return code
    raise AssertionError(f"{knob} not in the viewed file")


def _last_tool_uses(body: dict) -> list[dict]:
    """The tool calls the last user message answers (none if it is a prompt or a reminder)."""
    if not last_tool_results(body):
        return []
    return [b for b in body["messages"][-2]["content"] if b.get("type") == "tool_use"]


def wave_number(body: dict) -> int:
    return int(re.search(r"# Wave (\d+)", state_text(body)).group(1))


ENV_DUMP = "import os, sys\nprint('TRIAL_ENV', sorted(os.environ), file=sys.stderr)\n"


class KnobAgent:
    """Plays any number of waves the way a model does, reading the conversation it is sent: view
    the best file, edit one knob per candidate (scaled by the next factor of `factors`), then keep
    a note and submit each candidate with a hypothesis. In wave `dump_env_in_wave`, c1 also prints
    its environment names to the trial log (to show what a trial can see)."""

    def __init__(self, knob: str, factors: list[float], dump_env_in_wave: int | None = None):
        self.knob = knob
        self.factors = list(factors)
        self.dump_env_in_wave = dump_env_in_wave

    def __call__(self, body: dict) -> tuple:
        """The next step follows from what the last tool calls were: nothing yet (or a reminder)
        -> view; a view -> edit; edits -> submit."""
        commands = [u["input"].get("command") for u in _last_tool_uses(body)]
        if "view" in commands:
            return self.edit(body)
        if "str_replace" in commands:
            return self.submit(body)
        return self.view(body)

    def view(self, body):
        return message(thinking("Let me look at the current best."),
                       tool_use(EDITOR, {"command": "view", "path": "c1/train.py"}), cache_write_1h=4000)

    def edit(self, body):
        old = knob_line(last_tool_results(body)[0]["content"], self.knob)
        name, value = old.split("=", 1)
        number = float(value.split("#")[0])
        uses = []
        for i in range(1, wave_size(body) + 1):
            f = self.factors.pop(0) if self.factors else 1.0 + 0.1 * i
            new = f"{name.rstrip()} = {number * f!r}"
            uses.append(tool_use(EDITOR, {"command": "str_replace", "path": f"c{i}/train.py",
                                          "old_str": old, "new_str": new}))
        if wave_number(body) == self.dump_env_in_wave:
            uses.append(tool_use(EDITOR, {"command": "insert", "path": "c1/train.py", "insert_line": 0,
                                          "insert_text": ENV_DUMP}))
        return message(thinking(), text("Trying learning-rate scales."), *uses, cache_read=4000, cache_write_5m=800)

    def submit(self, body):
        edits = [u["input"] for u in _last_tool_uses(body) if u["input"].get("command") == "str_replace"]
        uses = [tool_use("submit_candidate", {"candidate": e["path"].split("/")[0],
                                              "hypothesis": f"{self.knob}: {e['old_str']} -> {e['new_str']}"})
                for e in edits]
        return message(thinking(), tool_use("keep_note", {"text": f"wave {wave_number(body)}: tried {self.knob}"}),
                       *uses, cache_read=4800, output_tokens=300)


def _section(state: str, title: str) -> list[str]:
    """The lines of a '## title' section of the wave's state prompt."""
    match = re.search(rf"## {re.escape(title)}[^\n]*\n(.*?)(?:\n\n|\Z)", state, re.S)
    return match.group(1).splitlines() if match else []


class PopulationAgent:
    """A scripted researcher that uses the whole tool set the way the program asks: each wave it
    reflects on finished trials, combines the best two siblings that tuned different knobs (and
    submits the merge), re-runs the incumbent on the second wave, and sweeps both knobs (values
    never tried before) to fill the rest of the wave. `latency_s` is thinking time per call."""

    KNOBS = ("MATRIX_LR", "WEIGHT_DECAY")

    def __init__(self, latency_s: float = 0.0):
        self.latency_s = latency_s
        self.tried = itertools.count(1)
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> tuple:
        time.sleep(self.latency_s)
        if last_tool_results(body):  # the wave's tools ran: it ends here
            return message(thinking(), text("Submitted; the notes say what is next."), output_tokens=60)
        state, k, wave = state_text(body), wave_size(body), wave_number(body)
        uses = [tool_use("reflect", {"trial_id": t.strip(), "text": f"seen in wave {wave}"})
                for t in ",".join(_section(state, "Finished trials without your reflection")).split(",")[:3] if t.strip()]
        files = [f"c{i}" for i in range(1, k + 1)]
        pair = self._siblings(state)
        if pair and k >= 2:
            uses += [tool_use("combine", {"candidate": files[0], "first": pair[0], "second": pair[1]}),
                     tool_use("submit_candidate", {"candidate": files[0], "hypothesis": f"{pair[0]} + {pair[1]}"})]
            files = files[1:]
        elites = re.findall(r"^- (t\d+) \((?:incumbent|elite)\)", "\n".join(_section(state, "The frontier")), re.M)
        if wave == 2 and elites:
            uses.append(tool_use("rerun", {"trial_id": elites[0], "seeds": 1}))
        left = len(files)
        for file, knob, count in zip(files[::-1], self.KNOBS, (left - left // 2, left // 2)):
            if count:
                with self.lock:
                    values = [round((0.01 if knob == "MATRIX_LR" else 0.02) * (1 + 0.137 * next(self.tried)), 6)
                              for _ in range(min(8, count))]
                uses.append(tool_use("sweep", {"candidate": file, "knobs": {knob: values}, "hypothesis": f"tune {knob}"}))
        uses.append(tool_use("keep_note", {"text": f"wave {wave}: swept both knobs", "mode": "replace"}))
        return message(thinking(), *uses, output_tokens=300)

    def _siblings(self, state: str) -> tuple[str, str] | None:
        """The best two ok trials of the results table with the same parent that tuned different knobs."""
        rows = [line.split("\t") for line in state.splitlines() if re.match(r"t\d+\tok\t", line)]
        tuned = [(float(r[2]), r[0], r[9], re.search(r"tune (\w+)", r[11])) for r in rows if len(r) > 11]
        tuned = sorted((v, t, parent, m.group(1)) for v, t, parent, m in tuned if m)
        for i, (_, a, parent, knob) in enumerate(tuned):
            for _, b, other_parent, other_knob in tuned[i + 1:]:
                if parent == other_parent and knob != other_knob:
                    return a, b
        return None


def population_score(source: str, seed: int) -> float:
    """A smooth val_bpb landscape over two knobs plus seed noise (sigma ~0.003), deterministic."""
    import math as _math

    from train.knobs import read_knobs as _read

    knobs = _read(source)
    lr, wd = float(knobs["MATRIX_LR"]), float(knobs["WEIGHT_DECAY"])
    noise = (int(hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF - 0.5) * 0.01
    return 2.0 + 0.3 * _math.log(lr / 0.025) ** 2 + 2.0 * (wd - 0.1) ** 2 + noise


def simulated_study(tmp_path, api: FakeMessagesAPI, slots: int = 8, max_trials: int = 40, trial_seconds: float = 32.0,
                    sleep: bool = False, **overrides):
    """`run_study` with the claude searcher on the simulated launcher: `slots` H100 slots, trials of
    `trial_seconds` virtual seconds scored by `population_score`. With `sleep`, each trial also
    takes that long for real (8 real workers), so the model's real thinking overlaps the trials as
    it would on real slots. Returns the searcher, the finished (trial, result) pairs, and the slots'
    idle share before the last submission: over the whole study, and after the first agent
    candidate started (the first wave has nothing to overlap with)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from launchers.simulated import SimulatedLauncher
    from study.journal import JournalState
    from study.records import Result
    from study.runner import run_study
    from tests.conftest import ROOT

    def runner(trial_dir, trial, slot):
        if sleep:
            time.sleep(trial_seconds)
        return Result(status="ok", val_bpb=population_score(trial.candidate.source, trial.harness_spec()["seed"]),
                      training_seconds=trial_seconds, total_seconds=trial_seconds, num_steps=8,
                      tokens_per_second=4096.0, peak_memory_mb=900.0)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "searcher=claude", "objective=tiny", "~space", "progress=false", "launcher=simulated",
            f"launcher.slots={slots}", f"study.max_trials={max_trials}", f"study.dir={tmp_path}/study",
            "mlflow.enabled=false"])
    options = {"max_retries": 2, "timeout_s": 0.3, "wave_backoff_s": 0, **overrides}
    searcher = instantiate(cfg.searcher, http_client=api.client(), _convert_="all", **options)
    # with real sleeps, every slot runs for real and the clock may run ahead to each trial's known end
    launcher = SimulatedLauncher(slots=slots, kind="H100", runner=runner, real_workers=slots if sleep else 1,
                                 assume_full_budget=sleep,
                                 seconds_per_budget_unit=trial_seconds / cfg.objective.budget if sleep else None)
    run_study(cfg, searcher=searcher, launcher=launcher)
    finished = JournalState.load(tmp_path / "study" / "journal.jsonl").finished()
    last_submit = max(t.submitted_at for t, _ in finished)
    first_agent = min(t.submitted_at for t, _ in finished if t.candidate.meta.get("role") == "agent")

    def idle_share(start: float) -> float:
        busy = sum(max(0.0, min(r.finished_at, last_submit) - max(r.started_at, start)) for _, r in finished)
        return 1.0 - busy / (slots * (last_submit - start)) if last_submit > start else 0.0

    return searcher, finished, {"all": idle_share(0.0), "after_first_wave": idle_share(first_agent)}


class StormyResearcher:
    """The PopulationAgent behind an API that does what the real one does on a bad day, each once
    in a scripted study: the requested model refuses every request of waves `refusing` (a refusal
    storm, answered by the fallback model), every request gets a 529 for `storm_minutes` of the
    clock from the first request of wave `storm_wave` (an overload storm), the first request after
    it gets a 429 whose retry-after (an hour) is past any call's deadline, and the first reply of
    wave `blank_wave` carries a whitespace-only text block."""

    def __init__(self, clock: VirtualClock, primary: str, latency_s: float = 0.0, refusing: range = range(2, 5),
                 blank_wave: int = 3, storm_wave: int = 5, storm_minutes: float = 20.0, long_retry_after: int = 3600):
        self.clock, self.primary = clock, primary
        self.agent = PopulationAgent(latency_s=latency_s)
        self.refusing, self.blank_wave, self.storm_wave = refusing, blank_wave, storm_wave
        self.storm_s, self.long_retry_after = storm_minutes * 60, long_retry_after
        self.storm_started: float | None = None
        self.events: dict[str, int] = {"refusals": 0, "overloaded": 0, "long_retry_after": 0, "blank_blocks": 0}
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> tuple:
        wave, first = wave_number(body), len(body["messages"]) == 1 and not last_tool_results(body)
        with self.lock:
            if body["model"] == self.primary and wave in self.refusing:
                self.events["refusals"] += 1
                return refusal("frontier_llm")
            if self.storm_started is None and wave >= self.storm_wave:
                self.storm_started = self.clock.monotonic()
            if self.storm_started is not None and self.clock.monotonic() - self.storm_started < self.storm_s:
                self.events["overloaded"] += 1
                return overloaded()
            if self.storm_started is not None and not self.events["long_retry_after"]:
                self.events["long_retry_after"] += 1
                return rate_limited(retry_after=self.long_retry_after)
            blank = wave == self.blank_wave and first and not self.events["blank_blocks"]
            self.events["blank_blocks"] += blank
        status, payload, headers = self.agent(body)
        if blank:
            payload["content"].insert(1, text(" \n "))
        return status, payload, headers


def scripted_study(tmp_path, clock: VirtualClock, slots: int = 8, max_trials: int = 56, trial_seconds: float = 3.0,
                   latency_s: float = 0.0, **overrides):
    """The scripted 8-slot study: a pure-agent study on the simulated launcher, trials that take
    `trial_seconds` for real, the model behind `StormyResearcher`. Returns what `simulated_study`
    does, plus the fake API and the researcher (its `events` say what the API did)."""
    researcher = StormyResearcher(clock, "claude-opus-5-5", latency_s=latency_s)
    api = FakeMessagesAPI(policy=researcher, cache=True)
    options = {"clock": clock, "wave_backoff_s": 30, "noise_z": 6.0, **overrides}
    searcher, finished, idle = simulated_study(tmp_path, api, slots=slots, max_trials=max_trials,
                                               trial_seconds=trial_seconds, sleep=True, **options)
    return searcher, finished, idle, api, researcher
