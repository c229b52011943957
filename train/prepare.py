"""The fixed part of the objective: the val_bpb metric, and the corpus, its tokenizer and token caches.

No searcher may edit this file: every trial's score is computed here, on validation text that was never
used for training or for the tokenizer, so scores from different train.py files are comparable. The
metric comes first, fenced; below it, how the caches are built (the documents come from corpora.py).
It imports nothing from the rest of the project but corpora.py, because both travel to GPU nodes.

    python -m train.prepare --corpus austen --vocab-size 2048
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train import corpora
from train import tokenizer as bpe
from train.tokenizer import token_bytes_of

DEFAULT_CACHE = Path(os.environ.get("ARENA_CACHE", "~/.cache/autoresearch-arena")).expanduser()

# Bump when the split, the documents or the tokenizer recipe change: old caches then stop matching.
RECIPE_VERSION = 1
EOT = bpe.EOT
VAL_FRACTION = 0.25  # of the corpus bytes, whole documents chosen by a hash of their names; ~300k tokens for austen
NAMED_CORPORA = corpora.NAMED_CORPORA


# ==============================================================================================
# THE FIXED METRIC: val_bpb and the causality checks that guard it. The trusted harness calls
# evaluate_bpb with the trained model as a pure tensor program (train/graph.py), which it evaluates
# itself: the model is data here, and no code of the candidate runs in this process.

# Log-probs at or before a position may move by this much (nats) when only later tokens change. An
# honest program moves them by ~1e-6 on a CPU (measured by benchmarks/causality.py: 9.5e-7 on tiny,
# 1.9e-6 on cpu, where a prefix run's shorter rows change how a kernel blocks its sums); the room
# is for floating-point reassociation where a kernel is chosen by shape (GPUs). A model kept just under it gains at most this many nats per token
# (about 4e-4 bits per byte at 3.3 bytes a token); benchmarks/causality.py measures it.
CAUSAL_TOLERANCE = 1e-3
# Each row is also scored cut short, at one of PREFIX_LENGTHS_PER_BATCH secret lengths a batch, drawn
# from PREFIX_LENGTHS secret lengths an evaluation: the scorer bounds the program's cost at every
# length it will run (a meta pass each, ~20 ms for the cpu preset's model), so the pool keeps those
# few; the seams below are what checks every position of every row.
PREFIX_LENGTHS = 4
PREFIX_LENGTHS_PER_BATCH = 2
COMPARED_BEFORE_CUT = 16  # positions compared up to each cut: a peek up to this far ahead moves one of them
# Seam probes a row, each at its own secret cut. The prefix-only runs share their few lengths across
# a batch, so they check few distinct positions: with one seam a row, a model that peeks at one fixed
# position escaped most evaluations (the cpu preset: 12%, for 2.5 seed SDs). With two, every row
# has two independent checks at any position, as the threat model counts them.
SEAMS_PER_ROW = 2


class NotCausal(ValueError):
    """Log-probs at some position moved when only later tokens changed."""


class NonFinite(ValueError):
    """The model's logits hold a NaN or an infinity."""


