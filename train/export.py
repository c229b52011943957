"""Inside the sandbox: the trained model written out as data, the only form in which it leaves.

After train() returns, the worker exports the model with torch.export (batch 1, any sequence length
from 2 to the objective's eval_seq_len) and writes it in the arena's graph format (train/graph.py):
the ATen operator calls of the forward pass and the tensors they read, in one file of the scratch.
The trusted scorer reads that file and evaluates it itself; no code of the candidate runs there.

A model that does not export, or whose exported program uses anything but tensor operators (a
Python callback, a custom operator, a mutation of its own state, randomness), gets an error the
agent can act on: it names the construct, and the trial is `invalid`.
"""
from __future__ import annotations

import json
import math
import operator
import warnings
from pathlib import Path

import torch

from train.graph import DTYPES, FORMAT, HEADER

MIN_EXPORT_LENGTH = 2  # torch.export treats sizes 0 and 1 as special; shorter rows are never scored
_PYTHON_NAMES = {operator.getitem: "operator.getitem", operator.add: "operator.add", operator.sub: "operator.sub",
                 operator.mul: "operator.mul", operator.floordiv: "operator.floordiv", operator.mod: "operator.mod",
                 operator.neg: "operator.neg", operator.eq: "operator.eq", operator.ne: "operator.ne",
                 operator.lt: "operator.lt", operator.le: "operator.le", operator.gt: "operator.gt",
                 operator.ge: "operator.ge", torch.sym_max: "torch.sym_max", torch.sym_min: "torch.sym_min"}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class Unexportable(Exception):
    """The model cannot cross to the scorer as a tensor program; the message says why, for the agent."""


def export_model(model: torch.nn.Module, seq_len: int, path: Path) -> int:
    """Write `model` as a graph file at `path`; its size in bytes."""
    program = _export(model, seq_len)
    header, payload = _document(program)
    head = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as out:
        out.write(HEADER.pack(len(head)))
        out.write(head)
        for chunk in payload:
            out.write(chunk)
    return HEADER.size + len(head) + sum(len(c) for c in payload)


def _export(model: torch.nn.Module, seq_len: int):
    from torch.export import Dim, export

    if seq_len < MIN_EXPORT_LENGTH:
        raise Unexportable(f"eval_seq_len must be at least {MIN_EXPORT_LENGTH}")
    model = getattr(model, "_orig_mod", model).eval()  # torch.compile's wrapper: export the module itself
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.zeros(1, seq_len, dtype=torch.int64, device=device)
    length = Dim("seq_len", min=MIN_EXPORT_LENGTH, max=seq_len)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, not the agent's
            program = export(model, (example,), dynamic_shapes=({1: length},), strict=False)
    except Exception as e:  # noqa: BLE001 - every reason export gives is the agent's to read
        raise Unexportable(f"torch.export could not export the model at batch 1 and any length from "
                           f"{MIN_EXPORT_LENGTH} to {seq_len}: {_first_line(e)}") from None
    if any(_mutates(node) for node in program.graph.nodes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = program.run_decompositions({})  # functionalise in-place operators on intermediates
    return program


def _mutates(node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:500]


def _document(program) -> tuple[dict, list[bytes]]:
    from torch.export.graph_signature import InputKind, OutputKind

    signature = program.graph_signature
    outputs = [spec for spec in signature.output_specs]
    if [spec.kind for spec in outputs] != [OutputKind.USER_OUTPUT]:
        kinds = ", ".join(spec.kind.name.lower() for spec in outputs)
        raise Unexportable(f"forward must return the logits tensor alone and change no state of the model "
                           f"(its export returns: {kinds})")
    values = {**program.state_dict, **program.constants}
    tensors, payload, offset, stored = {}, [], 0, {}
    inputs = []
    for spec in signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            inputs.append({"name": name, "input": True})
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise Unexportable(f"the exported model takes a {spec.kind.name.lower()} input ({name}): only "
                               "parameters, buffers and constant tensors can be scored")
        tensor = values[spec.target].detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key not in stored:  # tied weights are stored once
            if tensor.dtype not in _DTYPE_NAMES:
                raise Unexportable(f"{spec.target} is a {tensor.dtype} tensor; allowed: {sorted(DTYPES)}")
            raw = tensor.to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes() \
                if tensor.numel() else b""
            stored[key] = spec.target
            tensors[spec.target] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                    "offset": offset, "nbytes": len(raw)}
            payload.append(raw)
            offset += len(raw)
        inputs.append({"name": name, "tensor": stored[key], "parameter": spec.kind == InputKind.PARAMETER})
    nodes, output = [], None
    for node in program.graph.nodes:
        if node.op == "call_function":
            nodes.append({"name": node.name, "op": _op_name(node),
                          "args": [_argument(a, node) for a in node.args],
                          "kwargs": {k: _argument(v, node) for k, v in node.kwargs.items()}})
        elif node.op == "output":
            (result,) = node.args[0]
            output = result.name
        elif node.op != "placeholder":
            raise Unexportable(f"the exported graph holds a {node.op} node ({node.name}), not a tensor operator")
    return {"format": FORMAT, "tensors": tensors, "inputs": inputs, "nodes": nodes, "output": output}, payload


def _op_name(node) -> str:
    target = node.target
    if target in _PYTHON_NAMES:
        return _PYTHON_NAMES[target]
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # e.g. aten.linear.default
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', repr(target))}"


def _argument(value, node):
    if isinstance(value, torch.fx.Node):
        return {"ref": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, (list, tuple)):
        return [_argument(v, node) for v in value]
    if isinstance(value, torch.dtype):
        if value not in _DTYPE_NAMES:
            raise Unexportable(f"{node.name} ({_op_name(node)}) uses dtype {value}; allowed: {sorted(DTYPES)}")
        return {"dtype": _DTYPE_NAMES[value]}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise Unexportable(f"{node.name} ({_op_name(node)}) takes an argument the scorer cannot read: "
                       f"{type(value).__name__}")

