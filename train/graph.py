"""The trained model as data: the pure tensor program a trial hands over, and the only code that reads it.

A candidate's forward is code, and code that is handed validation tokens always finds a channel on a
shared kernel. So the sandboxed worker exports its trained model (train/export.py) as a list of ATen
operator calls plus the tensors they read, and the trusted scorer evaluates that list itself. This
module is the trusted side of that crossing:

    program = load(raw_bytes, limits, vocab_size, seq_len)   # everything checked, nothing run yet
    logits = program(idx)                                     # idx [1, T] int64 -> [1, T, V] logits

`load` refuses (GraphInvalid, one line naming the offending operator or construct) anything that is
not a side-effect-free tensor program of bounded size: an operator outside ALLOWED (no custom ops, no
Python callbacks, no I/O, no randomness, no op that returns uninitialised memory, no mutation), a
reference to a value not computed yet, a tensor the file does not hold the bytes for, more nodes,
work per token or intermediate memory than the objective allows. Sizes are checked before anything
is allocated: the declared tensors must be backed by bytes of the file (itself bounded), and the
shapes, work and memory of every node are computed on meta tensors (shapes only) at every length the
scorer will use, before a single real value is computed.

The file: 8 bytes (little-endian length of the header), the header (JSON), then the raw tensor bytes.
The header: {"format": FORMAT, "tensors": {name: {"dtype", "shape", "offset", "nbytes"}},
"inputs": [{"name", "tensor"} | {"name", "input": true}], "nodes": [{"name", "op", "args", "kwargs"}],
"output": name}. Arguments are JSON values, {"ref": name}, {"dtype": ...}, {"device": ...},
{"layout": ...}, {"memory_format": ...}, {"float": "inf"|"-inf"|"nan"}, and lists of those.
"""
from __future__ import annotations

import json
import math
import operator
import struct
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FORMAT = "arena-graph/1"
HEADER = struct.Struct("<Q")
MAX_HEADER_BYTES = 64 << 20
# JSON costs about 25 bytes of memory a byte of header, all before any check: the header may have
# the room its operations need (an export takes about 130 bytes an operation) and a tensor table.
HEADER_BYTES_PER_NODE, HEADER_BYTES_BASE = 256, 1 << 20
MAX_NAME = 256
MAX_RANK = 8
MAX_LIST = 4096
MAX_DEPTH = 4
ARGUMENTS_PER_NODE = 16  # arguments (list items included) of all operations, per operation allowed
MAX_INT = 1 << 40  # any int the program computes with (shapes, dims, scalars)
MAX_NUMEL = 1 << 31  # elements of any one tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format}


class GraphInvalid(ValueError):
    """The exported program cannot be scored; the message is one line an agent can act on."""


class OutOfTime(Exception):
    """The program was still being checked or evaluated at its deadline (Program.deadline): what
    the work count misses (an operator without a vmap batch rule runs once a row; Python and dispatch
    time a node) has no other bound."""


@dataclass(frozen=True)
class Limits:
    """What one exported program may cost. Work counts matmul/attention FLOPs (from the shapes of
    each product) plus every element each node reads and writes, so no op is free; memory is the
    peak of live intermediate tensors of one row, views counted as copies (a bound, not a
    measurement)."""

    max_nodes: int = 20_000
    max_work_per_token: float = 1e9
    max_memory_mb: float = 2048.0
    max_tensor_bytes: int = 1 << 30


