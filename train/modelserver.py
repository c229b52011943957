"""Inside the sandbox: the trained model answers exactly one batch, then this process is gone.

The trusted harness starts one of these per evaluation call (the real batches and the causality
probes alike, all the same shape), so a model cannot tell a probe from the evaluation by order or
count, and cannot remember anything from one call to the next. It loads the weights the harness
re-saved (weights_only), runs train.py's forward on the token batch it is sent, and hands the
logits back without pickle, in a memfd (on a GPU too, by default: torch's CUDA IPC keeps reference
counts in /dev/shm, which is private to each sandbox at the `namespaces` level; ARENA_CUDA_IPC=1
hands over a CUDA IPC handle instead, see scripts/gpu_check.py). The harness copies them into its
own memory before it reads them, and computes everything else itself.
"""
from __future__ import annotations

import base64
import contextlib
import mmap
import os
from pathlib import Path

from train import wire
from train.contract import TRAIN_FILE, WEIGHTS_FILE
from train.worker import build, load_train_module, set_threads


def server_main(sock, go: dict) -> None:
    import torch

    set_threads(torch, go.get("threads"))
    device = torch.device(go["device"])
    try:
        header, payload, _ = wire.recv(sock, max_payload=go["max_input_bytes"])
        # Only now, with the server before this one dead, does candidate code run here: imported
        # earlier (as a GPU server's fresh interpreter once did), a thread of train.py listened to
        # the server answering (POSIX locks on a file both may read) and learnt its batch, and so
        # which of the two answers was the causality probe.
        model = _model(go, device)
        idx = torch.frombuffer(payload, dtype=torch.int64).view(header["shape"]).to(device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            logits = model(idx)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"forward returned {type(logits).__name__}, not a tensor")
        logits = logits.detach().contiguous()
    except BaseException as e:
        wire.send(sock, {"failed": f"{type(e).__name__}: {e}"[:2000]})
        raise
    shape, dtype = list(logits.shape), str(logits.dtype).removeprefix("torch.")
    if device.type == "cuda" and go.get("cuda_ipc"):
        torch.cuda.synchronize()
        wire.send(sock, {"shape": shape, "dtype": dtype, "cuda": _cuda_handle(logits)})
        wire.recv(sock)  # the harness has copied them: only now may they be freed
        return
    logits = logits.to("cpu")
    fd = os.memfd_create("logits")
    os.ftruncate(fd, max(logits.numel() * logits.element_size(), 1))
    with mmap.mmap(fd, 0) as shared:
        torch.frombuffer(shared, dtype=logits.dtype, count=logits.numel()).copy_(logits.reshape(-1))
    wire.send(sock, {"shape": shape, "dtype": dtype}, fds=[fd])
    wire.recv(sock)


def _model(go: dict, device):
    import torch

    module = load_train_module(Path(go["code_dir"]) / TRAIN_FILE)
    model = build(module, go["vocab_size"], go["seed"], go["device"])
    model.load_state_dict(torch.load(Path(go["code_dir"]) / WEIGHTS_FILE, map_location=device, weights_only=True))
    return model.eval()


def _cuda_handle(logits) -> dict:
    """The IPC handle of the logits' storage, as plain data (what torch.multiprocessing pickles)."""
    (device, handle, size, offset, ref_handle, ref_offset, event_handle,
     event_sync) = logits.untyped_storage()._share_cuda_()
    b64 = lambda raw: base64.b64encode(raw).decode() if raw else None  # noqa: E731
    return {"device": device, "handle": b64(handle), "size": size, "offset": offset,
            "ref_handle": b64(ref_handle), "ref_offset": ref_offset, "event_handle": b64(event_handle),
            "event_sync": bool(event_sync), "storage_offset": logits.storage_offset()}