def evaluate_bpb(model, spec: "DataSpec", eval_tokens: int, seq_len: int, batch_rows: int, device,
                 check_causal: bool = True, rng: np.random.Generator | None = None, check_lengths=None) -> dict:
    """Bits per UTF-8 byte of the first `eval_tokens` validation targets.

    Windows of seq_len+1 tokens tile the validation stream from its start without overlap; each row
    gives seq_len targets, and each is a distinct window (no row is a copy padding a batch). val_bpb
    = summed cross-entropy (nats) / (ln 2 * UTF-8 bytes of those targets). Targets that are the
    end-of-document token have no bytes and count in neither sum, so the figure does not depend on
    the tokenizer.

    `model` maps token ids [1, T] to logits [1, T, V] (V >= the vocab) and is evaluated under
    torch.vmap over rows: each row is its own input, so nothing can flow from one row to another,
    whatever the program does. The geometry (seq_len, rows, batches) is the objective's, never the
    candidate's.

    Causality, exact for a pure function: every row is also scored (a) with everything after a
    secret position c replaced by validation text from a secret elsewhere (SEAMS_PER_ROW times, each
    at its own c), and (b) cut short after a
    secret position (a prefix-only run, one of a few secret lengths per batch); log-probs at
    positions <= c must not move. (b) leaves nothing after c to read, so it is the causal answer
    itself. Cuts fall anywhere from the first to the second-to-last position (the last position has
    nothing after it in its row); the positions are secret, and a pure function keeps no memory
    between calls, so a model cannot be non-causal only where nobody looks, except by chance.

    Every cut is drawn before the first row is evaluated, and `check_lengths(lengths)` (if given)
    sees every sequence length the model will be called at first: the scorer bounds the program's
    cost at each of them before computing anything real.
    """
    for name, value in (("eval_tokens", eval_tokens), ("seq_len", seq_len), ("batch_rows", batch_rows)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a row needs a position to cut after), got {seq_len}")
    windows = -(-eval_tokens // seq_len)
    val = spec.val_tokens()
    if windows * (seq_len + 1) > val.size:
        raise ValueError(
            f"validation split of {spec.corpus} has {val.size} tokens: too few for {eval_tokens} eval tokens "
            f"at seq_len {seq_len} (needs {windows * (seq_len + 1)})"
        )
    data = np.asarray(val[: windows * (seq_len + 1)], dtype=np.int64).reshape(windows, seq_len + 1)
    counted = np.ones((windows, seq_len), dtype=bool)
    counted.reshape(-1)[eval_tokens:] = False  # the last window may hold more targets than asked for
    token_bytes = torch.as_tensor(spec.token_bytes().astype(np.int64), device=device)
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    starts = range(0, windows, batch_rows)
    pool = _prefix_lengths(seq_len, PREFIX_LENGTHS, rng)
    plans = [_probe_plan(min(batch_rows, windows - start), seq_len, val.size, rng, pool) if check_causal else None
             for start in starts]
    seams = [[plan[:2]] + [_probe_plan(len(plan[0]), seq_len, val.size, rng, pool)[:2]
                           for _ in range(SEAMS_PER_ROW - 1)]
             if plan else None for plan in plans]
    if check_lengths is not None:
        check_lengths(sorted({seq_len} | {length for plan in plans if plan for length, _ in plan[2]}))
    torch._C._functorch._set_vmap_fallback_warning_enabled(False)  # an op without a batch rule loops over rows
    rows_of = torch.vmap(model)

    def logits_of(inputs: torch.Tensor) -> torch.Tensor:
        logits = rows_of(inputs[:, None, :])
        if logits.dim() != 4 or tuple(logits.shape[:3]) != (len(inputs), 1, inputs.shape[1]) \
                or not spec.vocab_size <= logits.shape[-1] or not logits.is_floating_point():
            raise ValueError(f"the model must return float logits [1, T, V >= {spec.vocab_size}] for ids [1, T], "
                             f"got {list(logits.shape[1:])} for [1, {inputs.shape[1]}]")
        return logits[:, 0]


    total_nats, total_bytes, checks = 0.0, 0, 0
    with torch.no_grad():
        for start, plan, seam in zip(starts, plans, seams):
            batch = torch.as_tensor(data[start:start + batch_rows], device=device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            rows = len(batch)
            if plan:
                groups = plan[2]
                both = logits_of(torch.cat([inputs, *(_seam_probes(inputs, val, cuts, offsets) for cuts, offsets in seam)]))
                real = torch.log_softmax(both[:rows].to(torch.float32), dim=-1)
                for k, (cuts, _) in enumerate(seam, 1):
                    _check_causal(real, both[k * rows:(k + 1) * rows], cuts)
                    checks += rows
                for length, members in groups:
                    _check_causal(real, logits_of(inputs[members, :length]), np.full(len(members), length - 1), members)
                    checks += len(members)
            else:
                real = torch.log_softmax(logits_of(inputs).to(torch.float32), dim=-1)
            nats = -torch.gather(real, -1, targets.unsqueeze(-1)).squeeze(-1)
            mask = torch.as_tensor(counted[start:start + rows], device=device)
            nbytes = torch.where(mask, token_bytes[targets], 0)
            total_nats += float(torch.where(nbytes > 0, nats, 0.0).sum())
            total_bytes += int(nbytes.sum())
            if not math.isfinite(total_nats):  # a NaN or +inf logit, or an -inf one on a target
                raise NonFinite("the trained model outputs non-finite logits")
    return {
        "val_bpb": total_nats / (math.log(2) * total_bytes),
        "nats": total_nats,
        "bytes": total_bytes,
        "tokens": eval_tokens,
        "rows": windows,
        "causality_checks": checks,
    }


def _prefix_lengths(seq_len: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct secret prefix lengths in 2..seq_len-1 (none when a row is too short)."""
    if seq_len < 3:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(np.arange(2, seq_len), size=min(count, seq_len - 2), replace=False)


def _probe_plan(rows: int, seq_len: int, val_size: int, rng: np.random.Generator, pool: np.ndarray | None = None):
    """One batch's secret checks: each row's seam cut and where its foreign continuation starts,
    and the batch's rows split among a few prefix lengths (2..seq_len-1, drawn from `pool` when
    given) as (length, row indices)."""
    cuts = rng.integers(0, seq_len - 1, size=rows)  # at least one token of every row changes
    offsets = rng.integers(0, val_size - seq_len, size=rows)
    groups = []
    if seq_len >= 3:
        pool = _prefix_lengths(seq_len, PREFIX_LENGTHS_PER_BATCH, rng) if pool is None else pool
        lengths = rng.choice(pool, size=min(PREFIX_LENGTHS_PER_BATCH, len(pool)), replace=False)
        which = rng.integers(0, len(lengths), size=rows)
        groups = [(int(length), np.flatnonzero(which == i)) for i, length in enumerate(lengths) if (which == i).any()]
    return cuts, offsets, groups


def _seam_probes(inputs: torch.Tensor, val: np.ndarray, cuts: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    """`inputs` with row r continued after position cuts[r] by validation text from offsets[r]."""
    probe = inputs.clone()
    length = inputs.shape[1]
    for r in range(len(inputs)):
        tail = np.asarray(val[offsets[r]: offsets[r] + length - 1 - cuts[r]], dtype=np.int64)
        probe[r, cuts[r] + 1:] = torch.as_tensor(tail, device=inputs.device)
    return probe


def _check_causal(reference: torch.Tensor, probe_logits: torch.Tensor, cuts: np.ndarray,
                  members: np.ndarray | None = None) -> None:
    """The probe's log-probs at the last COMPARED_BEFORE_CUT positions up to each row's cut must
    agree with the real row's (`reference`, log-probs of the batch; the probe's rows are its rows
    `members`, all of them by default); only those positions are computed."""
    window = np.maximum(cuts[:, None] - np.arange(COMPARED_BEFORE_CUT)[None, ::-1], 0)  # [rows, W], clamped at 0
    rows = np.arange(len(cuts)) if members is None else np.asarray(members)

    def pick(logits: torch.Tensor, row: np.ndarray) -> torch.Tensor:  # [rows, W, V]: the windows' positions
        flat = torch.as_tensor((row[:, None] * logits.shape[1] + window).reshape(-1), device=logits.device)
        return logits.reshape(-1, logits.shape[-1]).index_select(0, flat).view(*window.shape, logits.shape[-1])

    probe = torch.log_softmax(pick(probe_logits, np.arange(len(cuts))).to(torch.float32), dim=-1)
    real = pick(reference, rows)
    difference = torch.where(probe == real, 0.0, probe - real)  # -inf == -inf: no move
    moved = float(difference.abs().max())
    if math.isnan(moved):
        raise NonFinite("the trained model outputs non-finite logits")
    if not moved <= CAUSAL_TOLERANCE:
        raise NotCausal(f"the model is not causal: log-probs at or before a position moved by {moved:.3g} nats "
                        "when only later tokens changed (or were cut off)")

# END OF THE FIXED METRIC
# ==============================================================================================


@dataclass(frozen=True)
class DataSpec:
    """Everything a trial needs to find its data; all paths absolute."""

    corpus: str
    vocab_size: int
    dir: Path
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    token_bytes_path: Path
    eot_id: int = 0

    def train_tokens(self) -> np.ndarray:
        return np.load(self.train_path, mmap_mode="r")

    def val_tokens(self) -> np.ndarray:
        return np.load(self.val_path, mmap_mode="r")

    def token_bytes(self) -> np.ndarray:
        return np.load(self.token_bytes_path)

    def meta(self) -> dict:
        return json.loads((self.dir / "meta.json").read_text())


# ----------------------------------------------------------------------------------------------
# prepare(): cache lookup, then (once) fetch + split + tokenizer + token streams


def prepare(corpus: str = "austen", vocab_size: int = 2048, cache_dir: str | Path | None = None) -> DataSpec:
    """Return the data of `corpus` at `vocab_size`, building it on first use.

    A cache hit only checks that files exist, so a trial's data work stays far under a second. The
    build runs under a file lock and lands by renaming a finished folder into place, so two trials
    starting at once never see half-written files.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 257 <= vocab_size <= 1 << 24:
        raise ValueError(f"vocab_size must be an int in [257, 2^24] (256 bytes + {EOT}), got {vocab_size!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE
    label, digest = _corpus_identity(corpus)
    spec = _spec(corpus, vocab_size, cache / "data" / f"{label}-{digest}-v{vocab_size}")
    if _complete(spec):
        return spec
    spec.dir.parent.mkdir(parents=True, exist_ok=True)
    with corpora.locked(spec.dir.with_name(spec.dir.name + ".lock")):
        if not _complete(spec):
            _build(spec, cache / "downloads")
    return spec


def _spec(corpus: str, vocab_size: int, dir: Path) -> DataSpec:
    dir = dir.resolve()
    return DataSpec(
        corpus=corpus,
        vocab_size=vocab_size,
        dir=dir,
        tokenizer_path=dir / "tokenizer.json",
        train_path=dir / "train.npy",
        val_path=dir / "val.npy",
        token_bytes_path=dir / "token_bytes.npy",
    )


def _complete(spec: DataSpec) -> bool:
    # meta.json is written last inside the build folder, and the folder appears by one rename.
    return (spec.dir / "meta.json").is_file()


def _corpus_identity(corpus: str) -> tuple[str, str]:
    """(readable label, short digest) naming the cache folder: corpora and recipes never collide."""
    if corpus in NAMED_CORPORA:
        source = f"climbmix-{corpora.CLIMBMIX_TRAIN_SHARDS}-shards" if corpus == "climbmix" else corpus
        label = corpus
    else:
        folder = Path(corpus).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"unknown corpus {corpus!r}: use one of {', '.join(NAMED_CORPORA)} or a folder of .txt files"
            )
        files = corpora.text_files(folder)
        content = hashlib.blake2b(digest_size=16)
        for path in files:
            content.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        source = f"folder:{content.hexdigest()}"
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.resolve().name) or "folder"
    recipe = f"{source}|recipe{RECIPE_VERSION}|val{VAL_FRACTION}"
    digest = hashlib.blake2b(recipe.encode(), digest_size=6).hexdigest()
    return label, digest


