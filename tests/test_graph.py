"""The exported model as data: train/export.py writes it in the sandbox, train/graph.py reads it in the
trusted harness. Hand-written programs cheat in each known way and must be refused (one line naming
the construct) or scored causally; hostile files must cost nothing before they are refused."""
from __future__ import annotations

import json
import resource
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from train import graph, prepare
from train.export import Unexportable, export_model
from train.knobs import write_knobs

VOCAB = 64
TINY_KNOBS = dict(DEPTH=1, ASPECT_RATIO=32, HEAD_DIM=16, SEQ_LEN=32, DEVICE_BATCH_SIZE=4, TOTAL_BATCH_SIZE=128)


def baseline_model(vocab: int = VOCAB) -> torch.nn.Module:
    namespace: dict = {}
    exec(compile(write_knobs((ROOT / "train" / "train.py").read_text(), TINY_KNOBS), "train.py", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["build_model"](vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def exported(model: torch.nn.Module, tmp_path: Path, seq_len: int = 32) -> bytes:
    path = tmp_path / "model.arena"
    export_model(model, seq_len, path)
    return path.read_bytes()


def load(raw: bytes, seq_len: int = 32, vocab: int = VOCAB, **limits) -> graph.Program:
    return graph.load(raw, graph.Limits(**limits), vocab_size=vocab, seq_len=seq_len)


def document(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def file_of(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + payload


def tiny_program(nodes: list, tensors: dict | None = None, payload: bytes = b"", output: str | None = None,
                 inputs: list | None = None) -> bytes:
    """A hand-written program over token ids `idx` and an embedding table `w` [VOCAB, VOCAB]."""
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(1))
    raw = table.numpy().tobytes()
    return file_of({"format": graph.FORMAT,
                    "tensors": tensors if tensors is not None else
                    {"w": {"dtype": "float32", "shape": [VOCAB, VOCAB], "offset": 0, "nbytes": len(raw)}},
                    "inputs": inputs if inputs is not None else [{"name": "w", "tensor": "w", "parameter": True},
                                                                 {"name": "idx", "input": True}],
                    "nodes": nodes, "output": output or nodes[-1]["name"]}, payload or raw)


def embed(name: str = "logits", ids: str = "idx") -> dict:
    return {"name": name, "op": "aten.embedding.default", "args": [{"ref": "w"}, {"ref": ids}], "kwargs": {}}


# ---- what an honest export looks like ------------------------------------------------------------


def test_the_baseline_exports_and_scores_exactly_as_the_module_does(tmp_path):
    model = baseline_model()
    program = load(exported(model, tmp_path))
    rows = torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        by_graph = torch.vmap(program)(rows[:, None, :])[:, 0]
        assert by_graph.equal(model(rows))
        program.check_lengths([7])
        assert torch.vmap(program)(rows[:, None, :7])[:, 0].equal(model(rows[:, :7]))
    total, matmul = graph.count_params(program, VOCAB)
    assert total == sum(p.numel() for p in model.parameters())
    assert matmul == sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "wte.weight")
    assert 0 < program.work_per_token and 0 < program.peak_memory_bytes


def test_a_model_with_python_in_its_forward_does_not_export_and_says_why(tmp_path):
    class Item(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, idx):
            return self.w(idx) * float(idx.sum().item() > 3)  # a value read into Python

    with pytest.raises(Unexportable, match="torch.export could not export"):
        exported(Item(), tmp_path)


def test_a_model_that_changes_its_own_state_in_forward_does_not_export(tmp_path):
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Embedding(VOCAB, VOCAB)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, idx):
            self.calls.add_(1)  # memory from one call to the next: a channel between rows
            return self.w(idx) + self.calls

    with pytest.raises(Unexportable, match="change no state"):
        exported(Counter(), tmp_path)


def test_a_model_that_only_takes_one_length_does_not_export(tmp_path):
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, idx):
            return self.w(idx).view(1, 32, VOCAB)  # the length written in

    with pytest.raises(Unexportable, match="any length from 2 to 32"):
        exported(Fixed(), tmp_path)


# ---- programs that cheat --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["aten.add_.Tensor", "aten.empty.memory_format", "aten.randn.default",
                                "aten.nonzero.default", "aten.bernoulli.default", "aten._local_scalar_dense.default",
                                "aten.copy_.default", "torch.ops.higher_order.cond", "builtins.exec", "os.system",
                                "aten.as_strided.default", "aten.new_empty.default"])
