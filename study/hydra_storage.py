"""Hydra writes its own output folder (`hydra.run.dir`: the run's config and log) before the study
code runs, so a full or read-only disk there ended in Hydra's traceback and exit 1, not the one
line and exit 3 the same fault gets once the study runs. This callback (conf/config.yaml,
`hydra.callbacks`) checks that folder's filesystem first, the way study/storage.py checks the study's.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from study import storage


class OutputFolderCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(OmegaConf.select(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(OmegaConf.select(config, "hydra.sweep.dir"))


def _check(folder: str | None) -> None:
    if not folder:
        return
    existing = Path(folder).absolute()
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent  # probe where Hydra will create it, without creating it
    why = storage.problem(existing, what="Hydra output folder")
    if why:
        print(f"error: {why}; fix it and re-run the same command to resume", file=sys.stderr)
        sys.exit(3)
