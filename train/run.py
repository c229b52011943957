"""`run`: everything train.py's train(model, run) gets from the arena. Read this and train.py.

    run.device              torch.device to train on
    run.vocab_size          the tokenizer's vocabulary size
    run.eval_seq_len        the sequence length val_bpb is measured at (the objective's, fixed): the
                            model must take any length from 2 to this one
    run.batches(batch_size, seq_len)
                            an endless iterator of (inputs, targets) LongTensors [batch_size, seq_len]
                            on run.device: random windows of the train split, targets shifted by one.
                            The same sequence for the same seed and call order.
    run.step(loss) -> bool  count one optimizer step; True once the budget is spent: return then.
    run.progress            0..1 of the budget spent (seconds, steps, tokens or CPU seconds): the
                            clock for learning-rate schedules
    run.autocast()          bf16 autocast on a GPU, nothing on a CPU
    run.compile(model)      torch.compile on a GPU, the model itself on a CPU
    run.log(**values)       one `key=value ...` line in the trial's run.log

Every figure comes from the trusted harness, which serves the batches and keeps the clock: train()
runs in a sandbox that sees only its own scratch folder, so it can neither read the validation
split nor report its own step counts. After the budget is spent no more batches are served, and
train() must return within a few seconds.

Then the model leaves the sandbox as data: it is exported with torch.export (batch 1, any length
from 2 to run.eval_seq_len) and the trusted scorer evaluates that tensor program itself, each
validation row on its own. So forward must be exportable: tensor operations only (no .item(), no
Python branch on a tensor's values, no print, no file or random number), returning the logits
tensor and changing no state of the model. A model that does not export is `invalid`, with
torch.export's reason in the trial's error.
"""
from __future__ import annotations

import contextlib
import socket

import torch

from train import wire


class BudgetSpent(RuntimeError):
    """The harness refused a batch: the budget is spent, or train() drew far more than it stepped."""


class Run:
    def __init__(self, sock: socket.socket, device: str, vocab_size: int, seed: int, eval_seq_len: int):
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.seed = seed
        self.eval_seq_len = eval_seq_len
        self._sock = sock

    def _ask(self, header: dict, max_payload: int = 0) -> tuple[dict, bytearray]:
        wire.send(self._sock, header)
        reply, payload, _ = wire.recv(self._sock, max_payload)
        if "refused" in reply:
            raise BudgetSpent(reply["refused"])
        return reply, payload

    def batches(self, batch_size: int, seq_len: int):
        reply, _ = self._ask({"op": "batches", "batch_size": int(batch_size), "seq_len": int(seq_len)})
        stream, shape = reply["stream"], (int(batch_size), int(seq_len) + 1)
        while True:
            _, payload = self._ask({"op": "next", "stream": stream}, max_payload=8 * shape[0] * shape[1])
            chunk = torch.frombuffer(payload, dtype=torch.int64).view(shape)
            if self.device.type == "cuda":
                chunk = chunk.pin_memory().to(self.device, non_blocking=True)
            yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def step(self, loss) -> bool:
        reply, _ = self._ask({"op": "step", "loss": float(loss)})
        return bool(reply["done"])

    @property
    def progress(self) -> float:
        return float(self._ask({"op": "progress"})[0]["progress"])

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compile(self, model):
        return torch.compile(model) if self.device.type == "cuda" else model

    def log(self, **values) -> None:
        print(" ".join(f"{k}={v}" for k, v in values.items()), flush=True)
