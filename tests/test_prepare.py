"""train/prepare.py on real data: the Austen corpus fetched from Debian, real BPE tokenizers, real caches."""
from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train import corpora
from train import prepare as P

ROOT = Path(__file__).resolve().parent.parent
AUSTEN_CHAPTERS = {  # the chapter counts of the six novels (Emma has 3 volumes of 18, 18 and 19)
    "emma": 55, "mansfieldpark": 48, "northangerabbey": 31, "persuasion": 24, "prideprejudice": 61,
    "sensesensibility": 50,
}


@pytest.fixture(scope="session")
def austen(tmp_path_factory) -> P.DataSpec:
    """Austen at vocab 2048 built once, from scratch (apt-get download included), in a scratch cache."""
    return P.prepare("austen", 2048, tmp_path_factory.mktemp("arena-cache"))


def write_corpus(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def prose(seed: int, words: int = 400) -> str:
    rng = random.Random(seed)
    vocab = "the a of and to in was her his she he it that had with for not be as but at by".split()
    return " ".join(rng.choice(vocab) for _ in range(words)) + ".\n"


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "texts", {f"doc{i:02d}.txt": prose(i) for i in range(12)})


def eval_targets(spec: P.DataSpec, eval_tokens: int, seq_len: int) -> np.ndarray:
    """The targets the metric must score: windows of seq_len+1 from the start of val, no overlap."""
    windows = -(-eval_tokens // seq_len)
    data = np.asarray(spec.val_tokens()[: windows * (seq_len + 1)], dtype=np.int64).reshape(windows, seq_len + 1)
    return data[:, 1:].reshape(-1)[:eval_tokens]


# ---- the corpus -------------------------------------------------------------------------------


def test_austen_reads_all_six_novels_split_into_their_chapters(austen):
    docs, source = corpora._austen_documents(austen.dir.parent.parent / "downloads" / "austen")
    assert source.startswith("r-cran-janeaustenr_")
    per_novel = {novel: sum(name.startswith(novel + "/") for name, _ in docs) for novel in AUSTEN_CHAPTERS}
    assert per_novel == AUSTEN_CHAPTERS
    by_name = dict(docs)
    assert by_name["prideprejudice/001"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in by_name["prideprejudice/001"]
    assert by_name["emma/002"].startswith("CHAPTER II")
    meta = austen.meta()
    assert meta["train_docs"] + meta["val_docs"] == sum(AUSTEN_CHAPTERS.values())


def test_split_is_deterministic_disjoint_and_independent_of_order():
    docs = [(f"book/{i:03d}", prose(i, words=50 + i)) for i in range(60)]
    train, val = P.split_documents(docs)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = P.split_documents(shuffled)
    assert {n for n, _ in val} == {n for n, _ in val2}
    assert {n for n, _ in train} & {n for n, _ in val} == set()
    assert sorted(train + val) == sorted(docs)
    val_bytes = sum(len(t.encode()) for _, t in val)
    total = sum(len(t.encode()) for _, t in docs)
    assert P.VAL_FRACTION * total <= val_bytes < P.VAL_FRACTION * total + max(len(t.encode()) for _, t in docs)


def test_split_needs_two_documents():
    with pytest.raises(ValueError, match="at least 2 documents"):
        P.split_documents([("only", "text")])


def test_validation_text_never_reaches_the_tokenizer(tmp_path):
    secret = "zqxjvk"  # repeated 2000 times: would surely become a token if the tokenizer saw it
    docs = {f"doc{i:02d}.txt": prose(i) for i in range(10)}
    for name in docs:
        candidate = {**docs, name: (secret + " ") * 2000}
        if name in {n for n, _ in P.split_documents(list(candidate.items()))[1]}:
            docs = candidate
            break
    spec = P.prepare(str(write_corpus(tmp_path / "texts", docs)), 300, tmp_path / "cache")
    assert name in spec.meta()["val_doc_names"]
    vocab = json.loads(spec.tokenizer_path.read_text())["model"]["vocab"]
    assert not [token for token in vocab if "zqx" in token]
    assert [token for token in vocab if "the" in token]  # while train-split words did get merged


def test_token_streams_hold_every_byte_of_the_split(austen):
    meta = austen.meta()
    token_bytes = austen.token_bytes()
    assert int(token_bytes[np.asarray(austen.val_tokens())].sum()) == meta["val_bytes"]
    assert int(token_bytes[np.asarray(austen.train_tokens())].sum()) == meta["train_bytes"]
    assert int((np.asarray(austen.val_tokens()) == austen.eot_id).sum()) == meta["val_docs"]


def test_token_bytes_are_the_utf8_lengths_of_the_tokens(austen):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(austen.tokenizer_path))
    token_bytes = austen.token_bytes()
    assert token_bytes.shape == (austen.vocab_size,)
    assert token_bytes[austen.eot_id] == 0
    for word in [" the", " Elizabeth", "\n\n", "£", "é"]:
        ids = tokenizer.encode(word).ids
        raw = P.token_bytes_of(austen, ids)
        assert b"".join(raw) == word.encode()
        assert [int(token_bytes[i]) for i in ids] == [len(piece) for piece in raw]
    sample = np.asarray(austen.val_tokens()[1:400])
    decoded = b"".join(P.token_bytes_of(austen, sample)).decode()
    assert decoded == tokenizer.decode(sample.tolist())


# ---- the cache --------------------------------------------------------------------------------


def test_second_prepare_reuses_the_cache(small_corpus, tmp_path, monkeypatch):
    spec = P.prepare(str(small_corpus), 300, tmp_path / "cache")
    stamps = {p: p.stat().st_mtime_ns for p in spec.dir.iterdir()}

    def no_rebuild(*args):
        raise AssertionError("rebuilt a cached corpus")

    monkeypatch.setattr(P, "_build", no_rebuild)
    again = P.prepare(str(small_corpus), 300, tmp_path / "cache")
    assert again == spec
    assert {p: p.stat().st_mtime_ns for p in again.dir.iterdir()} == stamps


def test_cache_key_separates_vocab_sizes_and_folder_contents(small_corpus, tmp_path):
    base = P.prepare(str(small_corpus), 300, tmp_path / "cache")
    other_vocab = P.prepare(str(small_corpus), 320, tmp_path / "cache")
    (small_corpus / "doc00.txt").write_text(prose(99))
    other_text = P.prepare(str(small_corpus), 300, tmp_path / "cache")
    assert len({base.dir, other_vocab.dir, other_text.dir}) == 3
    assert other_vocab.token_bytes().shape == (320,)


def test_two_processes_preparing_at_once_get_one_complete_cache(small_corpus, tmp_path):
    code = (
        "import sys; from train.prepare import prepare; "
        "s = prepare(sys.argv[1], 400, sys.argv[2]); print(s.dir, s.val_tokens().size, s.train_tokens().size)"
    )
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(small_corpus), str(cache)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert sorted(p.name for p in (cache / "data").iterdir() if not p.name.endswith(".lock")) == [
        Path(outputs[0][0].split()[0]).name
    ]


def test_folder_corpus_uses_its_files_as_documents(small_corpus, tmp_path):
    spec = P.prepare(str(small_corpus), 300, tmp_path / "cache")
    meta = spec.meta()
    assert meta["train_docs"] + meta["val_docs"] == 12
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(p.read_bytes()) for p in small_corpus.glob("*.txt"))
    assert spec.train_tokens().dtype == np.uint16
    assert all(path.is_absolute() for path in (spec.dir, spec.train_path, spec.val_path, spec.tokenizer_path))