def _build(spec: DataSpec, downloads: Path) -> None:
    started = time.time()
    train_docs, val_docs, source = _load_documents(spec.corpus, downloads)
    for leftover in spec.dir.parent.glob(f"{spec.dir.name}.tmp-*"):  # from a killed build; we hold the lock
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = spec.dir.with_name(f"{spec.dir.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        tokenizer = bpe.train_tokenizer([text for _, text in train_docs], spec.vocab_size)
        tokenizer.save(str(tmp / spec.tokenizer_path.name))
        dtype = np.uint16 if spec.vocab_size <= 1 << 16 else np.uint32
        train = bpe.token_stream(tokenizer, train_docs, dtype)
        val = bpe.token_stream(tokenizer, val_docs, dtype)
        np.save(tmp / spec.train_path.name, train)
        np.save(tmp / spec.val_path.name, val)
        token_bytes = bpe.token_byte_lengths(tokenizer, spec.vocab_size)
        np.save(tmp / spec.token_bytes_path.name, token_bytes)
        meta = {
            "corpus": spec.corpus,
            "source": source,
            "vocab_size": spec.vocab_size,
            "tokenizer_vocab": tokenizer.get_vocab_size(),
            "recipe_version": RECIPE_VERSION,
            "train_docs": len(train_docs),
            "val_docs": len(val_docs),
            "val_doc_names": [name for name, _ in val_docs][:1000],
            "train_bytes": sum(len(t.encode()) for _, t in train_docs),
            "val_bytes": sum(len(t.encode()) for _, t in val_docs),
            "train_tokens": int(train.size),
            "val_tokens": int(val.size),
            "build_seconds": round(time.time() - started, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(spec.dir, ignore_errors=True)  # builds land complete: anything here is foreign
        os.replace(tmp, spec.dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Documents and the split


def _load_documents(corpus: str, downloads: Path) -> tuple[list, list, str]:
    """(train docs, val docs, source description); a doc is (name, text)."""
    if corpus == "climbmix":  # its validation shard is pinned upstream
        return corpora.climbmix_documents(downloads / "climbmix")
    docs, source = corpora.documents(corpus, downloads)
    train, val = split_documents(docs)
    return train, val, source


def split_documents(docs: list[tuple[str, str]], val_fraction: float = VAL_FRACTION) -> tuple[list, list]:
    """Whole documents go to validation in the order of a hash of their names until they hold
    `val_fraction` of the bytes: deterministic, independent of file order, never splitting a document."""
    names = [name for name, _ in docs]
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split into train and validation, got {len(docs)}")
    total = sum(len(text.encode()) for _, text in docs)
    ranked = sorted(docs, key=lambda doc: hashlib.blake2b(doc[0].encode(), digest_size=8).digest())
    val_names, val_bytes = set(), 0
    for name, text in ranked[:-1]:  # the last one always stays in train
        if val_bytes >= val_fraction * total:
            break
        val_names.add(name)
        val_bytes += len(text.encode())
    train = [doc for doc in docs if doc[0] not in val_names]
    val = [doc for doc in docs if doc[0] in val_names]
    return train, val


def unigram_bpb(spec: DataSpec, level: str = "token") -> float:
    """val_bpb of a unigram model fit on the train split (add-one smoothing): the score a model that
    learned only symbol frequencies gets, at the token level or the byte level."""
    train, val, token_bytes = spec.train_tokens(), spec.val_tokens(), spec.token_bytes()
    train_counts = np.bincount(train, minlength=spec.vocab_size).astype(np.float64)
    val_counts = np.bincount(val, minlength=spec.vocab_size).astype(np.float64)
    real = token_bytes > 0
    if level == "token":
        logp = np.log((train_counts + 1) / (train_counts[real] + 1).sum())
        nats = -(val_counts * logp)[real].sum()
        return float(nats / (math.log(2) * (val_counts * token_bytes).sum()))
    if level == "byte":
        histogram = _token_byte_histogram(spec)
        train_bytes = train_counts @ histogram + 1
        val_bytes = val_counts @ histogram
        logp = np.log(train_bytes / train_bytes.sum())
        return float(-(val_bytes * logp).sum() / (math.log(2) * val_bytes.sum()))
    raise ValueError(f"level must be 'token' or 'byte', got {level!r}")


def _token_byte_histogram(spec: DataSpec) -> np.ndarray:
    histogram = np.zeros((spec.vocab_size, 256))
    for idx, raw in enumerate(token_bytes_of(spec, range(spec.vocab_size))):
        for byte in raw:
            histogram[idx, byte] += 1
    return histogram


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="austen", help="austen | shakespeare | climbmix | a folder of .txt files")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--cache-dir", default=None, help=f"default $ARENA_CACHE or {DEFAULT_CACHE}")
    parser.add_argument("--digests", action="store_true", help="end with a JSON line of the token caches' digests")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        spec = prepare(args.corpus, args.vocab_size, args.cache_dir)
    except (ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    seconds = time.time() - started
    meta = spec.meta()
    print(
        f"{spec.corpus} vocab {spec.vocab_size}: {meta['train_docs']}+{meta['val_docs']} docs (train+val), "
        f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
        f"{(meta['train_bytes'] + meta['val_bytes']) / (meta['train_tokens'] + meta['val_tokens']):.2f} bytes/token, "
        f"unigram val_bpb {unigram_bpb(spec):.3f} (token) {unigram_bpb(spec, 'byte'):.3f} (byte), "
        f"{seconds:.2f} s -> {spec.dir}"
    )
    if args.digests:
        print(json.dumps(cache_digests(spec)))


def cache_digests(spec: DataSpec) -> dict[str, str]:
    """What the trusted harness checks the caches against before it uses them."""
    from train.integrity import file_digest

    return {"train": file_digest(spec.train_path), "val": file_digest(spec.val_path),
            "token_bytes": file_digest(spec.token_bytes_path)}


if __name__ == "__main__":
    main()
