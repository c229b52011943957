"""From a resolved Hydra config to a finished study.

Everything that can be checked is checked here, before a single trial starts, so bad input costs
one clear line instead of compute: the preset's knobs against train.py, the space, the searcher
(an agent without an API key), the launcher (a partition that does not exist), the tracking URI.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from study.core import PROJECT_ROOT, Launcher, LauncherError, SearchContext, Searcher
from study import storage
from study.journal import JournalDamaged, JournalState
from study.lock import LOCK_FILE, StudyLock, StudyLocked
from study.recovery import FolderRefused, reconcile
from study.announce import UnequalArms, banner, check_trial_budget
from study.baseline import failed_baseline, failure_line
from study.findings import Findings, Floor, learn
from study.leaderboard import leaderboard_text, print_leaderboard
from study.loop import StopRules, StudyLoop
from study.observers import Observers, StopKind, StudyEnd, StudyObserver
from study.rungs import Rung, check_rung_kinds, parse_rungs
from study.space import validate_space
from train import sandbox
from train.contract import BUDGET_KINDS, DEFAULT_SANDBOX, EVAL_LIMIT_KEYS, TRAIN_FILE
from train.knobs import KnobError, read_knobs, write_knobs

log = logging.getLogger("arena")

HARD_LIMIT_ALLOWANCE_S = 60.0  # start-up and the final evaluation, on top of a derived hard limit


class ConfigError(ValueError):
    """Bad input, reported as one line before any compute is spent."""


class BaselineFailed(ConfigError):
    """The baseline itself cannot score (study/baseline.py): the study stopped at its first failure."""


@dataclass
class StudyPlan:
    """Everything checked before anything is built: the resolved config and what it means."""

    cfg: DictConfig
    conf: dict
    objective: dict
    baseline: str
    space: dict
    study_dir: Path
    rules: StopRules
    header: dict
    rungs: list[Rung] | None
    journal: JournalState  # what the study folder already holds (empty for a new study)


@dataclass
class BuiltStudy:
    """The parts a study runs with, set up and checked against their backends."""

    searcher: Searcher
    launcher: Launcher
    ctx: SearchContext
    observers: list[StudyObserver]
    random_start: int | None
    experiment_id: str | None  # the MLflow experiment, for the leaderboard's link
    tracked: bool  # an MLflow mirror is among the observers
    view: str | None = None  # the MLflow runs-table view of this study's trials, ranked by val_bpb


def run_study(cfg: DictConfig, *, searcher: Searcher | None = None, launcher: Launcher | None = None):
    """Run (or resume) the study `cfg` describes: validate, build, run, finalise. `searcher`/`launcher`
    may be passed in already built (tests use this to inject a fake Anthropic transport); otherwise
    Hydra instantiates them. The study folder is made and locked before anything reads it (what the
    journal and the trial folders say decides what runs), and stays locked to this call to the end."""
    study_dir = Path(cfg.study.dir).resolve()
    sandbox.sweep()  # what harnesses killed outright left on this host: scratch mounts, folders, cgroups
    with StudyLock(study_dir) as lock:
        with _owned(study_dir, _tracking_uri(cfg), lock), _storage_faults(study_dir):
            plan = validate(cfg)
            built = build(plan, searcher, launcher)
        loop = StudyLoop(searcher=built.searcher, launcher=built.launcher, ctx=built.ctx, objective=plan.objective,
                         study_dir=plan.study_dir, seed=int(plan.conf["seed"]), rules=plan.rules,
                         observers=built.observers)
        started = time.time()
        failed = True  # until the loop returns: a study that died of an exception is FAILED in MLflow
        try:
            with _storage_faults(plan.study_dir):  # the journal's header, the replay: before the loop's own guard
                state = loop.run(plan.header, setup_searcher=False)
            failed = False
        except KeyboardInterrupt:  # before the loop took SIGINT over (replaying the journal): KILLED
            loop.state.stop, loop.state.stop_reason = StopKind.INTERRUPTED, "interrupted (Ctrl-C) while starting"
            failed = False
            raise
        finally:
            findings = finalise(plan, built, loop, started, failed)
        if state.stop is StopKind.BASELINE_FAILED:
            raise BaselineFailed(state.stop_reason)
        print_leaderboard(state, plan.conf, plan.study_dir, built.tracked, built.launcher.simulated_time,
                          baseline_knobs=built.ctx.baseline_knobs, experiment_id=built.experiment_id,
                          view=built.view, findings=findings.lines)
        return state


def validate(cfg: DictConfig) -> StudyPlan:
    """Every check that needs nothing built: one ConfigError line for bad input."""
    conf = OmegaConf.to_container(cfg, resolve=True)
    objective = check_objective(conf["objective"])
    baseline = baseline_source(conf, objective)
    space = check_space(conf.get("space") or {}, baseline)
    study_dir = Path(conf["study"]["dir"]).resolve()
    try:
        # StopRules holds the defaults; a setting the config leaves out takes them
        rules = StopRules(**{f.name: conf["study"][f.name] for f in fields(StopRules) if f.name in conf["study"]})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    header = study_header(conf, objective, space)
    check_tracking(conf)
    rungs = check_rungs(conf["study"])
    if rungs:
        header["searcher"] += "+rungs"
        header["rungs"] = {"rungs": conf["study"]["rungs"], "eta": conf["study"].get("eta", 3)}
    try:  # read under the study lock (run_study): no other copy is writing it
        journal = reconcile(study_dir, JournalState.load(study_dir / "journal.jsonl"))
    except (JournalDamaged, FolderRefused) as e:
        raise ConfigError(str(e)) from None
    existing = journal.header
    if existing:
        check_same_study(existing, header, study_dir)
        failed = failed_baseline(journal.finished(), baseline)
        if failed:
            raise ConfigError(failure_line(*failed, study_dir))
        header["study_id"] = existing["study_id"]
        try:
            check_trial_budget(journal, rules.max_trials, study_dir)
        except UnequalArms as e:
            raise ConfigError(str(e)) from None
    return StudyPlan(cfg, conf, objective, baseline, space, study_dir, rules, header, rungs, journal)


def build(plan: StudyPlan, searcher: Searcher | None = None, launcher: Launcher | None = None) -> BuiltStudy:
    """Instantiate the searcher and launcher, prepare the data, set up what creates something (left
    behind by nothing if a check fails), and the observers."""
    from hydra.utils import get_class, instantiate

    cfg, conf, study_dir = plan.cfg, plan.conf, plan.study_dir
    searcher = searcher or _build(instantiate, cfg.searcher, "searcher")
    launcher = launcher or _build(instantiate, cfg.launcher, "launcher")
    random_start = searcher.random_start()
    if plan.rungs and not isinstance(searcher, get_class(cfg.study.rung_searcher._target_)):
        # the promotions wrap whichever searcher was built (or passed in unwrapped)
        searcher = instantiate(cfg.study.rung_searcher, _partial_=True)(searcher, plan.rungs,
                                                                        conf["study"].get("eta", 3))
    if not getattr(launcher, "prepares_data_remotely", False):
        prepare_data(plan.objective)  # a bad corpus is reported before anything is created
    ctx = SearchContext(
        baseline_source=plan.baseline, baseline_knobs=read_knobs(plan.baseline), space=plan.space,
        seed=int(conf["seed"]), study_dir=str(study_dir), objective=plan.objective)
    mirror = _set_up(conf, plan.header, plan.baseline, searcher, launcher, ctx, study_dir, plan.rungs)
    if mirror:
        mirror.tags = parent_tags(conf, plan.header, launcher, launcher.slots())

    (study_dir / "baseline_train.py").write_text(plan.baseline)
    (study_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    banner(conf, plan.objective, plan.journal, len(launcher.slots()), sys.stdout, random_start)
    observers: list[StudyObserver] = [mirror] if mirror else []
    if conf.get("progress", True):
        from analysis.noise import DEFAULT_STORE, display_note
        from study.progress import make_display

        noise = display_note(DEFAULT_STORE, str(conf["objective"].get("preset")), sorted(ctx.device_kinds))
        observers.append(make_display(conf["study"]["name"] + noise, launcher.simulated_time, ctx.baseline_knobs))
    return BuiltStudy(searcher, launcher, ctx, observers, random_start,
                      experiment_id=mirror.experiment_id if mirror else None, tracked=mirror is not None,
                      view=mirror.view_key if mirror else None)


def finalise(plan: StudyPlan, built: BuiltStudy, loop: StudyLoop, started: float, failed: bool) -> Findings:
    """However the loop ended: close the launcher and the searcher, say what the study learned,
    write the leaderboard, and tell the observers the study is over (the mirror ends the parent run,
    FAILED if it died of an error or its baseline could not score). A Ctrl-C while this closes
    things is acted on once the parent run has ended; one while MLflow catches up ends the parent at
    once (KILLED). A leaderboard the study folder refuses is the same storage fault, line and exit
    code as mid-study."""
    conf, study_dir, state = plan.conf, plan.study_dir, loop.state
    with _sigint_deferred() as interrupted:
        built.launcher.close(cancel_running=conf["study"].get("cancel_on_exit", True))
        sandbox.sweep()  # the trials are over: what a harness killed outright left goes with the study
        searcher_summary = _safe_summary(built.searcher)
        findings = Findings() if failed else _safe_findings(plan, built, loop)
        built.searcher.close()
        board = study_dir / "leaderboard.txt"
        board_text = "\n".join([leaderboard_text(state, conf, built.ctx.baseline_knobs), *findings.lines]) + "\n"
        board_fault = None
        try:
            board.write_text(board_text)
        except OSError as e:
            board_fault = storage.fault(e, study_dir) or f"cannot write {board}: {e}"
        end = StudyEnd(stop=state.stop, reason=state.stop_reason or "",
                       failed=failed or board_fault is not None or state.stop is StopKind.BASELINE_FAILED,
                       metrics=end_metrics(loop, searcher_summary, started),
                       tags={"stop_reason": state.stop_reason or "", "stop_kind": str(state.stop or ""),
                             **{k: v for k, v in searcher_summary.items() if isinstance(v, str)}, **findings.tags,
                             **{k: f"{v:.6g}" for k, v in findings.metrics.items()}},  # tags: no single-bar charts
                       files=[study_dir / "best_train.py", board, *([findings.figure] if findings.figure else [])],
                       artifact_dirs=[study_dir / "agent"], description=f"```\n{board_text}```")
    try:
        Observers(built.observers).on_end(state, end)
    except KeyboardInterrupt:
        if failed:
            return findings  # the error already on its way is what the user must read
        raise Interrupted("interrupted while MLflow caught up; nothing was lost: the journal has every trial and "
                          "the parent run is ended (KILLED); re-run the same command to mirror the rest") from None
    if failed:
        return findings
    if board_fault:
        raise storage.StudyStorageError(f"{board_fault}; the journal has every trial, but {board.name} "
                                        "could not be written")
    if interrupted():
        raise Interrupted("interrupted while the study was ending; nothing was lost: the journal has every trial")
    return findings


def _safe_findings(plan: StudyPlan, built: BuiltStudy, loop: StudyLoop) -> Findings:
    """What the study learned (study/findings.py); a failure here costs only these lines."""
    state = loop.state
    try:
        from analysis.noise import DEFAULT_STORE, floor_for

        preset = str(plan.conf["objective"].get("preset"))
        sigma, note = floor_for(DEFAULT_STORE, preset, sorted(built.ctx.device_kinds))
        return learn(state.history, state.best, baseline_source=plan.baseline, baseline_knobs=built.ctx.baseline_knobs,
                     floor=Floor(sigma, note), preset=preset, optuna_study=_optuna_study(built.searcher),
                     study_dir=plan.study_dir, clock=state.clock, max_trials=plan.rules.max_trials,
                     random_start=built.random_start, title=f"study {plan.conf['study']['name']}: running best")
    except Exception as e:  # noqa: BLE001 - the leaderboard and MLflow must still be written
        log.warning("could not say what the study learned: %s: %s", type(e).__name__, e)
        return Findings()


def _optuna_study(searcher: Searcher):
    """The Optuna study an Optuna searcher keeps (also inside the rungs wrapper), else None."""
    import optuna

    for candidate in (searcher, getattr(searcher, "inner", None)):
        study = getattr(candidate, "study", None)
        if isinstance(study, optuna.Study):
            return study
    return None


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C the loop did not handle itself; its text is the one line run.py prints."""