# Side-effect-free ATen operators, by the name export gives them. Nothing here mutates an input,
# returns uninitialised memory (empty*), draws random numbers, or calls back into Python. Index
# operators get their indices clamped into range before they run (an out-of-range index on a GPU is a
# device-side assert that poisons the whole process), so they compute but never fault.
_ATEN = """
abs.default add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Tensor rsub.Scalar mul.Tensor mul.Scalar
div.Tensor div.Scalar div.Tensor_mode div.Scalar_mode neg.default exp.default exp2.default log.default
log2.default log1p.default expm1.default sqrt.default rsqrt.default reciprocal.default pow.Tensor_Scalar
pow.Tensor_Tensor pow.Scalar square.default sin.default cos.default tan.default tanh.default sigmoid.default
relu.default gelu.default silu.default mish.default softplus.default elu.default leaky_relu.default
hardtanh.default erf.default sign.default floor.default ceil.default round.default trunc.default
clamp.default clamp.Tensor clamp_min.default clamp_max.default minimum.default maximum.default
fmod.Scalar fmod.Tensor remainder.Scalar remainder.Tensor lerp.Scalar lerp.Tensor atan2.default
where.self where.ScalarSelf where.ScalarOther where.Scalar masked_fill.Scalar masked_fill.Tensor
eq.Tensor eq.Scalar ne.Tensor ne.Scalar lt.Tensor lt.Scalar le.Tensor le.Scalar gt.Tensor gt.Scalar
ge.Tensor ge.Scalar logical_not.default logical_and.default logical_or.default bitwise_not.default
sum.default sum.dim_IntList mean.default mean.dim amax.default amin.default max.dim min.dim
argmax.default var.correction std.correction logsumexp.default cumsum.default prod.dim_int
softmax.int _softmax.default log_softmax.int _log_softmax.default
rms_norm.default layer_norm.default native_layer_norm.default
linear.default mm.default bmm.default matmul.default addmm.default baddbmm.default einsum.default
t.default outer.default scaled_dot_product_attention.default
view.default _unsafe_view.default reshape.default permute.default transpose.int unsqueeze.default
squeeze.default squeeze.dim squeeze.dims expand.default expand_as.default slice.Tensor select.int
narrow.default split.Tensor split_with_sizes.default chunk.default unbind.int cat.default stack.default
flatten.using_ints unflatten.int contiguous.default clone.default alias.default detach.default
repeat.default flip.default roll.default tril.default triu.default constant_pad_nd.default
index_select.default gather.default embedding.default index.Tensor
type_as.default to.dtype to.dtype_layout to.device _to_copy.default lift_fresh_copy.default
arange.default arange.start arange.start_step full.default zeros.default ones.default scalar_tensor.default
zeros_like.default ones_like.default full_like.default new_zeros.default new_ones.default new_full.default
dropout.default _assert_tensor_metadata.default _assert_scalar.default sym_size.int
"""
_PYTHON = {"operator.getitem": operator.getitem, "operator.add": operator.add, "operator.sub": operator.sub,
           "operator.mul": operator.mul, "operator.floordiv": operator.floordiv, "operator.mod": operator.mod,
           "operator.neg": operator.neg, "operator.eq": operator.eq, "operator.ne": operator.ne,
           "operator.lt": operator.lt, "operator.le": operator.le, "operator.gt": operator.gt,
           "operator.ge": operator.ge, "torch.sym_max": max, "torch.sym_min": min}
_NO_OP = {"aten._assert_tensor_metadata.default"}
# Operators whose listed arguments hold indices into the listed dimension of another argument:
# (index argument position, source argument position, dimension argument position or fixed dim).
_INDEXED = {"aten.embedding.default": (1, 0, 0), "aten.index_select.default": (2, 0, "arg1"),
            "aten.gather.default": (2, 0, "arg1")}


def _resolve_aten() -> dict:
    ops = {}
    for name in _ATEN.split():
        packet, overload = name.rsplit(".", 1)
        packet_op = getattr(torch.ops.aten, packet, None)
        op = getattr(packet_op, overload, None) if packet_op is not None else None
        if op is not None:  # an operator this torch build lacks is simply not allowed
            ops[f"aten.{name}"] = op
    return ops


ALLOWED = {**_resolve_aten(), **_PYTHON}


@dataclass
class Node:
    name: str
    op: str
    fn: object
    args: tuple
    kwargs: dict
    last_use: int = -1  # the index of the last node that reads this one's value


