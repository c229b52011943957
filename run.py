"""autoresearch-arena: python run.py searcher=tpe launcher=local  (see README.md)."""
from __future__ import annotations

import difflib
import logging
import os
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
    from study.observers import StopKind

    if state.stop is StopKind.INTERRUPTED:  # the summary says how to resume; a script (or a multirun) stops here
        sys.exit(130)
    return state.best[1].val_bpb if state.best else None


def config_error_line(e: BaseException) -> str:
    """One line for a mistake in the command line that Hydra would report as a block of 10-20 lines
    ending in a HYDRA_FULL_ERROR hint: an unknown group choice names the valid ones, an unknown
    setting the closest known one."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException) and e.options and "/" in (e.missing_cfg_file or ""):
        group, _, choice = e.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(choice, e.options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown {group} {choice!r}{hint}; choose one of: {', '.join(e.options)}"
    cause = e.__cause__
    full_key = getattr(cause, "full_key", None)
    if full_key and "not in struct" in str(cause):
        known = list(getattr(cause, "parent_node", None) or [])
        close = difflib.get_close_matches(str(getattr(cause, "key", "")), [str(k) for k in known], n=1)
        where = full_key.rpartition(".")[0]
        hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
        return f"unknown setting {full_key}{hint}; to add a setting of your own write +{full_key}=..."
    if isinstance(e, OverrideParseException):
        detail = [line for line in str(e).splitlines()[1:2] if not line.startswith("See ")]
        return f"cannot parse the override {e.override!r}" + (f": {detail[0]}" if detail else "")
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def cli() -> None:
    """Hydra, with its composition errors as one line and exit code 2. HYDRA_FULL_ERROR=1 (set by
    you) keeps Hydra's own report with its stack trace."""
    if os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its block; we print one line
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {config_error_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