def test_an_operator_outside_the_allow_list_is_refused_by_name(op):
    raw = tiny_program([embed("e"), {"name": "bad", "op": op, "args": [{"ref": "e"}], "kwargs": {}}])
    with pytest.raises(graph.GraphInvalid, match="is not allowed") as refused:
        load(raw)
    assert op in str(refused.value) and "\n" not in str(refused.value)


def test_a_program_that_reads_the_next_token_loads_but_is_caught_by_the_metric(austen_spec):
    """Peeking is tensor arithmetic like any other: the graph is fine, the metric refuses it."""
    peek = [embed("e"),
            {"name": "nxt", "op": "aten.roll.default", "args": [{"ref": "idx"}, [-1], [1]], "kwargs": {}},
            {"name": "hot", "op": "aten.embedding.default", "args": [{"ref": "eye"}, {"ref": "nxt"}], "kwargs": {}},
            {"name": "bump", "op": "aten.mul.Scalar", "args": [{"ref": "hot"}, 30.0], "kwargs": {}},
            {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "bump"}], "kwargs": {}}]
    vocab = austen_spec.vocab_size
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1)).numpy().tobytes()
    eye = torch.eye(vocab).numpy().tobytes()
    raw = file_of({"format": graph.FORMAT,
                   "tensors": {"w": {"dtype": "float32", "shape": [vocab, vocab], "offset": 0, "nbytes": len(table)},
                               "eye": {"dtype": "float32", "shape": [vocab, vocab], "offset": len(table),
                                       "nbytes": len(eye)}},
                   "inputs": [{"name": "w", "tensor": "w"}, {"name": "eye", "tensor": "eye"},
                              {"name": "idx", "input": True}],
                   "nodes": peek, "output": "logits"}, table + eye)
    program = graph.load(raw, graph.Limits(), vocab_size=vocab, seq_len=64)
    with pytest.raises(prepare.NotCausal):
        prepare.evaluate_bpb(program, austen_spec, 1024, 64, 8, "cpu", check_lengths=program.check_lengths)


def test_a_program_that_mixes_rows_sees_only_its_own_row(austen_spec):
    """A mean over the batch dimension is, under the scorer's vmap, a mean over the one row."""
    vocab = austen_spec.vocab_size
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1)).numpy().tobytes()
    tensors = {"w": {"dtype": "float32", "shape": [vocab, vocab], "offset": 0, "nbytes": len(table)}}
    inputs = [{"name": "w", "tensor": "w"}, {"name": "idx", "input": True}]
    mix = [embed("e"), {"name": "m", "op": "aten.mean.dim", "args": [{"ref": "e"}, [0], True], "kwargs": {}},
           {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "m"}], "kwargs": {}}]
    alone = [embed("e"), {"name": "logits", "op": "aten.mul.Scalar", "args": [{"ref": "e"}, 2.0], "kwargs": {}}]
    scores = []
    for nodes in (mix, alone):
        raw = file_of({"format": graph.FORMAT, "tensors": tensors, "inputs": inputs, "nodes": nodes,
                       "output": "logits"}, table)
        program = graph.load(raw, graph.Limits(), vocab_size=vocab, seq_len=64)
        scores.append(prepare.evaluate_bpb(program, austen_spec, 1024, 64, 8, "cpu",
                                           check_lengths=program.check_lengths)["val_bpb"])
    assert scores[0] == scores[1]


def test_training_mode_dropout_and_attention_dropout_draw_randomness_and_are_refused():
    with pytest.raises(graph.GraphInvalid, match="eval mode"):
        load(tiny_program([embed("e"), {"name": "d", "op": "aten.dropout.default", "args": [{"ref": "e"}, 0.1, True],
                                        "kwargs": {}}]))
    q = {"ref": "e"}
    with pytest.raises(graph.GraphInvalid, match="dropout_p=0"):
        load(tiny_program([embed("e"), {"name": "a", "op": "aten.scaled_dot_product_attention.default",
                                        "args": [q, q, q], "kwargs": {"dropout_p": 0.2}}]))