class Program:
    """The checked program, callable on [1, T] int64 token ids on its device, and under torch.vmap
    over rows (what the scorer does: each row is its own input, so nothing flows between rows)."""

    def __init__(self, nodes: list[Node], constants: dict, input_name: str, output: str, params: list[str],
                 limits: Limits, vocab_size: int, seq_len: int):
        self.nodes, self.constants, self.input_name, self.output = nodes, constants, input_name, output
        self.params = params  # names of the tensors export lifted as parameters (for counting)
        self.limits, self.vocab_size, self.seq_len = limits, vocab_size, seq_len
        self.checked: dict[int, int] = {}  # lengths checked -> the peak memory of one row there
        self.deadline: float | None = None  # time.time() past which checking or evaluating it stops
        self.device = torch.device("cpu")
        self.work_per_token = self.peak_memory_bytes = None
        self.vocab_width = None
        self._frees: list[list[str]] = [[] for _ in nodes]
        for node in nodes:  # which values may be dropped after which node: the memory of long programs
            if 0 <= node.last_use < len(nodes):
                self._frees[node.last_use].append(node.name)

    def check_lengths(self, lengths) -> None:
        """Bound the program at every length it will be called at (prefix runs of the causality
        check), before it computes anything real: its sizes may depend on the length in any way."""
        for length in lengths:
            if length not in self.checked:
                self.checked[length] = _meta_pass(self, length)[1]

    def to(self, device) -> Program:
        self.device = torch.device(device)
        self.constants = {k: v.to(self.device) for k, v in self.constants.items()}
        return self

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: idx, **self.constants}
        for index, node in enumerate(self.nodes):
            _in_time(self)
            env[node.name] = _run(node, env, self.device)
            for freed in self._frees[index]:
                env.pop(freed, None)
        return env[self.output]

    def parameter_tensors(self) -> list[torch.Tensor]:
        return [self.constants[name] for name in self.params]


def load(raw: bytes | bytearray | memoryview, limits: Limits, *, vocab_size: int, seq_len: int,
         deadline: float | None = None) -> Program:
    """Parse and check an exported program without running any of it on real values, and bound
    its cost at `seq_len` (the objective's evaluation length); `Program.check_lengths` bounds it at
    every other length the scorer will use before it does. Past `deadline` (time.time()), checking
    or evaluating it raises OutOfTime."""
    header, payload = _split(raw, min(MAX_HEADER_BYTES, HEADER_BYTES_BASE + HEADER_BYTES_PER_NODE * limits.max_nodes))
    if header.get("format") != FORMAT:
        raise GraphInvalid(f"not an exported model of this arena (format {str(header.get('format'))[:40]!r}, "
                           f"want {FORMAT!r})")
    tensors = _tensors(header.get("tensors"), payload, limits)
    input_name, constants, params = _inputs(header.get("inputs"), tensors)
    nodes = _nodes(header.get("nodes"), set(constants) | {input_name}, limits)
    output = header.get("output")
    if not isinstance(output, str) or output not in {n.name for n in nodes}:
        raise GraphInvalid("the program's output is not one of its nodes")
    _mark_last_uses(nodes, output)
    program = Program(nodes, constants, input_name, output, params, limits, vocab_size, seq_len)
    program.deadline = deadline
    work, memory, width = _meta_pass(program, seq_len)
    program.work_per_token, program.peak_memory_bytes, program.vocab_width = work / seq_len, memory, width
    program.checked[seq_len] = memory
    return program