# ---- bad input fails clearly ------------------------------------------------------------------


def test_unknown_corpus_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'austin'.*austen"):
        P.prepare("austin", 2048, tmp_path)


@pytest.mark.parametrize("vocab_size", [100, 2048.0, "2048"])
def test_bad_vocab_size_fails_clearly(vocab_size, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        P.prepare("austen", vocab_size, tmp_path)


def test_folder_without_text_or_with_non_utf8_fails_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        P.prepare(str(empty), 300, tmp_path / "cache")
    latin = write_corpus(tmp_path / "latin", {"a.txt": prose(1), "b.txt": prose(2)})
    (latin / "c.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="c.txt is not UTF-8"):
        P.prepare(str(latin), 300, tmp_path / "cache")


def test_climbmix_without_network_fails_with_one_clear_line(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    with pytest.raises(RuntimeError, match="climbmix corpus needs internet: cannot reach huggingface.co") as err:
        P.prepare("climbmix", 8192, tmp_path)
    assert "\n" not in str(err.value)


def test_climbmix_with_a_hanging_resolver_still_fails(tmp_path, monkeypatch):
    import threading

    release = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: release.wait(30))
    monkeypatch.setattr(corpora, "NETWORK_TIMEOUT_S", 0.2)
    try:
        with pytest.raises(RuntimeError, match="cannot reach huggingface.co \\(no answer"):
            P.prepare("climbmix", 8192, tmp_path)
    finally:
        release.set()


def test_missing_fetch_tool_names_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on the path
    with pytest.raises(RuntimeError, match="`apt-get download r-cran-janeaustenr` failed.*apt-get update"):
        P.prepare("austen", 2048, tmp_path / "cache")


def test_cli_prints_a_summary_and_fails_in_one_line(small_corpus, tmp_path):
    env = {**os.environ, "ARENA_CACHE": str(tmp_path / "cache")}
    ok = subprocess.run([sys.executable, "-m", "train.prepare", "--corpus", str(small_corpus), "--vocab-size", "300"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "docs (train+val)" in ok.stdout and "unigram val_bpb" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "train.prepare", "--corpus", "nowhere"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == ["error: unknown corpus 'nowhere': use one of austen, shakespeare, "
                                               "climbmix or a folder of .txt files"]


# ---- the metric -------------------------------------------------------------------------------


def test_uniform_logits_score_log2_vocab_per_byte(austen):
    eval_tokens, seq_len = 1000, 64  # 16 windows, the last one partly counted; batches of 3 leave a short one
    result = P.evaluate_bpb(lambda idx: torch.zeros(*idx.shape, austen.vocab_size), austen, eval_tokens, seq_len, 3, "cpu")
    nbytes = austen.token_bytes()[eval_targets(austen, eval_tokens, seq_len)]
    expected = math.log2(austen.vocab_size) * (nbytes > 0).sum() / nbytes.sum()
    assert result["tokens"] == eval_tokens and result["rows"] == 16
    assert result["bytes"] == nbytes.sum()
    assert result["val_bpb"] == pytest.approx(expected, rel=1e-6)


def test_metric_matches_an_independent_computation_for_a_bigram_table(austen):
    table = torch.randn(austen.vocab_size, austen.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    result = P.evaluate_bpb(lambda idx: table[idx], austen, 2048, 128, 4, "cpu")

    windows = 2048 // 128
    data = np.asarray(austen.val_tokens()[: windows * 129], dtype=np.int64).reshape(windows, 129)
    logits = table.double().numpy()[data[:, :-1]]
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    targets = data[:, 1:]
    nbytes = austen.token_bytes()[targets]
    nats = -(np.take_along_axis(logprobs, targets[..., None], -1)[..., 0] * (nbytes > 0)).sum()
    assert result["val_bpb"] == pytest.approx(nats / (math.log(2) * nbytes.sum()), rel=1e-5)


def test_the_prefix_runs_of_an_evaluation_use_a_few_secret_lengths_and_every_row_is_checked(austen):
    """The scorer bounds the program at every length it will run before any real row (a meta pass
    each): the prefix lengths come from a pool of PREFIX_LENGTHS an evaluation, not two fresh ones
    a batch (17 meta passes for the cpu preset before, 5 now), and each row still gets its seams
    and one prefix-only run."""
    table = torch.randn(austen.vocab_size, austen.vocab_size, generator=torch.Generator().manual_seed(9))
    lengths_seen, calls = [], []

    def model(idx):
        calls.append(idx.shape[-1])
        return table[idx]

    for seed in range(5):
        result = P.evaluate_bpb(model, austen, 64 * 64, 64, 4, "cpu", rng=np.random.default_rng(seed),
                                check_lengths=lengths_seen.append)
        [lengths] = lengths_seen[-1:]
        assert 64 in lengths and len(lengths) <= P.PREFIX_LENGTHS + 1
        assert set(calls) <= set(lengths), "the model runs only at lengths the scorer bounded first"
        assert result["causality_checks"] == (P.SEAMS_PER_ROW + 1) * 64
        calls.clear()
    assert len({tuple(x) for x in lengths_seen}) > 1, "the pool is drawn afresh each evaluation"


def test_every_row_is_a_distinct_window_and_the_model_sees_one_row_at_a_time(austen):
    seen = []

    def model(idx):  # under vmap: the logical batch is the one row being scored
        seen.append(tuple(idx.shape))
        return torch.zeros(*idx.shape, austen.vocab_size)

    P.evaluate_bpb(model, austen, 1000, 64, 5, "cpu", check_causal=False)
    assert seen and all(shape[0] == 1 for shape in seen)
    windows = np.asarray(austen.val_tokens()[: 16 * 65], dtype=np.int64).reshape(16, 65)
    assert len({tuple(row) for row in windows}) == 16  # what the metric tiles: no row repeats another


def test_a_model_that_knows_every_target_scores_zero(austen):
    eval_tokens, seq_len = 512, 64
    windows = np.asarray(austen.val_tokens()[: 8 * 65], dtype=np.int64).reshape(8, 65)
    answers = {tuple(row[:-1]): row[1:] for row in windows}

    def oracle(idx):
        targets = torch.as_tensor(np.stack([answers[tuple(row)] for row in idx.tolist()]))
        return torch.nn.functional.one_hot(targets, austen.vocab_size).float() * 100

    rows = torch.as_tensor(windows[:, :-1])
    scores = [oracle(rows[i:i + 1]) for i in range(8)]  # the oracle works (outside vmap: it reads values)
    assert all(s.argmax(-1).equal(torch.as_tensor(windows[i:i + 1, 1:])) for i, s in enumerate(scores))
    with pytest.raises(RuntimeError):  # and a pure tensor program cannot be one: no value leaves the graph
        P.evaluate_bpb(oracle, austen, eval_tokens, seq_len, 4, "cpu", check_causal=False)


def test_a_model_that_reads_the_next_token_is_rejected(austen):
    def peeker(idx):
        return torch.nn.functional.one_hot(torch.roll(idx, -1, 1), austen.vocab_size).float() * 100

    with pytest.raises(P.NotCausal, match="not causal"):
        P.evaluate_bpb(peeker, austen, 512, 64, 4, "cpu")


@pytest.mark.parametrize("ahead", [1, 7])
def test_a_model_that_reads_any_later_token_is_rejected(austen, ahead):
    table = torch.randn(austen.vocab_size, austen.vocab_size, generator=torch.Generator().manual_seed(2))

    def peeker(idx):
        return table[idx] + 50 * torch.nn.functional.one_hot(torch.roll(idx, -ahead, 1), austen.vocab_size)

    with pytest.raises(P.NotCausal):
        P.evaluate_bpb(peeker, austen, 2048, 64, 8, "cpu")


def test_nothing_flows_between_rows(austen):
    """A program that mixes its batch's rows scores exactly as if each row were alone: under vmap
    its batch is the one row."""
    table = torch.randn(austen.vocab_size, austen.vocab_size, generator=torch.Generator().manual_seed(3))
    mixing = P.evaluate_bpb(lambda idx: table[idx] + table[idx].mean(0), austen, 2048, 64, 8, "cpu")
    alone = P.evaluate_bpb(lambda idx: 2 * table[idx], austen, 2048, 64, 8, "cpu")
    assert mixing["val_bpb"] == alone["val_bpb"]


def test_a_model_that_peeks_only_in_full_length_rows_is_caught_by_the_prefix_runs(austen, monkeypatch):
    """Whether a row was cut short shows in its length; the prefix-only run is the causal answer
    itself, so a model that peeks whenever it can disagrees with it."""
    table = torch.randn(austen.vocab_size, austen.vocab_size, generator=torch.Generator().manual_seed(5))

    def full_length_peeker(idx):
        peek = torch.nn.functional.one_hot(torch.roll(idx, -1, 1), austen.vocab_size)
        return table[idx] + (50 * peek if idx.shape[1] == 64 else 0)

    with pytest.raises(P.NotCausal):
        P.evaluate_bpb(full_length_peeker, austen, 2048, 64, 8, "cpu")


def test_a_model_that_looks_at_how_far_the_row_goes_is_caught_by_the_prefix_runs_alone(austen):
    """Logits that depend on the row's length (not its content) pass every seam probe (same length)
    and fail the prefix-only runs: position t may not know what comes after t, not even its length."""
    table = torch.randn(austen.vocab_size, austen.vocab_size, generator=torch.Generator().manual_seed(6))

    def length_aware(idx):
        return table[idx] * (1 + 0.001 * idx.shape[1])  # a sharper distribution the longer the row

    with pytest.raises(P.NotCausal):
        P.evaluate_bpb(length_aware, austen, 2048, 64, 8, "cpu", rng=np.random.default_rng(0))


def test_a_model_that_peeks_on_one_batch_only_is_still_rejected(austen):
    """Every batch has its probes in the same call, so cheating on any call is seen."""
    table = torch.randn(austen.vocab_size, austen.vocab_size, generator=torch.Generator().manual_seed(4))
    calls = []

    def sometimes(idx):
        calls.append(1)
        peek = len(calls) in (7, 8, 9)  # the calls of the third batch: real rows and seams, then prefixes
        return table[idx] + (50 * torch.nn.functional.one_hot(torch.roll(idx, -1, 1), austen.vocab_size) if peek else 0)

    with pytest.raises(P.NotCausal):
        P.evaluate_bpb(sometimes, austen, 4096, 64, 8, "cpu")


def test_seam_probes_continue_each_row_with_other_validation_text(austen):
    val = np.asarray(austen.val_tokens(), dtype=np.int64)
    inputs = torch.as_tensor(val[:8 * 64].reshape(8, 64))
    cuts, offsets, groups = P._probe_plan(8, 64, val.size, np.random.default_rng(0))
    probe = P._seam_probes(inputs, val, cuts, offsets)
    text = val.tobytes()
    for row, cut in enumerate(cuts):
        assert probe[row, :cut + 1].equal(inputs[row, :cut + 1]) and not probe[row].equal(inputs[row])
        assert probe[row, cut + 1:].numpy().tobytes() in text  # natural text from the validation split
    assert len(set(cuts.tolist())) > 1  # each row cut at its own position
    assert sorted(np.concatenate([members for _, members in groups]).tolist()) == list(range(8))
    assert all(2 <= length <= 63 for length, _ in groups)


def test_cuts_fall_on_every_position_but_the_last_as_often_as_any_other():
    """No position is rarely checked: over many plans, seam cuts are uniform on 0..T-2 and the
    prefix lengths a batch draws end uniformly on 1..T-2 (chi-square against uniform, scipy)."""
    from scipy.stats import chisquare

    rng, seq_len = np.random.default_rng(7), 16
    seams, prefix_ends = np.zeros(seq_len, int), np.zeros(seq_len, int)
    for _ in range(3000):
        cuts, _, groups = P._probe_plan(8, seq_len, 10_000, rng)
        np.add.at(seams, cuts, 1)
        for length, _ in groups:
            prefix_ends[length - 1] += 1
    assert seams[seq_len - 1] == 0 and prefix_ends[0] == 0 and prefix_ends[seq_len - 1] == 0
    assert chisquare(seams[:seq_len - 1]).pvalue > 1e-3
    assert chisquare(prefix_ends[1:seq_len - 1]).pvalue > 1e-3


def test_cache_digests_change_when_a_cache_is_rewritten(small_corpus, tmp_path):
    spec = P.prepare(str(small_corpus), 300, tmp_path / "cache")
    before = P.cache_digests(spec)
    tokens = np.load(spec.train_path)
    np.save(spec.train_path, tokens[::-1].copy())
    after = P.cache_digests(spec)
    assert after["train"] != before["train"] and after["val"] == before["val"]


def test_too_few_validation_tokens_fails_before_any_compute(austen):
    calls = []
    with pytest.raises(ValueError, match="too few for"):
        P.evaluate_bpb(calls.append, austen, austen.val_tokens().size, 256, 8, "cpu")
    assert calls == []


def test_wrong_logits_shape_fails_clearly(austen):
    with pytest.raises(ValueError, match="must return float logits"):
        P.evaluate_bpb(lambda idx: torch.zeros(idx.shape[0], austen.vocab_size), austen, 128, 64, 2, "cpu")
    with pytest.raises(ValueError, match="must return float logits"):
        P.evaluate_bpb(lambda idx: torch.zeros(*idx.shape, 10), austen, 128, 64, 2, "cpu")


def test_unigram_byte_model_of_two_equally_common_letters_is_one_bit(tmp_path):
    corpus = write_corpus(tmp_path / "ab", {f"{i}.txt": "ab" * (20000 + i) for i in range(8)})
    spec = P.prepare(str(corpus), 260, tmp_path / "cache")
    assert P.unigram_bpb(spec, "byte") == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="level"):
        P.unigram_bpb(spec, "word")


def test_unigram_token_model_beats_uniform_but_not_the_bytes_entropy_floor(austen):
    uniform = math.log2(austen.vocab_size) * austen.meta()["val_tokens"] / austen.meta()["val_bytes"]
    assert 0 < P.unigram_bpb(austen) < uniform
    assert 0 < P.unigram_bpb(austen, "byte") < 8