@contextlib.contextmanager
def _sigint_deferred():
    """Count Ctrl-Cs instead of raising them inside; yields whether one came."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(1))
    try:
        yield lambda: bool(caught)
    finally:
        signal.signal(signal.SIGINT, previous)


def _set_up(conf: dict, header: dict, baseline: str, searcher: Searcher, launcher: Launcher, ctx: SearchContext,
            study_dir: Path, rungs: list[Rung] | None):
    """Everything that creates something (the searcher's storage, the MLflow store, the launcher's
    backend); returns the mirror, or None without MLflow."""
    try:
        searcher.setup(ctx)
    except (ValueError, RuntimeError) as e:  # the Searcher contract for bad settings; anything else is a bug
        raise ConfigError(f"searcher {header['searcher']}: {e}") from e

    mirror = None
    if conf["mlflow"].get("enabled", True):
        from study.mirror import Mirror, MirrorError

        try:
            mirror = Mirror(
                tracking_uri=conf["mlflow"]["tracking_uri"], experiment=conf["study"]["experiment"],
                study_id=header["study_id"], study_name=conf["study"]["name"], searcher=header["searcher"],
                tags={}, params=flatten(conf), baseline_source=baseline,
                flush_timeout_s=float(conf["mlflow"].get("flush_timeout_s", 60)))
            mirror.check()
        except MirrorError as e:
            raise ConfigError(str(e)) from None
    try:  # the last check, because for cloud launchers it is the first thing that costs money
        launcher.start()
    except LauncherError as e:
        raise ConfigError(f"launcher {conf['launcher'].get('name')}: {e}") from None
    ctx.device_kinds.update(device_kinds(launcher.slots()))
    try:
        check_rung_kinds(rungs or [], ctx.device_kinds)
    except ValueError as e:
        launcher.close()
        raise ConfigError(str(e)) from None
    return mirror


def _own(study_dir: Path, lock: StudyLock) -> None:
    """Make the study folder and lock it before anything reads it. A copy paused before this
    (Ctrl-Z) and resumed later reads the folder only once it owns it, so it never runs on what
    another copy decided meanwhile."""
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except StudyLocked as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        why = storage.describe(e, study_dir)
        if why:
            raise storage.StudyStorageError(why) from None
        raise ConfigError(f"cannot make or lock the study folder {study_dir}: {e}") from None


def _tracking_uri(cfg: DictConfig) -> str | None:
    return cfg.mlflow.tracking_uri if cfg.mlflow.get("enabled", True) else None


@contextlib.contextmanager
def _storage_faults(study_dir: Path):
    """A full or read-only study folder while the study starts is the same fault, with the same
    one line and exit code, as mid-study: not a traceback (the journal header, Optuna's database,
    config.yaml) and not a configuration error (a searcher that could not create its storage)."""
    try:
        yield
    except (storage.StudyStorageError, KeyboardInterrupt):
        raise
    except Exception as e:
        why = storage.fault(e, study_dir)
        if why is None:
            raise
        raise storage.StudyStorageError(why) from e


@contextlib.contextmanager
def _owned(study_dir: Path, tracking_uri: str | None, lock: StudyLock):
    """Own the study folder (`_own`) and prove it writable; then whatever fails while the study sets
    up leaves nothing behind: not the study folder, not a local MLflow database, when this run
    created them. Only the lock's holder cleans up: a copy started at the same instant as the owner
    saw no folder yet, then lost the race for the lock, and removing "its" folder would delete the
    owner's lock file (and with it the one-owner guarantee). And the folder is this run's only if it
    held nothing else once locked: a copy paused before its lock while another ran the study finds
    that study there."""
    had_dir = study_dir.exists()
    from study.mirror import holds_runs, local_database

    db = local_database(tracking_uri)
    had_db = db is None or db.exists()
    made = False
    try:
        _own(study_dir, lock)
        made = not had_dir and {p.name for p in study_dir.iterdir()} <= {LOCK_FILE}
        why = storage.problem(study_dir)
        if why:
            raise storage.StudyStorageError(why)
        yield
    except BaseException:
        if not lock.held:
            raise
        if made:
            shutil.rmtree(study_dir, ignore_errors=True)
            _remove_empty_parents(study_dir.parent)
        if not had_db and not holds_runs(db):  # another study may have made it meanwhile
            db.unlink(missing_ok=True)
        raise


def _remove_empty_parents(folder: Path) -> None:
    """`studies/` made for this study alone goes too."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _build(instantiate, node, what: str):
    try:
        return instantiate(node, _convert_="all")
    except Exception as e:  # noqa: BLE001 - Hydra wraps the real error; show its last line
        cause = e
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        raise ConfigError(f"{what} {node.get('name', '?')}: {cause}") from None


