"""The trusted scorer: val_bpb of the trained weights without ever running candidate code here.

The weights are checked with torch's weights_only loader (a pickle payload is `invalid`), counted,
and saved again by this process, so the model servers load a clean file. Then one fresh sandboxed
model server per evaluation call (modelserver.py) runs train.py's forward on one batch and hands
the logits back; prepare.evaluate_bpb, the fixed metric, does everything else here: the
log-softmax, the gather, the byte-weighted sums and the one causality check, which compares each
real batch with a copy whose rows continue, after a secret position each, with other validation
text. All servers are started before this process reads a single validation token, so none of
them holds any in its memory.
"""
from __future__ import annotations

import base64
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train import prepare, sandbox, wire
from train.contract import WEIGHTS_FILE, TrialFailed
from train.processes import Confined, readable_paths

DTYPES = ("float32", "bfloat16", "float16")
MAX_VOCAB_FACTOR = 4  # logits may carry padding columns (a vocab rounded up), but not unbounded ones


def load_weights(path: Path, max_bytes: int) -> dict:
    """The worker's state_dict, loaded without executing anything it may hide. The file is the
    sandbox's: opened without following a link (a symlink would make this process read any file
    of the host as its own weights, or block on a FIFO), and only a regular file of at most
    `max_bytes` is read."""
    import io

    import torch

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TrialFailed("crash", "the worker said it finished but saved no weights") from None
    except OSError as e:
        raise TrialFailed("invalid", f"the weights file is not a regular file of the scratch ({e.strerror})") from None
    with os.fdopen(fd, "rb") as saved:
        info = os.fstat(saved.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            raise TrialFailed("invalid", f"the weights file is not a regular file of the scratch of at most {max_bytes} bytes")
        raw = io.BytesIO(saved.read(max_bytes + 1))
    try:
        weights = torch.load(raw, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the safe loader is the candidate's fault
        raise TrialFailed("invalid", f"the weights are not a plain state_dict (weights_only refused them: "
                                     f"{str(e).splitlines()[0][:300]})") from None
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise TrialFailed("invalid", "the weights are not a dict of named tensors")
    return weights


def count_params(weights: dict, vocab_size: int) -> tuple[int, int]:
    """(parameters, matmul parameters) recounted from the weights: tied tensors once; the matmul
    count leaves out the input embedding (a table lookup), taken as the first [vocab, d] table."""
    seen, total, matmul, embedding_skipped = set(), 0, 0, False
    for tensor in weights.values():
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


class ServerPool:
    """One fresh sandboxed model server per evaluation call, all started up front."""

    def __init__(self, count: int, *, code_dir: Path, weights: dict, level: str, base_env: dict, config: dict,
                 log_path: Path, fork: bool, timeout_s: float):
        import torch

        self.timeout_s, self.vocab_size = timeout_s, config["vocab_size"]
        torch.save(weights, code_dir / WEIGHTS_FILE)  # written here: whatever the worker's file held is gone
        os.chmod(code_dir / WEIGHTS_FILE, 0o644)
        devices = sandbox.gpu_devices() if config["device"] == "cuda" else ()
        self.servers, self.scratches, self.calls = [], [], 0
        try:
            for _ in range(count):
                self.scratches.append(sandbox.Scratch("server"))
                scratch = self.scratches[-1].path
                policy = sandbox.Policy(scratch=scratch, readable=readable_paths(code_dir),
                                        env=sandbox.allowed_env(scratch, base_env), devices=devices)
                self.servers.append(Confined("server", policy, level, log_path,
                                             {**config, "code_dir": str(code_dir)}, fork))
        except BaseException:
            self.close()
            raise

    def logits(self, inputs):
        """model(inputs) from a server that has never seen another batch; a copy this side owns."""
        import torch

        if self.calls >= len(self.servers):
            raise RuntimeError("more evaluation calls than model servers")
        server = self.servers[self.calls]
        self.calls += 1
        try:
            server.sock.settimeout(self.timeout_s)
            host = inputs.to("cpu").contiguous()
            wire.send(server.sock, {"shape": list(host.shape)}, memoryview(host.numpy()).cast("B"))
            header, _, fds = wire.recv(server.sock, max_fds=1)
            if "failed" in header:
                raise TrialFailed("crash", f"the model failed on an evaluation batch: {header['failed']}")
            shape, dtype = header.get("shape"), header.get("dtype")
            if (not isinstance(shape, list) or len(shape) != 3 or list(shape[:2]) != list(inputs.shape)
                    or not isinstance(shape[2], int) or not self.vocab_size <= shape[2] <= MAX_VOCAB_FACTOR * self.vocab_size
                    or dtype not in DTYPES):
                raise TrialFailed("invalid", f"model(idx {list(inputs.shape)}) must return logits "
                                             f"[B, T, V >= {self.vocab_size}] of {'/'.join(DTYPES)}, "
                                             f"got {shape} {dtype}")
            dtype = getattr(torch, dtype)
            copy = _from_cuda(header, shape, dtype) if "cuda" in header else _from_memfd(fds, shape, dtype)
            wire.send(server.sock, {"copied": True})
        except TimeoutError:
            raise TrialFailed("timeout", f"the model took over {self.timeout_s:.0f} s on one evaluation batch") from None
        except (wire.WireError, OSError) as e:
            raise TrialFailed("crash", f"a model server died on an evaluation batch ({e}); see run.log") from None
        finally:
            server.end()
        if not torch.isfinite(copy).all():
            raise TrialFailed("nan", "the trained model outputs non-finite logits")
        return copy.to(inputs.device)

    def close(self) -> None:
        """Every server's tree closed at once: each waits a moment for the kernel to empty its
        cgroup, and one after another that added seconds to a trial."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.servers))) as pool:
            list(pool.map(lambda server: server.close(), self.servers))
        for scratch in self.scratches:  # a server that never started still left its folder
            scratch.close()


def _from_memfd(fds: list[int], shape: list[int], dtype):
    """The logits read out of the server's memfd with pread into memory of ours. Never mapped: a
    server can shrink its memfd while this process reads it, and a mapped page past the new end
    is a SIGBUS that kills the trusted harness; a read just comes back short."""
    import torch

    if len(fds) != 1:
        raise TrialFailed("crash", "a model server sent its logits without their memory")
    fd = fds[0]
    try:
        need = shape[0] * shape[1] * shape[2] * torch.empty(0, dtype=dtype).element_size()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < need:
            raise TrialFailed("invalid", "a model server's logits are shorter than their shape says")
        copy = bytearray(need)
        view, got = memoryview(copy), 0
        while got < need:
            read = os.preadv(fd, [view[got:]], got)
            if read <= 0:
                raise TrialFailed("invalid", "a model server's logits are shorter than their shape says")
            got += read
        return torch.frombuffer(copy, dtype=dtype).view(shape)
    finally:
        os.close(fd)


def _from_cuda(header: dict, shape: list[int], dtype):
    """Open the server's CUDA IPC handle and copy the logits out (the GPU path; see scripts/gpu_check.py)."""
    import torch

    ipc = header["cuda"]
    raw = lambda text: base64.b64decode(text) if text else b""  # noqa: E731
    element = torch.empty(0, dtype=dtype).element_size()
    numel = shape[0] * shape[1] * shape[2]
    if ipc["size"] < (ipc["storage_offset"] + numel) * element:
        raise TrialFailed("invalid", "a model server's logits are shorter than their shape says")
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        ipc["device"], raw(ipc["handle"]), ipc["size"], ipc["offset"], raw(ipc["ref_handle"]), ipc["ref_offset"],
        raw(ipc["event_handle"]), ipc["event_sync"])
    view = torch.empty(0, dtype=dtype, device=f"cuda:{ipc['device']}").set_(
        storage, ipc["storage_offset"], shape)
    copy = view.clone()
    torch.cuda.synchronize()
    del view, storage
    return copy


def evaluate(pool: ServerPool, data: prepare.DataSpec, objective: dict, seq_len: int, device, log) -> dict:
    """val_bpb by the fixed metric, each model call a fresh server; integrity failures are statuses."""
    import torch

    t0 = time.time()
    try:
        scores = prepare.evaluate_bpb(pool.logits, data, objective["eval_tokens"], seq_len,
                                      objective["eval_batch_size"], torch.device(device))
    except prepare.NotCausal as e:
        raise TrialFailed("invalid", str(e)) from None
    except ValueError as e:
        raise TrialFailed("invalid", str(e)) from None
    seconds = time.time() - t0
    log(f"harness: eval of {scores['tokens']} tokens at seq_len {seq_len} in {seconds:.2f} s "
        f"({pool.calls} model servers, {pool.calls // 2} causality probes)")
    return {**scores, "eval_seconds": round(seconds, 3)}


def eval_calls(objective: dict, seq_len: int) -> int:
    """Model calls the metric makes: each batch and its causality probe."""
    windows = -(-objective["eval_tokens"] // seq_len)
    return 2 * -(-windows // objective["eval_batch_size"])