def _split(raw, max_header: int) -> tuple[dict, memoryview]:
    raw = memoryview(raw).cast("B")
    if len(raw) < HEADER.size:
        raise GraphInvalid("the exported model file is empty or truncated")
    (length,) = HEADER.unpack(raw[:HEADER.size])
    if length > len(raw) - HEADER.size:
        raise GraphInvalid(f"the exported model's header claims {length} bytes; the file has {len(raw)}")
    if length > max_header:
        raise GraphInvalid(f"the exported model has a header of {length} bytes; at most {max_header} are allowed "
                           f"({HEADER_BYTES_PER_NODE} an operation of the objective's max_nodes)")
    try:
        header = json.loads(bytes(raw[HEADER.size:HEADER.size + length]))
    except (ValueError, RecursionError) as e:
        raise GraphInvalid(f"the exported model's header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise GraphInvalid("the exported model's header is not an object")
    return header, raw[HEADER.size + length:]


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise GraphInvalid(f"a {what} name is not a string of 1-{MAX_NAME} characters")
    return value


def _tensors(table, payload: memoryview, limits: Limits) -> dict[str, torch.Tensor]:
    """Every declared tensor, checked against the bytes the file really holds before it is made."""
    if not isinstance(table, dict):
        raise GraphInvalid("the exported model has no tensor table")
    out, total = {}, 0
    for name, entry in table.items():
        _name(name, "tensor")
        if not isinstance(entry, dict):
            raise GraphInvalid(f"tensor {name!r}: not an object")
        dtype = DTYPES.get(entry.get("dtype"))
        shape, offset, nbytes = entry.get("shape"), entry.get("offset"), entry.get("nbytes")
        if dtype is None:
            raise GraphInvalid(f"tensor {name!r}: dtype {str(entry.get('dtype'))[:20]!r} is not one of {sorted(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(type(d) is int and 0 <= d <= MAX_NUMEL for d in shape)):
            raise GraphInvalid(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} sizes")
        numel = math.prod(shape)
        size = numel * torch.empty(0, dtype=dtype).element_size()
        if type(offset) is not int or type(nbytes) is not int or nbytes != size or numel > MAX_NUMEL:
            raise GraphInvalid(f"tensor {name!r}: {nbytes!r} bytes declared for a {dtype} tensor of shape {shape}")
        if offset < 0 or offset + nbytes > len(payload):
            raise GraphInvalid(f"tensor {name!r}: its {nbytes} bytes at offset {offset} are not in the file "
                               f"({len(payload)} bytes of tensors)")
        total += nbytes
        if nbytes > limits.max_tensor_bytes or total > limits.max_tensor_bytes:
            raise GraphInvalid(f"the exported tensors hold over {limits.max_tensor_bytes >> 20} MB")
        data = bytearray(payload[offset:offset + nbytes])  # our own copy: nothing aliases the file
        if not numel:
            out[name] = torch.zeros(shape, dtype=dtype)
        elif dtype is torch.bool:  # a byte that is neither 0 nor 1 is no bool any kernel expects
            out[name] = torch.frombuffer(data, dtype=torch.uint8).view(shape) != 0
        else:
            out[name] = torch.frombuffer(data, dtype=dtype).view(shape)
    return out


def _inputs(entries, tensors: dict) -> tuple[str, dict, list[str]]:
    if not isinstance(entries, list) or len(entries) > MAX_LIST * 4:
        raise GraphInvalid("the exported model has no input list")
    input_name, constants, params, seen = None, {}, [], set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise GraphInvalid("an input of the program is not an object")
        name = _name(entry.get("name"), "input")
        if name in seen:
            raise GraphInvalid(f"input {name!r} is declared twice")
        seen.add(name)
        if entry.get("input") is True:
            if input_name is not None:
                raise GraphInvalid("the program takes more than one input; it must take the token ids only")
            input_name = name
            continue
        if entry.get("tensor") not in tensors:
            raise GraphInvalid(f"input {name!r} names tensor {str(entry.get('tensor'))[:80]!r}, which the file lacks")
        constants[name] = tensors[entry["tensor"]]
        if entry.get("parameter") is True:
            params.append(name)
    if input_name is None:
        raise GraphInvalid("the program takes no token ids")
    return input_name, constants, params


def _nodes(entries, defined: set, limits: Limits) -> list[Node]:
    if not isinstance(entries, list):
        raise GraphInvalid("the exported model has no node list")
    if len(entries) > limits.max_nodes:
        raise GraphInvalid(f"the program has {len(entries)} operations; at most {limits.max_nodes} are allowed")
    nodes, arguments, most = [], 0, ARGUMENTS_PER_NODE * limits.max_nodes
    for entry in entries:
        if not isinstance(entry, dict):
            raise GraphInvalid("an operation of the program is not an object")
        name = _name(entry.get("name"), "node")
        op = entry.get("op")
        if not isinstance(op, str) or op not in ALLOWED:
            raise GraphInvalid(f"operator {str(op)[:120]!r} (node {name!r}) is not allowed: the scorer runs only "
                               "side-effect-free tensor operators (see train/graph.py ALLOWED)")
        if name in defined:
            raise GraphInvalid(f"node {name!r} is defined twice")
        args, kwargs = entry.get("args", []), entry.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict) or len(args) > MAX_LIST or len(kwargs) > 64:
            raise GraphInvalid(f"node {name!r}: args must be a list and kwargs an object")
        args = [_decode(a, defined, name, 1) for a in args]
        kwargs = {_name(k, "keyword"): _decode(v, defined, name, 1) for k, v in kwargs.items()}
        arguments += _count(args) + _count(list(kwargs.values()))
        if arguments > most:  # each costs Python and dispatch time at every call, which the work count misses
            raise GraphInvalid(f"the program's operations take {arguments} arguments in all; at most {most} are "
                               f"allowed ({ARGUMENTS_PER_NODE} an operation, list items included)")
        if kwargs.get("pin_memory") not in (None, False):
            raise GraphInvalid(f"node {name!r}: pin_memory is not the program's to choose")
        if op == "aten.dropout.default" and (args[2:3] != [False] and kwargs.get("train") is not False):
            raise GraphInvalid(f"node {name!r}: dropout in training mode draws random numbers; export the model "
                               "in eval mode")
        if op == "aten.scaled_dot_product_attention.default" and _sdpa_dropout(args, kwargs):
            raise GraphInvalid(f"node {name!r}: attention dropout draws random numbers; use dropout_p=0 when "
                               "not training")
        nodes.append(Node(name, op, ALLOWED[op], tuple(args), kwargs))
        defined.add(name)
    return nodes


def _count(value) -> int:
    return sum(1 + _count(v) for v in value) if isinstance(value, list) else 0


def _sdpa_dropout(args: list, kwargs: dict) -> bool:
    p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    return p not in (0, 0.0)


class _Ref:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def _decode(value, defined: set, node: str, depth: int):
    if depth > MAX_DEPTH:
        raise GraphInvalid(f"node {node!r}: arguments nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise GraphInvalid(f"node {node!r}: an integer argument beyond 2^40")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        if len(value) > 64:
            raise GraphInvalid(f"node {node!r}: a string argument longer than 64 characters")
        return value
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise GraphInvalid(f"node {node!r}: a list argument of over {MAX_LIST} items")
        return [_decode(v, defined, node, depth + 1) for v in value]
    if isinstance(value, dict):
        if len(value) != 1:
            raise GraphInvalid(f"node {node!r}: an argument object must have exactly one key")
        (kind, item), = value.items()
        if kind == "ref":
            if item not in defined:
                raise GraphInvalid(f"node {node!r} reads {str(item)[:80]!r}, which is not computed before it")
            return _Ref(item)
        if kind == "dtype" and item in DTYPES:
            return DTYPES[item]
        if kind == "device":
            return _DEVICE
        if kind == "layout" and item in LAYOUTS:
            return LAYOUTS[item]
        if kind == "memory_format" and item in MEMORY_FORMATS:
            return MEMORY_FORMATS[item]
        if kind == "float" and item in ("inf", "-inf", "nan"):
            return float(item)
    raise GraphInvalid(f"node {node!r}: an argument the scorer does not accept ({str(value)[:80]})")


_DEVICE = object()  # a device argument: always the device the scorer evaluates on


def _mark_last_uses(nodes: list[Node], output: str) -> None:
    by_name = {node.name: node for node in nodes}
    for i, node in enumerate(nodes):  # a value nobody reads is dropped right after it is made
        node.last_use = i

    def refs(value):
        if isinstance(value, _Ref):
            yield value.name
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from refs(v)
        elif isinstance(value, dict):
            for v in value.values():
                yield from refs(v)

    for i, node in enumerate(nodes):
        for name in refs((node.args, node.kwargs)):
            if name in by_name:
                by_name[name].last_use = max(by_name[name].last_use, i)
    by_name[output].last_use = len(nodes)  # kept to the end


def _materialise(value, env: dict, device):
    if isinstance(value, _Ref):
        return env[value.name]
    if value is _DEVICE:
        return device
    if isinstance(value, list):
        return [_materialise(v, env, device) for v in value]
    if isinstance(value, dict):
        return {k: _materialise(v, env, device) for k, v in value.items()}
    return value


def _run(node: Node, env: dict, device):
    args = [_materialise(a, env, device) for a in node.args]
    kwargs = {k: _materialise(v, env, device) for k, v in node.kwargs.items()}
    if node.op in _NO_OP:
        return None
    if node.op == "aten.sym_size.int":  # shapes are Python ints here (and under vmap, the row's shape)
        return _int(args[0].shape[args[1]])
    if node.op == "aten._assert_scalar.default":
        if not args[0]:
            raise GraphInvalid(f"the program's own check failed at node {node.name!r}: {str(args[1])[:120]}")
        return None
    if node.op == "operator.getitem":
        container, index = args
        if not isinstance(container, (list, tuple)) or type(index) is not int:
            raise GraphInvalid(f"node {node.name!r}: getitem is allowed on an operator's tuple of results only")
        return container[index]
    if node.op in _PYTHON_INT_OPS:
        if not all(type(a) in (int, bool) for a in args):
            raise GraphInvalid(f"node {node.name!r}: {node.op} is allowed on sizes (ints) only")
        return _int(node.fn(*args))
    if node.op in _FACTORIES:  # made on the scorer's device, whatever the export said
        kwargs["device"] = device
    if node.op in _INDEXED:
        _clamp_indices(node, args, kwargs)
    elif node.op == "aten.index.Tensor":
        _clamp_index_list(node, args)
    elif node.op in _PIECES:
        _bound_pieces(node, args, kwargs)
    return node.fn(*args, **kwargs)


_PYTHON_INT_OPS = set(_PYTHON) - {"operator.getitem"}
_FACTORIES = {f"aten.{name}" for name in ("arange.default", "arange.start", "arange.start_step", "full.default",
                                          "zeros.default", "ones.default", "scalar_tensor.default")}


# Operators that return one tensor a piece of a dimension: (position and default of the argument
# that says how the dimension is cut, position of the dimension, how many pieces for (size, cut)).
_PIECES = {"aten.unbind.int": (None, 1, lambda size, cut: size),
           "aten.split.Tensor": ((1, "split_size"), 2, lambda size, cut: -(-size // max(cut, 1))),
           "aten.chunk.default": ((1, "chunks"), 2, lambda size, cut: min(cut, size))}


def _bound_pieces(node: Node, args: list, kwargs: dict) -> None:
    """unbind of an expanded [2^30] view makes 2^30 tensors (the work count sees 2^30 elements, a
    few a token): the pieces an operator returns are bounded as lists are, before it runs."""
    cut_at, dim_at, pieces = _PIECES[node.op]
    source = args[0] if args else kwargs.get("self")
    cut = None if cut_at is None else args[cut_at[0]] if len(args) > cut_at[0] else kwargs.get(cut_at[1])
    dim = args[dim_at] if len(args) > dim_at else kwargs.get("dim", 0)
    if not isinstance(source, torch.Tensor) or type(dim) is not int or (cut_at and type(cut) is not int) \
            or not -source.dim() <= dim < source.dim():
        return  # the operator refuses it itself
    count = pieces(source.shape[dim], cut)
    if count > MAX_LIST:
        raise GraphInvalid(f"node {node.name!r}: {node.op} would make {count} tensors; at most {MAX_LIST}")


def _int(value):
    if type(value) is bool:
        return value
    if type(value) is not int or abs(value) > MAX_INT:
        raise GraphInvalid(f"a size computed by the program is not an int within 2^40 ({str(value)[:40]})")
    return value


def _clamp_indices(node: Node, args: list, kwargs: dict) -> None:
    index_at, source_at, dim_at = _INDEXED[node.op]
    if len(args) <= max(index_at, source_at):
        raise GraphInvalid(f"node {node.name!r}: {node.op} needs its index and source as positional arguments")
    source, index = args[source_at], args[index_at]
    dim = args[1] if dim_at == "arg1" else dim_at
    if not isinstance(source, torch.Tensor) or not isinstance(index, torch.Tensor) or type(dim) is not int:
        raise GraphInvalid(f"node {node.name!r}: {node.op} on something that is not a tensor")
    if index.dtype not in (torch.int64, torch.int32):
        raise GraphInvalid(f"node {node.name!r}: {node.op} needs integer indices, got {index.dtype}")
    size = source.shape[dim] if source.dim() else 1
    _nonempty(node, size, index)
    args[index_at] = index.clamp(0, max(size - 1, 0))


def _clamp_index_list(node: Node, args: list) -> None:
    source, indices = args[0], args[1]
    if not isinstance(source, torch.Tensor) or not isinstance(indices, list) or len(indices) > source.dim():
        raise GraphInvalid(f"node {node.name!r}: index.Tensor needs a tensor and at most one index per dimension")
    clamped = []
    for dim, index in enumerate(indices):
        if index is None:
            clamped.append(None)
            continue
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
            raise GraphInvalid(f"node {node.name!r}: indexing with a mask (its result's shape depends on values) "
                               "is not allowed; index with integer tensors")
        size = source.shape[dim]
        _nonempty(node, size, index)
        clamped.append(index.clamp(-size, max(size - 1, 0)))
    args[1] = clamped


def _nonempty(node: Node, size: int, index: torch.Tensor) -> None:
    """No clamp brings an index into a dimension of size 0: a GPU asserts on the device."""
    if size == 0 and index.numel():
        raise GraphInvalid(f"node {node.name!r}: {node.op} indexes an empty dimension")


def _meta_pass(program: Program, length: int) -> tuple[float, int, int]:
    """Run the program on meta tensors (shapes only, nothing allocated) at `length`: every node's
    result checked, the work and the peak live memory of one row counted and bounded (the work at
    any length by what the objective allows a row of its full length)."""
    limits, vocab_size = program.limits, program.vocab_size
    if type(length) is not int or not 1 <= length <= program.seq_len:
        raise GraphInvalid(f"no row is scored at length {length!r}")
    meta = torch.device("meta")
    env = {program.input_name: torch.empty(1, length, dtype=torch.int64, device=meta)}
    env.update({k: torch.empty(v.shape, dtype=v.dtype, device=meta) for k, v in program.constants.items()})
    memory = _Memory(t for t in env.values() if isinstance(t, torch.Tensor))  # the weights are bounded apart
    work, inside = 0, _Allocations()
    with inside:
        for index, node in enumerate(program.nodes):
            _in_time(program)
            inside.bytes = 0
            try:
                value = _run(node, env, meta)
            except GraphInvalid:
                raise
            except Exception as e:  # noqa: BLE001 - whatever ATen refuses is the program's fault
                raise GraphInvalid(f"operator {node.op} (node {node.name!r}) fails at sequence length {length}: "
                                   f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
            _check_value(node, value, limits)
            work += _elements(node.args, env) + _elements(list(node.kwargs.values()), env) + _elements_of(value)
            work += _product_flops(node, env, value)
            env[node.name] = value
            memory.made(node.name, value, inside.bytes)
            for name in program._frees[index]:
                memory.free(name)
                env.pop(name, None)
    peak = memory.peak
    out = env.get(program.output)
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != (1, length) \
            or out.dtype not in FLOAT_DTYPES or not vocab_size <= out.shape[2] <= 4 * vocab_size:
        got = f"{list(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise GraphInvalid(f"model(idx [1, {length}]) must return logits [1, {length}, V] with V from {vocab_size} "
                           f"to {4 * vocab_size} in {'/'.join(str(d)[6:] for d in FLOAT_DTYPES)}, got {got}")
    if work > limits.max_work_per_token * program.seq_len:
        raise GraphInvalid(f"the model costs {work / length:.3g} operations per token at length {length}; "
                           f"the objective allows {limits.max_work_per_token:.3g} a token of a full row")
    if peak > limits.max_memory_mb * (1 << 20):
        raise GraphInvalid(f"evaluating one row needs {peak / (1 << 20):.0f} MB of intermediate tensors; "
                           f"the objective allows {limits.max_memory_mb:.0f} MB")
    return work, peak, out.shape[2]


def _product_flops(node: Node, env: dict, out) -> int:
    """Multiply-adds of the operators that contract a dimension, x2, from the shapes alone (what
    torch's flop counter counts, without its dispatch overhead on every check); the elementwise rest
    is counted as elements touched."""
    if node.op not in _PRODUCTS or not isinstance(out, torch.Tensor):
        return 0
    args = [_materialise(a, env, None) for a in node.args]
    if node.op == "aten.einsum.default":
        return _einsum_flops(node, args)
    if node.op == "aten.scaled_dot_product_attention.default":
        q, k, v = args[:3]
        return 2 * math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    if node.op == "aten.outer.default":
        return out.numel()
    left = args[1] if node.op in ("aten.addmm.default", "aten.baddbmm.default") else args[0]
    if node.op == "aten.linear.default":
        return 2 * out.numel() * args[1].shape[-1]
    return 2 * out.numel() * (left.shape[-1] if left.dim() else 1)


_PRODUCTS = {f"aten.{name}" for name in ("linear.default", "mm.default", "bmm.default", "matmul.default",
                                          "addmm.default", "baddbmm.default", "einsum.default", "outer.default",
                                          "scaled_dot_product_attention.default")}


def _einsum_flops(node: Node, args: list) -> int:
    """2 x the product of every index's size: a naive contraction, an upper bound on any order."""
    equation, operands = args[0], args[1]
    if not isinstance(equation, str) or not isinstance(operands, (list, tuple)):
        raise GraphInvalid(f"node {node.name!r}: einsum needs an equation and a list of tensors")
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    if len(inputs) != len(operands) or "." in equation:
        raise GraphInvalid(f"node {node.name!r}: einsum with an ellipsis or a mismatched operand list is not allowed")
    sizes: dict[str, int] = {}
    for letters, tensor in zip(inputs, operands):
        for letter, size in zip(letters, tensor.shape):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return 2 * math.prod(sizes.values())


class _Memory:
    """The intermediate memory one row's evaluation holds, node by node: for each storage, the
    bytes of the live values on it (a view counted as a copy of its own size: an operator may copy
    it), and at least the whole storage for as long as any live value holds it, not only while the
    node that made it lives (a one-element slice of a 1 GB tensor keeps the whole gigabyte)."""

    def __init__(self, outside):
        self.outside = {_storage(t) for t in outside}  # the weights and the input: not intermediates
        self.held = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage -> [its bytes, live values' bytes, holders]
        self._values: dict[str, dict[int, int]] = {}  # name -> {storage: bytes of its tensors on it}

    def made(self, name: str, value, inside: int = 0) -> None:
        """`value` was made, and the operators that made it allocated `inside` bytes on the way."""
        self.peak = max(self.peak, self.held + inside)
        parts: dict[int, int] = {}  # storage -> bytes of this value's tensors on it
        for tensor in _tensors_of(value):
            key = _storage(tensor)
            parts[key] = parts.get(key, 0) + _bytes(tensor)
            if key not in self.outside and key not in self._storages:
                self._storages[key] = [max(tensor.untyped_storage().nbytes(), _bytes(tensor)), 0, 0]
        for key, size in parts.items():
            entry = self._storages.get(key)
            if entry is None:  # on a weight or the input: the view alone
                self.held += size
                continue
            before = max(entry[0], entry[1]) if entry[2] else 0
            entry[1] += size
            entry[2] += 1
            self.held += max(entry[0], entry[1]) - before
        self._values[name] = parts
        self.peak = max(self.peak, self.held)

    def free(self, name: str) -> None:
        for key, size in self._values.pop(name, {}).items():
            entry = self._storages.get(key)
            if entry is None:
                self.held -= size
                continue
            before = max(entry[0], entry[1])
            entry[1] -= size
            entry[2] -= 1
            self.held -= before - (max(entry[0], entry[1]) if entry[2] else 0)
            if not entry[2]:
                del self._storages[key]


class _Allocations(TorchDispatchMode):
    """The bytes of every new tensor the operators of one node make, inside composite operators too:
    an einsum of three operands makes the product of the first two, which no node holds (a
    [32768, 32768] one for an output of 128 KB, within the tiny objective's work bound). Counted as
    if all were alive at once: a bound, like the views counted as copies."""

    bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {_storage(t) for t in _tensors_of([args, list((kwargs or {}).values())])}
        for tensor in _tensors_of(out):
            if _storage(tensor) not in given:
                self.bytes += max(tensor.untyped_storage().nbytes(), _bytes(tensor))
        return out


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _tensors_of(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_of(v)


def _in_time(program: Program) -> None:
    if program.deadline is not None and time.time() > program.deadline:
        raise OutOfTime("the exported model could not be checked and scored within the trial's hard limit")


def _check_value(node: Node, value, limits: Limits) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.dtype not in DTYPES.values():
                raise GraphInvalid(f"node {node.name!r} ({node.op}) makes a {v.dtype} tensor; allowed: {sorted(DTYPES)}")
            if v.numel() > MAX_NUMEL or _bytes(v) > limits.max_memory_mb * (1 << 20):
                raise GraphInvalid(f"node {node.name!r} ({node.op}) makes a tensor of shape {list(v.shape)}, "
                                   f"over the objective's {limits.max_memory_mb:.0f} MB")
        elif v is not None and type(v) not in (int, bool):
            raise GraphInvalid(f"node {node.name!r} ({node.op}) returns a {type(v).__name__}")


def _bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


def _elements_of(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_elements_of(v) for v in value)
    return 0


def _elements(args, env: dict) -> int:
    total = 0
    for a in args:
        if isinstance(a, _Ref):
            total += _elements_of(env.get(a.name))
        elif isinstance(a, list):
            total += _elements(a, env)
    return total


def count_params(program: Program, vocab_size: int) -> tuple[int, int]:
    """(parameters, matmul parameters) of the exported parameters, each tensor once; the matmul
    count leaves out the input embedding (a table lookup), taken as the first [vocab, d] table."""
    seen, total, matmul, embedding_skipped = set(), 0, 0, False
    for tensor in program.parameter_tensors():
        if not tensor.is_floating_point():
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel()
        if tensor.dim() == 2:
            if tensor.shape[0] >= vocab_size and not embedding_skipped:
                embedding_skipped = True
                continue
            matmul += tensor.numel()
    return total, matmul