def check_objective(o: dict) -> dict:
    o = dict(o)
    if o.get("budget_kind") not in BUDGET_KINDS:
        raise ConfigError(f"objective.budget_kind must be one of {BUDGET_KINDS}, not {o.get('budget_kind')!r}")
    if o.get("hard_limit_s") is None and o.get("hard_limit_per_unit_s"):
        o["hard_limit_s"] = derived_hard_limit(o)
    for key in ("budget", "hard_limit_s"):
        value = o.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"objective.{key} must be a number > 0, not {value!r}")
    if o["budget_kind"] == "seconds" and o["hard_limit_s"] <= o["budget"]:
        raise ConfigError(f"objective.hard_limit_s ({o['hard_limit_s']}) must exceed a seconds budget ({o['budget']})")
    for key in ("eval_tokens", "eval_seq_len", "eval_batch_size"):  # the evaluation's geometry: the objective's
        value = o.get(key)
        if type(value) is not int or not 0 < value <= 1 << 30:
            raise ConfigError(f"objective.{key} must be a positive int, not {value!r}")
    if o["eval_seq_len"] < 2:
        raise ConfigError(f"objective.eval_seq_len must be at least 2 (a row needs a position to cut after), "
                          f"not {o['eval_seq_len']}")
    limits = o.get("eval_limits") or {}
    unknown = sorted(set(limits) - set(EVAL_LIMIT_KEYS)) if isinstance(limits, dict) else None
    if unknown is None or unknown or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                             for v in limits.values()):
        raise ConfigError(f"objective.eval_limits must map some of {', '.join(EVAL_LIMIT_KEYS)} to numbers > 0, "
                          f"not {limits!r}")
    o["cache_dir"] = str(Path(o["cache_dir"]).expanduser().resolve())
    try:  # every trial runs sandboxed at least this well, or the study does not start
        o["sandbox"] = o.get("sandbox") or DEFAULT_SANDBOX
        sandbox.check_level(o["sandbox"])
    except sandbox.SandboxUnavailable as e:
        raise ConfigError(f"objective.sandbox={o['sandbox']}: {e}") from None
    o.pop("knobs", None)
    return o


