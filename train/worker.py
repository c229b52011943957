"""Inside the sandbox: build train.py's model, train it with a `run` whose batches and clock come
from the trusted harness, then export it as a pure tensor program into the scratch folder
(train/export.py): the only form in which the model leaves. What this process says about itself is
never a figure: the harness counts steps, tokens and time, recounts the parameters from the exported
tensors, and takes only failures (crash, invalid, nan) from here, since claiming one can only lose a
trial.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from pathlib import Path

from train import wire
from train.contract import MODEL_FILE, TRAIN_FILE


class Invalid(Exception):
    """train.py does not keep its side of the contract."""


def worker_main(sock, go: dict) -> None:
    import torch

    from train.export import Unexportable, export_model
    from train.run import BudgetSpent, Run

    report = {"op": "finished"}
    try:
        set_threads(torch, go.get("threads"))
        module = load_train_module(Path(go["code_dir"]) / TRAIN_FILE)
        model = build(module, go["vocab_size"], go["seed"], go["device"])
        run = Run(sock, go["device"], go["vocab_size"], go["seed"], go["eval_seq_len"])
        wire.send(sock, {"op": "started"})
        module.train(model, run)  # its return value is ignored
        wire.send(sock, {"op": "exporting"})
        _clear_hooks()
        export_model(model, go["eval_seq_len"], Path(MODEL_FILE))
    except BaseException as e:  # noqa: BLE001 - every way train.py can end is a report
        text = traceback.format_exc()
        print(text, flush=True)
        status = "invalid" if isinstance(e, (Invalid, Unexportable, SyntaxError)) else "budget" \
            if isinstance(e, BudgetSpent) else "oom" if _looks_like_oom(e) else "crash"
        report = {"op": "failed", "status": status,
                  "error": str(e) if isinstance(e, (Invalid, Unexportable)) else text[-4000:]}
    wire.send(sock, report)
    os._exit(0)


def _clear_hooks() -> None:
    """Export traces thousands of Python calls: a profile or trace hook train.py left behind would
    stretch it past the hand-over limit (its own loss, but a loss no honest model should risk)."""
    import threading

    sys.setprofile(None)
    sys.settrace(None)
    threading.setprofile(None)
    threading.settrace(None)


def _looks_like_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "can't allocate memory")))


def load_train_module(path: Path):
    spec = importlib.util.spec_from_file_location("arena_trial_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("build_model", "train"):
        if not callable(getattr(module, name, None)):
            raise Invalid(f"train.py does not define {name}()")
    return module


def build(module, vocab_size: int, seed: int, device: str):
    """build_model under the trial's seed, on the device."""
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        model = module.build_model(vocab_size)
    if not isinstance(model, torch.nn.Module):
        raise Invalid(f"build_model() returned {type(model).__name__}, not a torch.nn.Module")
    return model.to(device)


def set_threads(torch, threads) -> None:
    """The launcher gives each slot its share of the cores; the harness passes it on."""
    if threads:
        torch.set_num_threads(int(threads))
