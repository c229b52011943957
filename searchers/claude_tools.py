"""The agent's tools for one wave: an editor confined to this wave's candidate files, and checks a
candidate must pass before it may take a slot.

Candidate files live in memory, never on disk, so no path the model writes can reach the file
system: a path is looked up in a dict of this wave's files (`c1/train.py`, ...) and anything else is
a tool error the model reads, not a crash. The fixed harness files may be viewed (the agent should
know the metric and the contract it is scored by) but never edited.
"""
from __future__ import annotations

import posixpath
from typing import Any

from study.core import PROJECT_ROOT, KnobError, SearchContext
from train.contract import TRAIN_FILE

EDITOR_NAME = "str_replace_based_edit_tool"
READ_ONLY = ("train/run.py", "train/prepare.py")  # the run API train.py codes against; the metric


class ToolError(Exception):
    """Returned to the model as an `is_error` tool result."""


class Refused(ToolError):
    """A path outside the wave's files, or an edit to a fixed or submitted file."""


class Broken(ToolError):
    """A submitted candidate that cannot run: it does not compile or its knobs do not parse."""


def tool_definitions(editor_type: str, max_characters: int, device_kinds: list[str],
                     max_sweep: int = 8, screening: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """The tools of every wave; `screening` is (slower kind, faster kind) when the study has both."""
    submit_properties: dict[str, Any] = {
        "candidate": {"type": "string", "description": "c1, c2, ..."},
        "hypothesis": {"type": "string", "description": "one line: what you changed and why it should lower val_bpb"},
    }
    placement: dict[str, Any] = {}
    if device_kinds:
        placement["device_kind"] = {"type": "string", "enum": device_kinds,
                                    "description": "the device kind this candidate should run on (optional)"}
    if screening:
        placement["screen"] = {"type": "boolean", "description": f"screen it on {screening[0]} first; if the keep "
                               f"rule finds it promising it is confirmed on {screening[1]} without a model call"}
    submit_properties.update(placement)
    return [
        {"type": editor_type, "name": EDITOR_NAME, "max_characters": max_characters},
        {
            "name": "read_results",
            "description": "The study's results as TSV: the best `top` trials by val_bpb, then the `last` "
                           "finished ones; or exactly the trials named in `trial_ids`.",
            "input_schema": {"type": "object", "properties": {
                "top": {"type": "integer", "minimum": 0}, "last": {"type": "integer", "minimum": 0},
                "trial_ids": {"type": "array", "items": {"type": "string"}}}},
        },
        {
            "name": "read_trial",
            "description": "One trial's run.log tail ('log'), its train.py ('source'), or the diff of its "
                           "train.py against its parent, the baseline or the current best ('diff').",
            "input_schema": {"type": "object", "required": ["trial_id", "part"], "properties": {
                "trial_id": {"type": "string"},
                "part": {"type": "string", "enum": ["log", "source", "diff"]},
                "against": {"type": "string", "enum": ["parent", "baseline", "best"]},
                "lines": {"type": "integer", "minimum": 1, "maximum": 400}}},
        },
        {
            "name": "start_from",
            "description": "Replace a candidate file with the train.py of a trial: any elite of the frontier, any "
                           "finished trial, 'baseline' or 'best'. Candidates start from the incumbent otherwise.",
            "input_schema": {"type": "object", "required": ["candidate", "trial_id"], "properties": {
                "candidate": {"type": "string", "description": "c1, c2, ..."},
                "trial_id": {"type": "string"}}},
        },
        {
            "name": "combine",
            "description": "Replace a candidate file with a three-way merge of two trials' train.py against their "
                           "nearest common ancestor, to test two ideas together. Edits to the same lines leave "
                           "conflict markers that you must resolve (view, then str_replace) before submitting.",
            "input_schema": {"type": "object", "required": ["candidate", "first", "second"], "properties": {
                "candidate": {"type": "string"}, "first": {"type": "string", "description": "a trial id"},
                "second": {"type": "string", "description": "a trial id"}}},
        },
        {
            "name": "submit_candidate",
            "description": "Submit a candidate file for a training run. It must compile, its knobs must "
                           "parse, and it must differ from its starting point and from every trial so far. "
                           "A submitted candidate is final. You may submit more candidates than there are free "
                           "slots: the extra ones wait in a queue and start as soon as a slot frees.",
            "input_schema": {"type": "object", "required": ["candidate", "hypothesis"], "properties": submit_properties},
        },
        {
            "name": "sweep",
            "description": "Submit one idea as a small factorial wave: the candidate file (after your edits) with "
                           "each combination of the given knob values, one trial each (at most "
                           f"{max_sweep}). The file is final afterwards.",
            "input_schema": {"type": "object", "required": ["candidate", "knobs", "hypothesis"], "properties": {
                "candidate": {"type": "string"},
                "knobs": {"type": "object", "description": "knob name -> list of values, e.g. "
                          "{\"MATRIX_LR\": [0.02, 0.04], \"WARMDOWN_RATIO\": [0.3, 0.6]}",
                          "additionalProperties": {"type": "array", "minItems": 1}},
                "hypothesis": {"type": "string"}, **placement}},
        },
        {
            "name": "analyze",
            "description": "The whole history aggregated, each number a difference from the baseline on the "
                           "run's own device kind with its standard error and a verdict (better / worse / within "
                           "noise). by: 'knob' (each value of each knob), 'pair' (two knobs together, with their "
                           "interaction), 'edit' (each kind of edit against its parent), 'parent' (children of "
                           "each parent), 'kind' (each device kind), 'runs' (the matching runs). Filters: knob, "
                           "parent, idea (words of hypotheses and reflections), device_kind.",
            "input_schema": {"type": "object", "required": ["by"], "properties": {
                "by": {"type": "string", "enum": ["knob", "pair", "edit", "parent", "kind", "runs"]},
                "knob": {"type": "string"},
                "knobs": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
                "parent": {"type": "string"}, "idea": {"type": "string"},
                **({"device_kind": {"type": "string", "enum": device_kinds}} if device_kinds else {})}},
        },
        {
            "name": "rerun",
            "description": "Run a finished trial's exact code again on a device kind with new seeds: to measure "
                           "its noise, to see how it does on other hardware, or to firm up an elite. Scores are "
                           "judged against the baseline on the same kind, so faster hardware earns no credit.",
            "input_schema": {"type": "object", "required": ["trial_id"], "properties": {
                "trial_id": {"type": "string"},
                **({"device_kind": {"type": "string", "enum": device_kinds}} if device_kinds else {}),
                "seeds": {"type": "integer", "minimum": 1, "maximum": 4, "description": "how many runs (default 1)"}}},
        },
        {
            "name": "reflect",
            "description": "Record a one-line reflection on a finished trial's result (what it taught, why it "
                           "won or failed). It shows in the results table for all later waves.",
            "input_schema": {"type": "object", "required": ["trial_id", "text"], "properties": {
                "trial_id": {"type": "string"}, "text": {"type": "string"}}},
        },
        {
            "name": "keep_note",
            "description": "Save a note for your future waves (each wave starts from a fresh conversation; "
                           "only the results table, the best diff and these notes carry over). "
                           "mode 'append' adds, 'replace' rewrites all notes.",
            "input_schema": {"type": "object", "required": ["text"], "properties": {
                "text": {"type": "string"}, "mode": {"type": "string", "enum": ["append", "replace"]}}},
        },
    ]


class CandidateFiles:
    """This wave's editable files, and the text-editor commands on them."""

    def __init__(self, names: list[str], source: str, parent: str | None, max_characters: int):
        self.files = {f"{n}/train.py": source for n in names}
        self.starts = {n: (source, parent) for n in names}
        self.submitted: set[str] = set()
        self.combined: dict[str, str] = {}  # candidate -> the second parent a combine merged in
        self.max_characters = max_characters

    @staticmethod
    def name_of(path: str) -> str:
        return path.split("/", 1)[0]

    def path_for(self, candidate: str) -> str:
        path = f"{candidate}/train.py"
        if path not in self.files:
            raise ToolError(f"no candidate {candidate!r}; this wave's candidates are {self._names()}")
        return path

    def restart(self, candidate: str, source: str, parent: str | None) -> None:
        path = self.path_for(candidate)
        self._writable(path)
        self.files[path] = source
        self.starts[candidate] = (source, parent)
        self.combined.pop(candidate, None)

    # -- the Anthropic text editor tool ----------------------------------------------------------
    def editor(self, args: dict[str, Any]) -> str:
        command = args.get("command")
        raw = args.get("path")
        if not isinstance(raw, str) or not raw.strip():
            raise ToolError("a path is required")
        path = self._resolve(raw)
        if command == "view":
            return self._view(path, args.get("view_range"))
        self._writable(path)
        text = self.files[path]
        if command == "str_replace":
            old, new = args.get("old_str"), args.get("new_str") or ""
            if not isinstance(old, str) or not old:
                raise ToolError("old_str is required and must be non-empty")
            count = text.count(old)
            if count == 0:
                raise ToolError(f"old_str not found in {path}; view the file and copy the text exactly")
            if count > 1:
                raise ToolError(f"old_str occurs {count} times in {path}; include more context to make it unique")
            self.files[path] = text.replace(old, new, 1)
            line = text[: text.index(old)].count("\n") + 1
            return f"edited {path} at line {line}\n" + self._snippet(path, line, new.count("\n") + 1)
        if command == "insert":
            at = args.get("insert_line")
            new = args.get("insert_text", args.get("new_str"))
            lines = text.split("\n")
            if not isinstance(at, int) or not 0 <= at <= len(lines):
                raise ToolError(f"insert_line must be an integer in [0, {len(lines)}]")
            if not isinstance(new, str):
                raise ToolError("insert_text is required")
            self.files[path] = "\n".join(lines[:at] + new.split("\n") + lines[at:])
            return f"inserted after line {at} of {path}\n" + self._snippet(path, at + 1, new.count("\n") + 1)
        if command == "create":
            new = args.get("file_text")
            if not isinstance(new, str):
                raise ToolError("file_text is required")
            self.files[path] = new
            return f"rewrote {path} ({len(new.splitlines())} lines)"
        if command == "undo_edit":
            raise ToolError("undo_edit is not supported; use str_replace to change the text back")
        raise ToolError(f"unknown command {command!r}; use view, str_replace, insert or create")

    def _resolve(self, raw: str) -> str:
        path = posixpath.normpath(raw.strip().lstrip("/"))
        if path in self.files or path in READ_ONLY or path in (".", ""):
            return path
        if path.startswith(".."):
            raise Refused(f"{raw!r} is outside this wave's workspace; editable files: {self._paths()}")
        raise Refused(f"{raw!r} is not a file you may open; editable: {self._paths()}; "
                      f"read-only: {', '.join(READ_ONLY)}")

    def _writable(self, path: str) -> None:
        if path in READ_ONLY:
            raise Refused(f"{path} is fixed (data, metric, budget): it is not yours to edit; "
                            f"edit only {self._paths()}")
        if path not in self.files:
            raise Refused(f"{path!r} is not an editable file; editable: {self._paths()}")
        if self.name_of(path) in self.submitted:
            raise Refused(f"{self.name_of(path)} was submitted and is final")

    def _view(self, path: str, view_range: Any) -> str:
        if path in (".", ""):
            listing = [f"{p}{'  (submitted)' if self.name_of(p) in self.submitted else ''}" for p in self.files]
            return "\n".join(listing + [f"{p}  (read-only)" for p in READ_ONLY])
        try:
            text = self.files[path] if path in self.files else (PROJECT_ROOT / path).read_text()
        except OSError as e:
            raise ToolError(f"{path} cannot be read here: {e.strerror}") from None
        lines = text.split("\n")
        start, end = 1, len(lines)
        if view_range is not None:
            if not (isinstance(view_range, list) and len(view_range) == 2 and all(isinstance(v, int) for v in view_range)):
                raise ToolError("view_range must be [start, end] (1-based, end -1 = to the end)")
            start, end = view_range[0], len(lines) if view_range[1] == -1 else view_range[1]
            if not 1 <= start <= end <= len(lines):
                raise ToolError(f"view_range out of bounds: the file has {len(lines)} lines")
        out = "\n".join(f"{i:6d}\t{lines[i - 1]}" for i in range(start, end + 1))
        if len(out) > self.max_characters:
            out = out[: self.max_characters] + "\n... (truncated: view a smaller view_range)"
        return out

    def _snippet(self, path: str, line: int, n: int) -> str:
        lines = self.files[path].split("\n")
        a, b = max(1, line - 3), min(len(lines), line + n + 3)
        return "\n".join(f"{i:6d}\t{lines[i - 1]}" for i in range(a, b + 1))

    def _paths(self) -> str:
        return ", ".join(self.files)

    def _names(self) -> str:
        return ", ".join(self.starts)


def check_candidate(source: str) -> dict[str, Any]:
    """The cheapest checks that a candidate can run at all: it compiles and its knobs parse.
    Returns the knobs; raises ToolError with what to fix."""
    try:
        compile(source, TRAIN_FILE, "exec")
    except SyntaxError as e:
        raise Broken(f"does not compile: {e.msg} at line {e.lineno}: {(e.text or '').strip()}") from None
    except ValueError as e:  # e.g. null bytes
        raise Broken(f"does not compile: {e}") from None
    try:
        return SearchContext.knobs_of(source)
    except KnobError as e:
        raise Broken(f"knobs do not parse: {e}") from None


def changed_knobs(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in after.items() if before.get(k, object()) != v}