def derived_hard_limit(o: dict) -> float:
    """The kill time that follows the budget: a start-up and evaluation allowance plus a
    per-unit ceiling (seconds per step) a healthy trial stays under even on a crowded machine, so a
    bigger budget never runs into a limit set for a smaller one."""
    per_unit = o["hard_limit_per_unit_s"]
    if not isinstance(per_unit, (int, float)) or isinstance(per_unit, bool) or per_unit <= 0:
        raise ConfigError(f"objective.hard_limit_per_unit_s must be a number > 0, not {per_unit!r}")
    if not isinstance(o.get("budget"), (int, float)) or isinstance(o.get("budget"), bool):
        return o.get("budget")  # reported as a bad budget just below
    return round(HARD_LIMIT_ALLOWANCE_S + o["budget"] * per_unit, 1)


def baseline_source(conf: dict, objective: dict) -> str:
    path = Path(conf["study"].get("baseline") or PROJECT_ROOT / "train" / TRAIN_FILE)
    if not path.is_file():
        raise ConfigError(f"study.baseline {str(path)!r} is not a file")
    source = path.read_text()
    knobs = conf["objective"].get("knobs") or {}
    try:
        return write_knobs(source, knobs) if knobs else source
    except KnobError as e:
        raise ConfigError(f"objective.knobs: {e}") from None


