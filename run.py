"""autoresearch-arena: python run.py searcher=tpe launcher=local  (see README.md)."""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from study.runner import ConfigError, run_study
    from study.storage import StudyStorageError
    from train.sandbox import harden_orchestrator

    harden_orchestrator()  # a trial of our uid may not read this process's environ (API keys) or ptrace it

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        state = run_study(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except StudyStorageError as e:  # the study's own disk failed: stopped, nothing blamed on a trial
        print(f"error: {e}; fix it and re-run the same command to resume", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt as e:  # Ctrl-C before the loop took over SIGINT, or after it (study.runner.Interrupted)
        print(str(e) or "interrupted while starting; nothing was lost: re-run the same command to resume",
              file=sys.stderr)
        sys.exit(130)
    return state.best[1].val_bpb if state.best else None


if __name__ == "__main__":
    main()