def test_a_program_that_reads_a_value_before_it_exists_or_takes_two_inputs_is_refused():
    with pytest.raises(graph.GraphInvalid, match="not computed before it"):
        load(tiny_program([{"name": "a", "op": "aten.add.Tensor", "args": [{"ref": "later"}, 1], "kwargs": {}},
                           embed("later")]))
    two = [{"name": "w", "tensor": "w"}, {"name": "idx", "input": True}, {"name": "extra", "input": True}]
    with pytest.raises(graph.GraphInvalid, match="more than one input"):
        load(tiny_program([embed()], inputs=two))


def test_logits_of_the_wrong_shape_or_kind_are_refused_before_any_real_compute():
    summed = [embed("e"), {"name": "s", "op": "aten.sum.dim_IntList", "args": [{"ref": "e"}, [2]], "kwargs": {}}]
    with pytest.raises(graph.GraphInvalid, match=r"must return logits \[1, 32, V\]"):
        load(tiny_program(summed))
    ints = [embed("e"), {"name": "i", "op": "aten._to_copy.default", "args": [{"ref": "e"}],
                         "kwargs": {"dtype": {"dtype": "int64"}}}]
    with pytest.raises(graph.GraphInvalid, match="must return logits"):
        load(tiny_program(ints))


def test_an_index_out_of_range_is_clamped_never_a_fault():
    """On a GPU an out-of-range embedding index is a device-side assert that poisons the process."""
    shifted = [{"name": "far", "op": "aten.add.Tensor", "args": [{"ref": "idx"}, 10_000], "kwargs": {}},
               embed("logits", "far")]
    program = load(tiny_program(shifted))
    out = program(torch.zeros(1, 32, dtype=torch.int64))
    assert out.shape == (1, 32, VOCAB) and torch.isfinite(out).all()


def test_a_program_whose_own_assertion_fails_is_refused():
    nodes = [embed("e"), {"name": "n", "op": "aten.sym_size.int", "args": [{"ref": "idx"}, 1], "kwargs": {}},
             {"name": "ok", "op": "operator.lt", "args": [{"ref": "n"}, 20], "kwargs": {}},
             {"name": "check", "op": "aten._assert_scalar.default", "args": [{"ref": "ok"}, "n < 20"], "kwargs": {}},
             {"name": "logits", "op": "aten.mul.Scalar", "args": [{"ref": "e"}, 1.0], "kwargs": {}}]
    with pytest.raises(graph.GraphInvalid, match="own check failed"):
        load(tiny_program(nodes))


# ---- hostile files: bounded before anything is allocated -----------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_tensor_declared_far_larger_than_the_file_is_refused_without_allocating_it():
    before = _rss_mb()
    bomb = {"w": {"dtype": "float32", "shape": [1 << 20, 1 << 10], "offset": 0, "nbytes": 4 << 30}}  # 4 GiB
    with pytest.raises(graph.GraphInvalid, match="are not in the file"):
        load(tiny_program([embed()], tensors=bomb, payload=b"\0" * 1024))
    assert _rss_mb() - before < 100


def test_bytes_that_do_not_match_the_shape_are_refused():
    lying = {"w": {"dtype": "float32", "shape": [VOCAB, VOCAB], "offset": 0, "nbytes": 16}}
    with pytest.raises(graph.GraphInvalid, match="bytes declared"):
        load(tiny_program([embed()], tensors=lying))


def test_an_intermediate_too_large_for_the_objective_is_refused_from_shapes_alone():
    before = _rss_mb()
    huge = [embed("e"), {"name": "big", "op": "aten.full.default", "args": [[1 << 16, 1 << 16], 1.0],
                         "kwargs": {"dtype": {"dtype": "float32"}, "device": {"device": "cpu"}}},
            {"name": "logits", "op": "aten.mul.Scalar", "args": [{"ref": "e"}, 1.0], "kwargs": {}}]
    with pytest.raises(graph.GraphInvalid, match="makes a tensor of shape"):
        load(tiny_program(huge))
    assert _rss_mb() - before < 100


