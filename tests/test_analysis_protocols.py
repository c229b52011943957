"""The ablation protocols in conf/experiment/ compose into what they promise: which arms, how many
paired seeds, equal budgets, study names that keep arms apart (so the same command resumes each
study instead of mixing two)."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import ROOT


def protocol(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={name}", *overrides], return_hydra_config=True)


def test_searchers_protocol_sweeps_five_searchers_over_ten_paired_seeds_at_one_budget():
    cfg = protocol("searchers")
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params == {"searcher": "tpe,random,cmaes,grid,greedy", "seed": "range(10)"}
    assert cfg.launcher.name == "simulated" and cfg.launcher.slots == 4 and cfg.study.max_trials == 24
    assert cfg.study.experiment == "arena-searchers-cpu"


def test_any_launcher_replaces_the_protocols_default():
    cfg = protocol("searchers", "launcher=slurm", "objective=tiny")
    assert cfg.launcher.name == "slurm" and cfg.study.experiment == "arena-searchers-tiny"


def test_scaling_protocol_names_each_slot_count_apart():
    cfg = protocol("scaling", "launcher.slots=16", "seed=3")
    assert cfg.hydra.sweeper.params["launcher.slots"] == "1,2,4,8,16"
    assert OmegaConf.to_container(cfg.study, resolve=True)["name"] == "scaling-tpe-simulated-cpu-x16-s3"


@pytest.mark.parametrize("launcher", ["local", "simulated"])
def test_noise_protocol_repeats_the_baseline_in_its_own_experiment(launcher):
    cfg = protocol("noise", f"launcher={launcher}")
    assert cfg.searcher.name == "repeat" and cfg.searcher.seeds == 8 and cfg.study.max_trials is None
    assert cfg.study.experiment == "autoresearch-arena-noise"
    assert OmegaConf.to_container(cfg.study, resolve=True)["name"] == f"noise-{launcher}-cpu-s0"