def check_tracking(conf: dict) -> None:
    """An MLflow store that cannot take the study's records is named in one line here, before the
    data is prepared: a local database that cannot be written (MLflow itself retries it for
    minutes), a server that does not answer within seconds."""
    if not conf["mlflow"].get("enabled", True):
        return
    from study.mirror import local_store_problem, server_problem

    why = local_store_problem(conf["mlflow"]["tracking_uri"]) or server_problem(conf["mlflow"]["tracking_uri"])
    if why:
        raise ConfigError(f"MLflow tracking URI {conf['mlflow']['tracking_uri']!r} is not usable: {why}")


def check_rungs(study: dict) -> list[Rung] | None:
    """Successive-halving rungs (searchers/rungs.py), or None when the study runs every candidate
    on the whole budget."""
    if not study.get("rungs"):
        return None
    try:
        return parse_rungs(study["rungs"], study.get("eta", 3))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_space(space: dict, baseline: str) -> dict:
    if not space:  # an agent needs no space; a classical searcher says so itself
        return {}
    try:
        return validate_space(space, read_knobs(baseline))
    except ValueError as e:
        raise ConfigError(f"space: {e}") from None


def study_header(conf: dict, objective: dict, space: dict) -> dict:
    """What identifies a study: resuming with any of these changed would mix two experiments."""
    return {
        "study_id": f"{conf['study']['name']}-{uuid.uuid4().hex[:8]}",
        "name": conf["study"]["name"],
        "searcher": conf["searcher"].get("name", "?"),
        "launcher": conf["launcher"].get("name", "?"),
        "slots": conf["launcher"].get("slots"),
        "seed": conf["seed"],
        "objective": dict(objective),  # a copy: prepare_data() adds the caches' digests, which are no setting
        "space": space,
        "git_sha": git_sha(),
    }