def test_work_beyond_the_objectives_bound_is_refused_from_shapes_alone():
    """A matmul of a broadcast view allocates nothing until it runs: counted, it is refused first."""
    wide = [embed("e"), {"name": "x", "op": "aten.expand.default", "args": [{"ref": "e"}, [4096, 32, VOCAB]],
                         "kwargs": {}},
            {"name": "y", "op": "aten.sum.default", "args": [{"ref": "x"}], "kwargs": {}},
            {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "y"}], "kwargs": {}}]
    with pytest.raises(graph.GraphInvalid, match="operations per token"):
        load(tiny_program(wide), max_work_per_token=1e5)


def test_a_size_that_explodes_at_one_secret_length_is_refused_before_that_length_runs():
    """Sizes may be computed from the length in any way; every length the metric will use is
    bounded before the first real row (here, a tensor of 2^34 elements at length 17 only)."""
    spike = [embed("e"),
             {"name": "n", "op": "aten.sym_size.int", "args": [{"ref": "idx"}, 1], "kwargs": {}},
             {"name": "d", "op": "operator.sub", "args": [{"ref": "n"}, 17], "kwargs": {}},
             {"name": "d2", "op": "operator.mul", "args": [{"ref": "d"}, {"ref": "d"}], "kwargs": {}},
             {"name": "d3", "op": "operator.add", "args": [{"ref": "d2"}, 1], "kwargs": {}},
             {"name": "size", "op": "operator.floordiv", "args": [1 << 34, {"ref": "d3"}], "kwargs": {}},
             {"name": "big", "op": "aten.zeros.default", "args": [[{"ref": "size"}]],
              "kwargs": {"dtype": {"dtype": "float32"}, "device": {"device": "cpu"}}},
             {"name": "s", "op": "aten.sum.default", "args": [{"ref": "big"}], "kwargs": {}},
             {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "s"}], "kwargs": {}}]
    program = load(tiny_program(spike))  # at the full length 32 the size is 2^34 // 226: small
    program.check_lengths([5, 30])
    with pytest.raises(graph.GraphInvalid, match="at length 17|makes a tensor"):
        program.check_lengths([17])


@pytest.mark.parametrize("header", [
    b"not json at all", b"[" * 100_000 + b"]" * 100_000, b'{"format": "arena-graph/1"}', b'"a string"'])
def test_a_header_that_is_no_program_is_one_line(header):
    raw = struct.pack("<Q", len(header)) + header
    with pytest.raises(graph.GraphInvalid) as refused:
        load(raw)
    assert "\n" not in str(refused.value)


