"""A scripted Messages API behind `httpx2.MockTransport`, so the real `anthropic` SDK (its request
building, retries, error classes and response parsing) is exercised without the network.

Responses have the shape the API returns (message id, content blocks of type thinking / text /
tool_use, stop_reason, usage with the cache fields and their TTL split); errors have the API's
error envelope, and `error.details.error_code` where the API sets one. A step of the script is
either a ready response or a function of the request body, so a scripted agent can react to the
tool results it is sent, as a model would.
"""
from __future__ import annotations

import itertools
import json
import re
from typing import Any, Callable

import httpx2

EDITOR = "str_replace_based_edit_tool"
_ids = itertools.count(1)


def usage(input_tokens=1500, cache_write_1h=0, cache_write_5m=0, cache_read=0, output_tokens=400) -> dict:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_write_1h + cache_write_5m,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_1h_input_tokens": cache_write_1h, "ephemeral_5m_input_tokens": cache_write_5m},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def thinking(text: str = "") -> dict:
    """Opus 5.5 returns thinking blocks with empty text unless display is 'summarized'."""
    return {"type": "thinking", "thinking": text, "signature": f"sig-{next(_ids)}-" + "A" * 24}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def tool_use(name: str, input: dict) -> dict:
    return {"type": "tool_use", "id": f"toolu_{next(_ids):06d}", "name": name, "input": input}


def message(*blocks: dict, stop_reason: str | None = None, model: str = "claude-opus-5-5", **usage_kw) -> tuple:
    stop = stop_reason or ("tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn")
    body = {"id": f"msg_{next(_ids):08d}", "type": "message", "role": "assistant", "model": model,
            "content": list(blocks), "stop_reason": stop, "stop_sequence": None, "usage": usage(**usage_kw)}
    return 200, body, {"request-id": f"req_{next(_ids):08d}"}


def error(status: int, type_: str, msg: str, code: str | None = None, retry_after_ms: str | None = "1") -> tuple:
    err: dict[str, Any] = {"type": type_, "message": msg}
    if code:
        err["details"] = {"error_code": code}
    headers = {"request-id": f"req_{next(_ids):08d}"}
    if retry_after_ms is not None:  # lets the SDK's real backoff run in a millisecond
        headers["retry-after-ms"] = retry_after_ms
    return status, {"type": "error", "error": err, "request_id": headers["request-id"]}, headers


def rate_limited() -> tuple:
    return error(429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit")


def overloaded() -> tuple:
    return error(529, "overloaded_error", "Overloaded")


def spend_limit() -> tuple:
    return error(429, "rate_limit_error", "Your organization has reached its monthly API usage limit.",
                 code="enforced_spend_limit_reached")


def credit_too_low() -> tuple:
    return error(400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API. "
                 "Please go to Plans & Billing to upgrade or purchase credits.", retry_after_ms=None)


def bad_key() -> tuple:
    return error(401, "authentication_error", "invalid x-api-key", retry_after_ms=None)


class FakeMessagesAPI:
    """Plays `script` (responses or functions of the request body) one per HTTP request, then hands
    requests to `policy` if one is given, and keeps every request and response it saw. Running out
    of both is a test failure, reported as a 500 with x-should-retry: false so the SDK stops."""

    def __init__(self, script: list[tuple | Callable[[dict], tuple]] | None = None,
                 policy: Callable[[dict], tuple] | None = None):
        self.script = list(script or [])
        self.policy = policy
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.responses: list[tuple[int, dict]] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        step = self.script.pop(0) if self.script else self.policy
        if step is None:
            return httpx2.Response(500, headers={"x-should-retry": "false"},
                                   json={"type": "error", "error": {"type": "api_error", "message": "script exhausted"}})
        status, payload, headers = step(body) if callable(step) else step
        self.responses.append((status, payload))
        return httpx2.Response(status, json=payload, headers=headers)

    def client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle))

    def usages(self) -> list[dict]:
        """The usage blocks of the messages it answered (what the searcher must have paid for)."""
        return [payload["usage"] for status, payload in self.responses if status == 200]


# -- a scripted agent -------------------------------------------------------------------------------
def last_tool_results(body: dict) -> list[dict]:
    last = body["messages"][-1]
    return [b for b in last["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]


def wave_size(body: dict) -> int:
    first = body["messages"][0]["content"][0]["text"]
    return int(re.search(r"prepare (\d+) candidate", first).group(1))


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
    first = body["messages"][0]["content"][0]["text"]
    return int(re.search(r"# Wave (\d+)", first).group(1))


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
