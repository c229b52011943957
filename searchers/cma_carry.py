"""CMA-ES that starts a new code base where the old one left off, instead of from scratch.

When the hybrid's best moves onto another code base (an agent's code edit), the sampler on that code
starts afresh, and a fresh CMA-ES spends its first generations re-learning the scale and the
correlations of the knobs it had already learned. The knobs mean the same on the new code, so the
adaptation carries over: the step size and the covariance as they were, and the mean at the same
offset from the new incumbent's knob values as it had from the old incumbent's (CMA-ES had moved
its mean away from the old best for a reason; the new best is the new reference).

Optuna's public CmaEsSampler takes a starting point (`x0`) and a step size (`sigma0`) but not a
covariance, and its `source_trials` warm start estimates all three from another study's best trials,
not from the optimizer that ran. So this is the one place that reaches into Optuna's private API,
kept small: `carried_state` reads the old sampler's optimizer (`_restore_optimizer`, as
`searchers/hybrid.cma_state` does for the prompt), and `CarriedCmaEsSampler` overrides
`_init_optimizer`, the method a fresh CmaEsSampler calls once, before its first generation exists
(later generations are restored from the study's storage as usual). If Optuna changes either, the
sampler falls back to its ordinary start with one warning: never a failed study.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import optuna

log = logging.getLogger("arena.hybrid")
EPS = 1e-10


def carried_state(study: optuna.Study, old_center: dict[str, Any], new_center: dict[str, Any]) -> dict | None:
    """The CMA-ES adaptation of `study`'s sampler, moved from `old_center` to `new_center` (knob values
    as Optuna stores them): {mean, sigma, cov, generation}, JSON-ready; None before its first generation."""
    try:
        from optuna._transform import _SearchSpaceTransform

        cma = study.sampler
        optimizer = cma._restore_optimizer(cma._get_trials(study))
        if optimizer is None:
            return None
        space = cma.infer_relative_search_space(study, None)
        trans = _SearchSpaceTransform(space, transform_step=True, transform_0_1=True)
        offset = np.asarray(optimizer.mean) - trans.transform(old_center)
        mean = np.clip(trans.transform(new_center) + offset, trans.bounds[:, 0], trans.bounds[:, 1])
        return {"mean": mean.tolist(), "sigma": float(optimizer._sigma), "cov": np.asarray(optimizer._C).tolist(),
                "generation": int(optimizer.generation), "params": list(space)}
    except Exception as e:  # noqa: BLE001 - Optuna's private API moved: start afresh, say so
        log.warning("CMA-ES adaptation not carried to the new code base (%s: %s)", type(e).__name__, e)
        return None


class CarriedCmaEsSampler(optuna.samplers.CmaEsSampler):
    """A CmaEsSampler whose first optimizer is `carried` (see `carried_state`) instead of the box's
    centre with a sixth of its width as step size."""

    def __init__(self, *, carried: dict, **options: Any):
        super().__init__(**options)
        self.carried = carried

    def _init_optimizer(self, trans, direction):  # Optuna's private hook: called once, before generation 0
        try:
            import cmaes

            mean, cov = np.asarray(self.carried["mean"], float), np.asarray(self.carried["cov"], float)
            n = len(trans.bounds)
            if self._use_separable_cma or self._with_margin or mean.shape != (n,) or cov.shape != (n, n):
                raise ValueError("the carried state does not map onto this search space")
            return cmaes.CMA(mean=np.clip(mean, trans.bounds[:, 0], trans.bounds[:, 1]),
                             sigma=max(float(self.carried["sigma"]), EPS), cov=cov, bounds=trans.bounds,
                             seed=self._cma_rng.rng.randint(1, 2**31 - 2), n_max_resampling=10 * n,
                             population_size=self._popsize, lr_adapt=self._lr_adapt)
        except Exception as e:  # noqa: BLE001 - a fresh start is always a valid start
            log.warning("CMA-ES starts afresh on the new code base (%s: %s)", type(e).__name__, e)
            return super()._init_optimizer(trans, direction)