def test_a_header_longer_than_its_file_or_an_empty_file_is_refused():
    with pytest.raises(graph.GraphInvalid, match="claims"):
        load(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(graph.GraphInvalid, match="empty or truncated"):
        load(b"")


def test_integers_beyond_2_to_the_40_and_arguments_nested_deep_are_refused():
    with pytest.raises(graph.GraphInvalid, match="beyond 2\\^40"):
        load(tiny_program([embed("e"), {"name": "x", "op": "aten.mul.Scalar", "args": [{"ref": "e"}, 1 << 60],
                                        "kwargs": {}}]))
    nested = [[[[[[1]]]]]]
    with pytest.raises(graph.GraphInvalid, match="nested deeper"):
        load(tiny_program([embed("e"), {"name": "x", "op": "aten.view.default", "args": [{"ref": "e"}, nested],
                                        "kwargs": {}}]))


def test_a_bool_tensor_holding_other_bytes_is_read_as_a_plain_bool():
    raw = tiny_program([embed()], tensors={
        "w": {"dtype": "float32", "shape": [VOCAB, VOCAB], "offset": 0, "nbytes": VOCAB * VOCAB * 4},
        "flags": {"dtype": "bool", "shape": [4], "offset": 0, "nbytes": 4}},
        inputs=[{"name": "w", "tensor": "w"}, {"name": "flags", "tensor": "flags"}, {"name": "idx", "input": True}])
    header, payload = document(raw)
    program = load(file_of(header, b"\x07\x00\xff\x01" + payload[4:]))
    flags = program.constants["flags"]
    assert flags.dtype is torch.bool and flags.tolist() == [True, False, True, True]
    assert flags.view(torch.uint8).tolist() == [1, 0, 1, 1]


def test_the_exported_file_of_the_baseline_round_trips_its_tensors(tmp_path):
    model = baseline_model()
    header, payload = document(exported(model, tmp_path))
    stored = {name: np.frombuffer(payload[t["offset"]:t["offset"] + t["nbytes"]], dtype=np.float32).reshape(t["shape"])
              for name, t in header["tensors"].items() if t["dtype"] == "float32"}
    for name, p in model.named_parameters():
        assert np.array_equal(stored[name], p.detach().numpy())


@pytest.fixture(scope="module")
def austen_spec():
    return prepare.prepare("austen", 512)


# ---- memory the evaluation really holds (red team, issue 20) ------------------------------------


def _full(name: str, shape: list) -> dict:
    return {"name": name, "op": "aten.full.default", "args": [shape, 1.0],
            "kwargs": {"dtype": {"dtype": "float32"}, "device": {"device": "cpu"}}}


def test_a_view_that_outlives_its_base_keeps_the_base_counted():
    """A one-element slice of a 32 MB tensor holds all 32 MB: four of them, kept to the end, held
    128 MB while the bound counted the bases freed at their last use (peak 32 MB, under a 64 MB
    bound); at the objective's sizes, a dozen such slices held 24 GB against a 2 GB bound."""
    nodes = [embed("e")]
    for i in range(4):
        nodes += [_full(f"big{i}", [8 << 20]),
                  {"name": f"s{i}", "op": "aten.slice.Tensor", "args": [{"ref": f"big{i}"}, 0, 0, 1], "kwargs": {}}]
    nodes += [{"name": "kept", "op": "aten.stack.default", "args": [[{"ref": f"s{i}"} for i in range(4)]], "kwargs": {}},
              {"name": "k", "op": "aten.sum.default", "args": [{"ref": "kept"}], "kwargs": {}},
              {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "k"}], "kwargs": {}}]
    with pytest.raises(graph.GraphInvalid, match=r"needs 12[89] MB of intermediate tensors"):
        load(tiny_program(nodes), max_memory_mb=64)
    program = load(tiny_program(nodes), max_memory_mb=256)
    assert program.peak_memory_bytes >= 4 * (32 << 20)


def test_a_tensor_an_operator_makes_inside_counts_against_the_memory_bound():
    """einsum of three operands contracts the first two first: "ab,bc,cd->ad" over [8192, 1],
    [1, 8192], [8192, 1] makes a [8192, 8192] product (256 MB) that no node holds, for an output of
    32 KB; at 2^15 it was 4 GB within the tiny objective's work bound."""
    nodes = [embed("e"), _full("col", [8192, 1]), _full("row", [1, 8192]),
             {"name": "es", "op": "aten.einsum.default", "args": ["ab,bc,cd->ad", [{"ref": "col"}, {"ref": "row"},
                                                                                    {"ref": "col"}]], "kwargs": {}},
             {"name": "s", "op": "aten.sum.default", "args": [{"ref": "es"}], "kwargs": {}},
             {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "s"}], "kwargs": {}}]
    with pytest.raises(graph.GraphInvalid, match="MB of intermediate tensors"):
        load(tiny_program(nodes), max_memory_mb=64)
    assert load(tiny_program(nodes), max_memory_mb=1024).peak_memory_bytes >= 8192 * 8192 * 4


