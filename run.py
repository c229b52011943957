"""autoresearch-arena: python run.py searcher=tpe launcher=local  (see README.md)."""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from study.runner import ConfigError, run_study

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        state = run_study(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return state.best[1].val_bpb if state.best else None


if __name__ == "__main__":
    main()
