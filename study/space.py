"""The knob space the classical searchers explore: checked against train.py before any compute.

A space (conf/space/*.yaml) maps a knob of train.py to a spec:
  type: float | int | categorical   (inferred from the baseline value when omitted)
  low, high, log, step               the range Optuna samples (float and int)
  levels: [...]                      ordered values for grid and greedy (float and int)
  choices: [...]                     the values of a categorical knob (`levels`, if given, the
                                     subset grid and greedy use, in the order greedy walks)
A typo in a space would otherwise surface hours later as a crashed or silently wasted trial, so
every mistake is one clear line here, before the study starts.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

SPEC_KEYS = {"type", "low", "high", "log", "step", "levels", "choices"}
TYPES = ("float", "int", "categorical")


def validate_space(space: Mapping, baseline_knobs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The space as plain dicts with every spec normalised (types checked, numeric levels
    sorted, int/float values cast), or a ValueError naming the knob and what is wrong."""
    space = plain(space)
    if not isinstance(space, dict) or not space:
        raise ValueError(f"expected a non-empty mapping knob -> spec, got {space!r}")
    return {name: _validate_knob(name, spec, baseline_knobs) for name, spec in space.items()}


def _validate_knob(name: str, spec: Any, baseline_knobs: Mapping[str, Any]) -> dict[str, Any]:
    def bad(msg: str) -> ValueError:
        return ValueError(f"knob {name}: {msg}")

    if name not in baseline_knobs:
        raise ValueError(f"knob {name} is not a knob of train.py (it has: {', '.join(sorted(baseline_knobs))})")
    if not isinstance(spec, dict):
        raise bad(f"expected a spec mapping (type, low, high, levels, choices), got {spec!r}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}; a spec takes {', '.join(sorted(SPEC_KEYS))}")
    baseline = baseline_knobs[name]
    kind = spec.get("type") or ("categorical" if "choices" in spec else _numeric_type(baseline))
    if kind not in TYPES:
        raise bad(f"type {kind!r} is not one of {', '.join(TYPES)}")
    if kind == "categorical":
        return _validate_categorical(spec, baseline, bad)
    if _numeric_type(baseline) != kind:
        raise bad(f"type {kind} does not match train.py's value {baseline!r} ({type(baseline).__name__})")
    return _validate_numeric(kind, spec, bad)


def _validate_categorical(spec: dict, baseline: Any, bad) -> dict[str, Any]:
    extra = sorted(set(spec) - {"type", "choices", "levels"})
    if extra:
        raise bad(f"a categorical knob takes `choices` (and `levels`, a subset for grid/greedy), not {', '.join(extra)}")
    out: dict[str, Any] = {"type": "categorical"}
    for field in ("choices", "levels"):
        if field in spec:
            values = spec[field]
            if not isinstance(values, list) or not values:
                raise bad(f"`{field}` must be a non-empty list")
            values = [_cast_like(baseline, v, bad) for v in values]
            if len({json.dumps(v) for v in values}) != len(values):
                raise bad(f"duplicate {field} in {values}")
            out[field] = values
    if not out.keys() & {"choices", "levels"}:
        raise bad("categorical needs a non-empty list `choices`")
    out.setdefault("choices", out.get("levels"))
    out.setdefault("levels", out["choices"])
    outside = [v for v in out["levels"] if v not in out["choices"]]
    if outside:
        raise bad(f"levels {outside} are not among the choices {out['choices']}")
    return out


def _validate_numeric(kind: str, spec: dict, bad) -> dict[str, Any]:
    if "choices" in spec:
        raise bad(f"`choices` is for categorical knobs; a {kind} knob takes low/high/levels")
    cast = int if kind == "int" else float
    out: dict[str, Any] = {"type": kind}
    if "levels" in spec:
        raw = spec["levels"]
        if not isinstance(raw, list) or not raw:
            raise bad("`levels` must be a non-empty list")
        values = sorted(_number(kind, v, bad) for v in raw)
        if len(set(values)) != len(values):
            raise bad(f"duplicate levels in {raw}")
        out["levels"] = values
    has_range = "low" in spec or "high" in spec
    if has_range:
        if "low" not in spec or "high" not in spec:
            raise bad("give both `low` and `high`")
        low, high = _number(kind, spec["low"], bad), _number(kind, spec["high"], bad)
        if low >= high:
            raise bad(f"low {low} must be below high {high}")
        out.update(low=low, high=high)
    elif "levels" in out:
        out.update(low=out["levels"][0], high=out["levels"][-1])
    else:
        raise bad("give `low` and `high`, or `levels`")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise bad(f"`log` must be true or false, got {log!r}")
    if log and out["low"] <= 0:
        raise bad(f"log scale needs low > 0, got {out['low']}")
    out["log"] = log
    if spec.get("step") is not None:
        step = _number(kind, spec["step"], bad)
        if step <= 0:
            raise bad(f"step must be positive, got {step}")
        if log:
            raise bad("`step` and `log` cannot be combined (Optuna samples one or the other)")
        out["step"] = cast(step)
    if has_range and "levels" in out:
        outside = [v for v in out["levels"] if not out["low"] <= v <= out["high"]]
        if outside:
            raise bad(f"levels {outside} lie outside [{out['low']}, {out['high']}]")
    return out


def _numeric_type(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "categorical"
    return "int" if isinstance(value, int) else "float"


def _number(kind: str, v: Any, bad) -> int | float:
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(f"{v!r} is not an int")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{v!r} is not a finite number")
    return float(v)


def _cast_like(baseline: Any, v: Any, bad) -> Any:
    """A choice in the type of the knob's baseline value (train.py must stay valid Python that
    means the same thing: a float knob may take 0, an int knob never takes 2.5)."""
    if isinstance(baseline, (tuple, list)):
        if not isinstance(v, (tuple, list)):
            raise bad(f"choice {v!r} is not a sequence like train.py's {baseline!r}")
        return list(v)
    if isinstance(baseline, float) and _numeric_type(v) in ("int", "float"):
        return float(v)
    if baseline is not None and type(v) is not type(baseline):
        raise bad(f"choice {v!r} ({type(v).__name__}) does not match train.py's value "
                  f"{baseline!r} ({type(baseline).__name__})")
    return v


def plain(obj: Any) -> Any:
    """Hydra hands over DictConfig/ListConfig; the searchers and the journal want plain data."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return [plain(v) for v in obj]
    return obj