def test_a_program_that_needs_more_memory_at_a_prefix_length_than_the_batches_allow_is_refused(austen_spec):
    """Rows a batch are sized from the memory one row needs at the full length; a program whose
    sizes grow only at shorter lengths (the prefix-only runs, a batch's rows at once) passed every
    per-row bound while the harness held rows x that: 980 MB resident against a 64 MB bound."""
    from train import scorer
    from train.contract import TrialFailed

    vocab, length = austen_spec.vocab_size, 64
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1)).numpy().tobytes()
    grow = [embed("e"),
            {"name": "n", "op": "aten.sym_size.int", "args": [{"ref": "idx"}, 1], "kwargs": {}},
            {"name": "d", "op": "operator.sub", "args": [2 * length - 1, {"ref": "n"}], "kwargs": {}},
            {"name": "short", "op": "operator.floordiv", "args": [{"ref": "d"}, length], "kwargs": {}},  # 1 if n < 64
            {"name": "k", "op": "operator.mul", "args": [{"ref": "short"}, 2 << 20], "kwargs": {}},
            {"name": "size", "op": "operator.add", "args": [{"ref": "k"}, 2], "kwargs": {}},
            {"name": "first", "op": "aten.slice.Tensor", "args": [{"ref": "idx"}, 1, 0, 1], "kwargs": {}},
            {"name": "f", "op": "aten._to_copy.default", "args": [{"ref": "first"}], "kwargs": {"dtype": {"dtype": "float32"}}},
            {"name": "wide", "op": "aten.expand.default", "args": [{"ref": "f"}, [1, {"ref": "size"}]], "kwargs": {}},
            {"name": "made", "op": "aten.contiguous.default", "args": [{"ref": "wide"}], "kwargs": {}},
            {"name": "s", "op": "aten.sum.default", "args": [{"ref": "made"}], "kwargs": {}},
            {"name": "z", "op": "aten.mul.Scalar", "args": [{"ref": "s"}, 0.0], "kwargs": {}},
            {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "z"}], "kwargs": {}}]
    raw = file_of({"format": graph.FORMAT,
                   "tensors": {"w": {"dtype": "float32", "shape": [vocab, vocab], "offset": 0, "nbytes": len(table)}},
                   "inputs": [{"name": "w", "tensor": "w"}, {"name": "idx", "input": True}],
                   "nodes": grow, "output": "logits"}, table)
    objective = {"eval_tokens": 1024, "eval_seq_len": length, "eval_batch_size": 8, "eval_limits": {"max_memory_mb": 32}}
    program = scorer.load_program(raw, objective, vocab, 1 << 30)  # 16 MB a row at a prefix length, 1 MB at 64
    assert scorer.batch_rows(program, objective) == 8
    with pytest.raises(TrialFailed, match="at length") as refused:
        scorer.evaluate(program, austen_spec, objective, "cpu", lambda line: None)
    assert refused.value.status == "invalid"


def test_the_arguments_of_all_operations_are_bounded_as_the_operations_are():
    """Each operation may take lists of up to 4096 items, and every item costs the scorer Python
    and dispatch time at each check and each batch, which the work count does not see: 200 cats of
    4096 references (an 11 MB file, 1.6e6 operations a token) took 30 s to load, 23 s a length
    checked and 19 s a batch of 16 rows; at 64 MB, about two hours of a cpu-preset trial."""
    wide = [embed("e"), {"name": "c", "op": "aten.slice.Tensor", "args": [{"ref": "e"}, 2, 0, 1], "kwargs": {}}]
    wide += [{"name": f"k{i}", "op": "aten.cat.default", "args": [[{"ref": "c"}] * 400, 2], "kwargs": {}}
             for i in range(10)]
    wide += [{"name": "logits", "op": "aten.slice.Tensor", "args": [{"ref": "k9"}, 2, 0, VOCAB], "kwargs": {}}]
    with pytest.raises(graph.GraphInvalid, match=r"take \d+ arguments in all; at most 1600") as refused:
        load(tiny_program(wide), max_nodes=100)
    assert "\n" not in str(refused.value)
    assert load(tiny_program(wide), max_nodes=1000).work_per_token > 0  # the same program, within a larger bound


def test_a_header_larger_than_the_objectives_operations_need_is_refused_before_it_is_parsed():
    """JSON costs about 25 bytes of memory a byte of header: a 64 MB header of empty lists made the
    trusted harness hold 1.6 GB before a single check. The header now has the room max_nodes
    operations need, and a longer one is refused unread."""
    junk = b'{"nodes": [' + b"[]," * (1 << 20) + b"[]]}"  # 3 MB
    before = _rss_mb()
    with pytest.raises(graph.GraphInvalid, match="header of .* bytes; at most") as refused:
        load(struct.pack("<Q", len(junk)) + junk, max_nodes=1000)
    assert "\n" not in str(refused.value) and _rss_mb() - before < 30


