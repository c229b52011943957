"""What makes a result trustworthy after the trusted harness wrote it: a signature the launcher
checks, an atomic write no squatter can block, and token caches that still hold what the study
prepared.

A result is signed with HMAC-SHA256 under the study's key (contract.RESULT_KEY_FILE in the study
folder, 0600, made when the study writes its first trial). The harness reads the key only after
every sandboxed process of the trial is gone, so no candidate ever has it in memory; the signature
covers the result, the trial's train.py and trial.json, so a result cannot be moved between
trials. Standard library only: launchers import it without torch.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path

from train.contract import RESULT_FILE, RESULT_KEY_FILE, SIGNATURE_FIELD, TRAIN_FILE, TRIAL_FILE, result_key_path


def ensure_study_key(study_dir) -> Path:
    """The study's result key, created once (0600, never rewritten)."""
    path = Path(study_dir) / RESULT_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    return path


def _key(trial_dir) -> bytes | None:
    try:
        return bytes.fromhex(result_key_path(trial_dir).read_text().strip())
    except (OSError, ValueError):
        return None


def _digest(key: bytes, trial_dir: Path, result: dict) -> str:
    body = json.dumps({k: v for k, v in result.items() if k != SIGNATURE_FIELD}, sort_keys=True, default=str)
    mac = hmac.new(key, body.encode(), hashlib.sha256)
    for name in (TRAIN_FILE, TRIAL_FILE):
        try:
            mac.update(b"\0" + (trial_dir / name).read_bytes())
        except OSError:
            mac.update(b"\0missing")
    return mac.hexdigest()


def write_signed_result(trial_dir, result: dict) -> dict:
    """Sign `result` (when the study has a key) and write it atomically under a fresh temp name."""
    trial_dir = Path(trial_dir)
    key = _key(trial_dir)
    result = {k: v for k, v in result.items() if k != SIGNATURE_FIELD}
    if key is not None:
        result[SIGNATURE_FIELD] = _digest(key, trial_dir, result)
    write_json_atomic(trial_dir / RESULT_FILE, result)
    return result


def verify_result(trial_dir, result: dict) -> str | None:
    """None if `result` came from the trusted harness of this trial, else why not. A trial whose
    study has no key (a trial folder run by hand) has nothing to check against."""
    trial_dir = Path(trial_dir)
    if not result_key_path(trial_dir).exists():
        return None
    key = _key(trial_dir)
    if key is None:
        return "the study's result key is unreadable"
    signature = result.get(SIGNATURE_FIELD)
    if not isinstance(signature, str) or not hmac.compare_digest(signature, _digest(key, trial_dir, result)):
        return f"{RESULT_FILE} is not signed by the trusted harness (forged or edited)"
    return None


def write_json_atomic(path: Path, data: dict) -> None:
    """mkstemp picks a name nobody squats on; os.replace lands it whole. A directory or file in the
    way of `path` itself is removed first (the trial folder is the harness's alone)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1)
        if path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
