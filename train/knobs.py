"""Read and set the knobs of a train.py: its ALL_CAPS module-level constants.

Classical searchers change only these values and an agent's diff should stay reviewable, so a
write touches the value expression alone and leaves every other byte of the file as it was
(comments, spacing, the code an agent wrote). Values are literals, so reading never executes
the file.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
import threading
from typing import Any

KNOB_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
MAX_POWER_BITS = 4096  # an arithmetic knob's integer powers stay below this (2**19 is 20 bits)
# A knob's value, and every step of the arithmetic that makes it, fits in an int64: a value past it
# (2**4000 * 2**4000 ...) is no knob. Searchers, trial.json, Optuna and MLflow all handle knobs, and
# a number none of them can write (JSON refuses ints past 4300 digits) stopped the whole study.
MAX_KNOB_INT = (1 << 63) - 1

# Arithmetic on literals is allowed so a knob can read like the paper it came from (2**19).
_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class KnobError(ValueError):
    """A knob that does not exist, or a value of the wrong type for it."""


class _NotLiteral(Exception):
    pass


def read_knobs(source: str) -> dict[str, Any]:
    """Every knob and its value; a name assigned twice keeps its last value, as Python would."""
    return {name: value for name, (value, _) in _locate(source).items()}


def check_knobs(source: str, names) -> None:
    """Fail before any compute is spent when a config names knobs this train.py lacks."""
    known = read_knobs(source)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise KnobError(f"unknown knob(s) {', '.join(unknown)}; train.py has: {', '.join(sorted(known)) or 'none'}")


def write_knobs(source: str, values: dict[str, Any]) -> str:
    """`source` with each named knob's value expression replaced; nothing else changes."""
    check_knobs(source, values)
    located = _locate(source)
    data = source.encode("utf-8")
    line_starts = _line_starts(data)
    edits = []  # (start byte, end byte, new text)
    for name, new in values.items():
        old, nodes = located[name]
        new = _coerce(name, old, new)
        if type(new) is type(old) and new == old:
            continue  # keep the author's spelling, e.g. 2**19
        for node in nodes:
            start = line_starts[node.lineno - 1] + node.col_offset
            end = line_starts[node.end_lineno - 1] + node.end_col_offset
            old_text = data[start:end].decode("utf-8")
            edits.append((start, end, _format(new, old_text)))
    for start, end, text in sorted(edits, reverse=True):
        data = data[:start] + text.encode("utf-8") + data[end:]
    return data.decode("utf-8")


_AST_LOCK = threading.Lock()


def parse_source(source: str, filename: str = "<unknown>") -> ast.Module:
    """ast.parse behind one process-wide lock. CPython 3.11 keeps the AST-to-object recursion depth
    in shared state (gh-106905, fixed only from 3.12), so two threads parsing at once (the loop and
    a searcher thinking in the background) can fail with 'AST constructor recursion depth mismatch'."""
    with _AST_LOCK:
        return ast.parse(source, filename=filename)


def _locate(source: str) -> dict[str, tuple[Any, list[ast.expr]]]:
    """name -> (value, the value expressions of all its top-level assignments)."""
    try:
        tree = parse_source(source)
    except SyntaxError as e:
        raise KnobError(f"train.py does not parse: {e.msg} (line {e.lineno})") from e
    found: dict[str, tuple[Any, list[ast.expr]]] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target = stmt.target
        else:
            continue
        if not (isinstance(target, ast.Name) and KNOB_NAME.match(target.id)):
            continue
        try:
            value = _literal(stmt.value)
        except _NotLiteral:
            continue  # computed constants (MODEL_DIM = DEPTH * 64) are derived, not knobs
        nodes = found[target.id][1] if target.id in found else []
        found[target.id] = (value, nodes + [stmt.value])
    return found


def _literal(node: ast.expr) -> Any:
    return _bounded(_value(node))


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_KNOB_INT:
        raise _NotLiteral
    return value


def _value(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand)
        if _is_number(operand):
            return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _literal(node.left), _literal(node.right)
        if _is_number(left) and _is_number(right):  # each operand bounded already (by _literal)
            if isinstance(node.op, ast.Pow) and _huge_power(left, right):
                raise _NotLiteral  # 9**9**9 would keep whoever reads the knobs (the orchestrator) busy for minutes
            try:
                return _BINARY_OPS[type(node.op)](left, right)
            except (ArithmeticError, ValueError) as e:
                raise _NotLiteral from e
    raise _NotLiteral


def _huge_power(base, exponent) -> bool:
    """An integer power of more than MAX_POWER_BITS bits: Python would compute it, however long."""
    return (isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1
            and exponent * math.log2(abs(base)) > MAX_POWER_BITS)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _coerce(name: str, old: Any, new: Any) -> Any:
    """`new` in the type of the knob's current value, or a KnobError saying why not."""
    def wrong(expected: str) -> KnobError:
        return KnobError(f"knob {name} takes {expected} (it is {old!r}), got {new!r} ({type(new).__name__})")

    if old is None:
        if new is not None and not _is_plain(new):
            raise wrong("a literal")
        return new
    if isinstance(old, bool):
        if not isinstance(new, bool):
            raise wrong("a bool")
        return new
    if isinstance(old, int):
        if isinstance(new, float) and new.is_integer():
            return int(new)  # optimisers often hand integers back as floats
        if isinstance(new, bool) or not isinstance(new, int):
            raise wrong("an int")
        return new
    if isinstance(old, float):
        if not _is_number(new) or not math.isfinite(new):
            raise wrong("a finite number")
        return float(new)
    if isinstance(old, str):
        if not isinstance(new, str):
            raise wrong("a str")
        return new
    if isinstance(old, (tuple, list)):
        if not isinstance(new, (tuple, list)) or not all(_is_plain(v) for v in new):
            raise wrong("a sequence of literals")
        return type(old)(new)
    raise wrong(type(old).__name__)


def _is_plain(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_is_plain(e) for e in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _format(value: Any, old_text: str) -> str:
    """Python source for `value`, keeping the quote style of the text it replaces."""
    if isinstance(value, str) and old_text.startswith('"'):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _line_starts(data: bytes) -> list[int]:
    # ast column offsets count UTF-8 bytes, so edits are made on bytes.
    return [0] + [m.end() for m in re.finditer(b"\n", data)]