def check_same_study(old: dict, new: dict, study_dir: Path) -> None:
    """The same name with other settings is another experiment: a 16-slot and a 1-slot run of one
    searcher and seed share the default name, and resuming one with the other would mix them."""
    def same(key):
        return json.dumps(old.get(key), sort_keys=True, default=str) == json.dumps(new.get(key), sort_keys=True,
                                                                                    default=str)

    differs = [k for k in ("searcher", "launcher", "slots", "seed", "objective", "space", "rungs")
               if k in old and not same(k)]
    if differs:
        shown = [f"{k} {old[k]!r} -> {new.get(k)!r}" if k not in ("objective", "space", "rungs") else k
                 for k in differs]
        raise ConfigError(f"{study_dir} holds a study with a different {', '.join(shown)}; "
                          "resume it with the same settings or choose another study.name")


def parent_tags(conf: dict, header: dict, launcher: Launcher, slots) -> dict[str, str]:
    return {
        "searcher": header["searcher"],
        "launcher": header["launcher"],
        "slots": str(len(slots)),
        "objective": str(conf["objective"].get("preset")),
        "seed": str(conf["seed"]),
        "git_sha": header["git_sha"],
        "time_mode": "simulated" if launcher.simulated_time else "real",
        "device_kinds": json.dumps(device_kinds(slots), sort_keys=True),
    }


def device_kinds(slots) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for s in slots:
        k = kinds.setdefault(s.device_kind, {"count": 0, "speed": s.speed})
        k["count"] += 1
    return kinds


def end_metrics(loop: StudyLoop, searcher_summary: dict, started: float) -> dict[str, float]:
    history = loop.state.history
    metrics = {
        "n_trials": float(len(history)),
        "n_ok": float(sum(r.ok for _, r in history)),
        "wall_seconds": loop.study_time(),  # study time: idle gaps between sessions left out (study/clock.py)
        "idle_seconds": loop.state.clock.idle,
        "slot_seconds": float(sum((r.finished_at or 0) - (r.started_at or 0) for _, r in history)),
        "orchestrator_seconds": time.time() - started,
    }
    if loop.state.best:
        metrics["best_val_bpb_final"] = loop.state.best[1].val_bpb
    for k, v in searcher_summary.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics[k] = float(v)
    return metrics


def _safe_summary(searcher: Searcher) -> dict:
    try:
        return searcher.summary() or {}
    except Exception as e:  # noqa: BLE001
        log.warning("searcher.summary failed: %s", e)
        return {}


def prepare_data(objective: dict) -> None:
    """Build the corpus, tokenizer and token caches once, before N trials would race to, and record
    their digests in the objective: a cache rewritten during the study then fails its trials."""
    cmd = [sys.executable, "-m", "train.prepare", "--corpus", str(objective["corpus"]),
           "--vocab-size", str(objective["vocab_size"]), "--digests"]
    env = {**os.environ, "ARENA_CACHE": objective["cache_dir"],
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ConfigError(f"data preparation failed: {lines[-1] if lines else proc.returncode}")
    objective["data_digests"] = json.loads(proc.stdout.strip().splitlines()[-1])  # each harness checks its caches


def flatten(conf: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in conf.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