@pytest.mark.parametrize("op,args", [
    ("aten.embedding.default", [{"ref": "none"}, {"ref": "idx"}]),
    ("aten.index_select.default", [{"ref": "none"}, 0, {"ref": "flat"}]),
    ("aten.index.Tensor", [{"ref": "none"}, [{"ref": "flat"}]]),
])
def test_an_index_into_an_empty_dimension_is_refused_at_load(op, args):
    """Clamping cannot bring an index into range of a dimension of size 0: the CPU refuses it late
    (an error on the first real row), and a GPU asserts on the device, the fault clamping is for."""
    tensors = {"w": {"dtype": "float32", "shape": [VOCAB, VOCAB], "offset": 0, "nbytes": VOCAB * VOCAB * 4},
               "none": {"dtype": "float32", "shape": [0, VOCAB], "offset": 0, "nbytes": 0}}
    inputs = [{"name": "w", "tensor": "w"}, {"name": "none", "tensor": "none"}, {"name": "idx", "input": True}]
    nodes = [embed("e"), {"name": "flat", "op": "aten.view.default", "args": [{"ref": "idx"}, [-1]], "kwargs": {}},
             {"name": "x", "op": op, "args": args, "kwargs": {}},
             {"name": "s", "op": "aten.sum.default", "args": [{"ref": "x"}], "kwargs": {}},
             {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "s"}], "kwargs": {}}]
    with pytest.raises(graph.GraphInvalid, match="empty"):
        load(tiny_program(nodes, tensors=tensors, inputs=inputs))


def test_a_program_past_its_deadline_stops_checking_and_evaluating():
    """What the work count misses (an operator without a vmap batch rule runs once a row) has the
    deadline as its bound: the trial's hard limit, checked at every node."""
    import time

    raw = tiny_program([embed()])
    with pytest.raises(graph.OutOfTime):
        graph.load(raw, graph.Limits(), vocab_size=VOCAB, seq_len=32, deadline=time.time() - 1)
    program = load(raw)
    program.deadline = time.time() - 1
    with pytest.raises(graph.OutOfTime):
        program(torch.zeros(1, 32, dtype=torch.int64))
    with pytest.raises(graph.OutOfTime):
        program.check_lengths([7])


@pytest.mark.parametrize("op,args", [("aten.unbind.int", [{"ref": "wide"}, 0]),
                                     ("aten.split.Tensor", [{"ref": "wide"}, 1]),
                                     ("aten.chunk.default", [{"ref": "wide"}, 1 << 20])])
def test_an_operator_that_would_make_a_million_tensors_is_refused_before_it_runs(op, args):
    """unbind of an expanded 1-byte view ([2^20] bools: 1 MB by the bound) made a million tensors,
    11.6 s and 693 MB of the trusted harness's memory in the meta pass alone, for 1e5 operations a
    token; a [2^30] view (the tiny objective's 1 GB) would have needed some 700 GB."""
    nodes = [embed("e"),
             {"name": "one", "op": "aten.ones.default", "args": [[1]],
              "kwargs": {"dtype": {"dtype": "bool"}, "device": {"device": "cpu"}}},
             {"name": "wide", "op": "aten.expand.default", "args": [{"ref": "one"}, [1 << 20]], "kwargs": {}},
             {"name": "parts", "op": op, "args": args, "kwargs": {}},
             {"name": "p0", "op": "operator.getitem", "args": [{"ref": "parts"}, 0], "kwargs": {}},
             {"name": "f", "op": "aten._to_copy.default", "args": [{"ref": "p0"}], "kwargs": {"dtype": {"dtype": "float32"}}},
             {"name": "s", "op": "aten.sum.default", "args": [{"ref": "f"}], "kwargs": {}},
             {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "s"}], "kwargs": {}}]
    before = _rss_mb()
    with pytest.raises(graph.GraphInvalid, match="tensors; at most 4096"):
        load(tiny_program(nodes))
    assert _rss_mb() - before < 100
