"""ES-Single, PES and truncated ES as a keras-tuner search algorithm.

`ESOracle` is a `keras_tuner.Oracle`; `ESTuner` is the thin `keras_tuner.Tuner` it
needs; `ESSearch` puts the two together the way `keras_tuner.RandomSearch` does.

A trial is one *particle unroll*: particle ``i`` continues its training run from its
last checkpoint (weights, optimizer slots and iteration count) for K more steps (or
epochs) at ``theta + eps_i`` decoded, saves a new checkpoint and reports its objective.
When every particle of a round has reported, the oracle forms the ES estimate and
updates ``theta``; a particle's training run (its inner problem) restarts from fresh
weights after the horizon T. The estimate is the estimator core's (`keras_es.Estimator`,
one window per trial): the same counter-based noise, the same ``1 / (2 sigma^2)`` pair
convention, the same telescoping and non-finite guards.

Hyperparameters map to theta through keras-tuner's own continuous relaxation
(``HyperParameter.value_to_prob`` / ``prob_to_value``, the one Bayesian optimization
uses), followed by a logit: ``theta = logit(prob)``.

* Float: ``prob`` is linear, log or reverse-log in ``[min_value, max_value]`` as the
  hyperparameter's ``sampling`` says; ``step`` rounds.
* Int: ``[min_value, max_value]`` is cut into equal buckets, one per allowed value
  (linear or log); theta moves continuously and the trial gets the bucket's integer.
* Choice: one bucket per value, in declaration order (so order numeric choices).
* Boolean: ``False`` below ``prob = 0.5``, ``True`` above.
* Fixed: not part of theta; conditional hyperparameters get a coordinate each and are
  sent only when their parents make them active.

Hyperparameters that usually shape the model (Int, Choice, Boolean, or the names in
``per_episode``) keep the value decoded at the start of a particle's inner problem until
it restarts, so a checkpoint is never loaded into a model of another shape. With
ES-Single the perturbation is fixed for the episode anyway. With PES a held coordinate
responds only to the episode's first perturbation while the accumulator ``xi`` keeps
adding later draws: those draws are independent of the loss, so they add variance to
that coordinate's estimate but no bias.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import time

import keras
import keras_tuner
import numpy as np
import tensorflow as tf
from keras_tuner.engine import trial as trial_module

from keras_es import checks, kt_compat
from keras_es import estimators as estimators_lib
from keras_es import noise as noise_lib
from keras_es.outer import default_outer_optimizer, outer_update
from keras_es.transforms import Logit
from keras_es.unrolled import UnrolledSystem

_ESTIMATORS = ("es_single", "pes", "truncated_es")
# The only checkpoint names ESOracle plans; anything else read back is refused.
_CHECKPOINT_NAME = re.compile(r"particle_\d{3,}/episode_\d{5,}_window_\d{5,}\.weights\.h5")
_HP = keras_tuner.engine.hyperparameters
# Searched as a categorical distribution whose logits ES moves (one coordinate per value).
_CATEGORICAL = (_HP.Choice, _HP.Boolean)
_UNITS = ("steps", "epochs")
_META_OBJECTIVES = ("sum", "final")
# Initial values at a range's edge (keras-tuner's default Float is its minimum) would
# sit at theta = -inf; they start this far inside instead.
_EDGE = 0.05
_LOGIT = Logit()
# Trial values ESOracle adds for the tuner; everything a worker needs travels here.
PREFIX = "es/"


class ESOracle(keras_tuner.Oracle):
    """Evolution-strategies hyperparameter search: ES-Single, PES or truncated ES.

    Use it where keras-tuner takes an oracle, with `ESTuner` running the trials (or
    use `ESSearch`, which builds both).

    Example:

    ```python
    oracle = keras_es.ESOracle(
        objective="val_loss", max_trials=400, estimator="es_single",
        num_particles=8, sigma=0.3, truncation_length=20, horizon=200)
    tuner = keras_es.ESTuner(oracle, build_model, directory="runs", project_name="es")
    tuner.search(x, y, validation_data=(x_val, y_val), batch_size=64)
    best_hp = tuner.get_best_hyperparameters()[0]   # the learned mean theta, decoded
    ```

    Args:
        objective: The metric the trials report (a name, or a
            `keras_tuner.Objective`); ``"max"`` objectives are negated.
        max_trials: Particle unrolls to run in total (each trains
            ``truncation_length`` steps or epochs); ``None`` runs until stopped.
        estimator: ``"es_single"`` (default), ``"pes"`` or ``"truncated_es"`` (biased;
            a baseline).
        num_particles: N, an even number: ``N / 2`` antithetic pairs. A round is N
            trials (fewer during the staggered start).
        sigma: Perturbation scale in theta (logit) units.
        truncation_length: K, steps (or epochs) each trial trains.
        horizon: T, steps (or epochs) of one inner problem (one training run); a
            multiple of K. Default None: the training run ``ESTuner.search`` asks for,
            ``epochs`` (default 1, as in ``fit``) times the steps of one epoch of its
            data, rounded to a multiple of K, as keras-tuner users mean ``epochs``.
        unit: ``"steps"`` (K optimizer steps per trial) or ``"epochs"``.
        meta_objective: ``"sum"`` of the objective reported at the end of every trial
            of an inner problem, or ``"final"``: its value at the end of the inner
            problem, reached online by telescoping.
        outer_learning_rate: Learning rate of the default outer optimizer,
            ``keras.optimizers.Adam``.
        outer_optimizer: Optional Keras optimizer for theta (replaces the default).
        stagger: Spread the pairs' restarts over the horizon with uncredited burn-in
            trials at the start, so updates do not correlate with episode phase.
        per_episode: Names of hyperparameters held fixed within an inner problem;
            default: every Int, Choice and Boolean.
        clip_loss_difference: Optional bound on each pair's loss difference.
        normalize: Divide each estimate by the spread of the pairs' loss differences.
        reassign_after: Seconds after which a trial that has not reported may be handed
            to another tuner asking for work (distributed search: a worker that died
            mid-trial), and its first tuner is presumed dead. Set it well above the
            longest trial: a live tuner whose trial is reassigned is not harmed (the first
            report counts, the checkpoint is written atomically) but the work is done
            twice. ``None`` (default) never reassigns; a tuner restarted with the same
            ``KERASTUNER_TUNER_ID`` always gets its trial back (keras-tuner's behaviour).
        hyperparameters: Optional `keras_tuner.HyperParameters` registering the search
            space in advance (as in `keras_tuner.Oracle`).
        allow_new_entries: As in `keras_tuner.Oracle`.
        tune_new_entries: As in `keras_tuner.Oracle`; hyperparameters that first appear
            after the search started are not tuned (they keep their defaults).
        seed: Integer seed of every perturbation, initialization and data key.
        max_retries_per_trial: As in `keras_tuner.Oracle`; a trial out of retries
            counts as a diverged particle.
        max_consecutive_failed_trials: As in `keras_tuner.Oracle`.
    """

    def __init__(self, objective=None, max_trials: int | None = None,
                 estimator: str = "es_single", num_particles: int = 8, sigma: float = 0.3,
                 truncation_length: int = 10, horizon: int | None = None,
                 unit: str = "steps",
                 meta_objective: str = "sum", outer_learning_rate: float = 0.01,
                 outer_optimizer: keras.optimizers.Optimizer | None = None,
                 stagger: bool = True, per_episode: list[str] | None = None,
                 clip_loss_difference: float | None = None, normalize: bool = False,
                 reassign_after: float | None = None, hyperparameters=None,
                 allow_new_entries: bool = True, tune_new_entries: bool = True,
                 seed: int | None = None, max_retries_per_trial: int = 0,
                 max_consecutive_failed_trials: int = 3):
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is invalid; expected one of {_ESTIMATORS}.")
        checks.num_particles(num_particles)
        checks.sigma(sigma)
        checks.positive_int("truncation_length", truncation_length)
        if horizon is not None:
            checks.positive_int("horizon", horizon)
        if horizon is not None and horizon % truncation_length:
            raise ValueError(f"horizon={horizon!r} is invalid; expected a multiple of "
                             f"truncation_length={truncation_length}.")
        if unit not in _UNITS:
            raise ValueError(f"unit={unit!r} is invalid; expected one of {_UNITS}.")
        if meta_objective not in _META_OBJECTIVES:
            raise ValueError(f"meta_objective={meta_objective!r} is invalid; expected one of "
                             f"{_META_OBJECTIVES}.")
        checks.positive_float("outer_learning_rate", outer_learning_rate)
        if outer_optimizer is not None and not isinstance(outer_optimizer,
                                                          keras.optimizers.Optimizer):
            raise ValueError(f"outer_optimizer={outer_optimizer!r} is invalid; expected a "
                             "keras.optimizers.Optimizer or None.")
        if max_trials is not None:
            checks.positive_int("max_trials", max_trials)
        if reassign_after is not None:
            checks.positive_float("reassign_after", reassign_after)
        checks.seed(seed, allow_none=True)
        checks.boolean("stagger", stagger)
        checks.boolean("normalize", normalize)
        if per_episode is not None and (isinstance(per_episode, str) or not all(
                isinstance(n, str) for n in per_episode)):
            raise ValueError(f"per_episode={per_episode!r} is invalid; expected a list of "
                             "hyperparameter names or None.")
        super().__init__(objective=objective, max_trials=max_trials,
                         hyperparameters=hyperparameters, allow_new_entries=allow_new_entries,
                         tune_new_entries=tune_new_entries, seed=seed,
                         max_retries_per_trial=max_retries_per_trial,
                         max_consecutive_failed_trials=max_consecutive_failed_trials)
        if seed is not None and self.seed != seed:
            # keras-tuner reads seed=0 as "no seed" and draws a random one: a search
            # given seed=0 must be as reproducible as one given any other seed.
            self.seed = self._seed_state = int(seed)
        if hasattr(self.objective, "name_to_direction"):  # a MultiObjective
            raise ValueError(f"objective={objective!r} is invalid; ESOracle needs a single "
                             "objective (one metric name or keras_tuner.Objective).")
        self.estimator_name = estimator
        self.num_particles = num_particles
        self.sigma = float(sigma)
        self.truncation_length = truncation_length
        self.horizon = horizon
        self.unit = unit
        self.meta_objective = meta_objective
        self.stagger = stagger
        self.per_episode = None if per_episode is None else list(per_episode)
        self.reassign_after = reassign_after
        self.outer_optimizer = outer_optimizer or default_outer_optimizer(outer_learning_rate)
        self._estimator_options = {"clip_loss_difference": clip_loss_difference,
                                   "normalize": normalize}
        self.horizon_given = horizon is not None
        self.estimator = None
        if horizon is not None:
            self._make_estimator()
        self._es = None  # the search's JSON state, created by the first populate_space
        self._theta_variable = None  # what outer_optimizer updates (value kept in _es)

    def _make_estimator(self) -> None:
        # The estimator core counts in trials: one window (K = 1) per trial, T / K
        # windows per inner problem.
        factory = estimators_lib.ESTIMATORS[self.estimator_name]
        self.estimator = factory(sigma=self.sigma, truncation_length=1,
                                 horizon=self.horizon // self.truncation_length,
                                 objective=self.meta_objective, stagger=self.stagger,
                                 **self._estimator_options)

    def set_horizon(self, horizon: int) -> None:
        """Sets T (steps or epochs of one training run) before the search starts; a
        multiple of ``truncation_length``. `ESTuner.search` calls it from ``epochs``."""
        checks.positive_int("horizon", horizon)
        if horizon % self.truncation_length:
            raise ValueError(f"horizon={horizon!r} is invalid; expected a multiple of "
                             f"truncation_length={self.truncation_length}.")
        if self._es is not None and horizon != self.horizon:
            raise ValueError(
                f"This search was started with training runs of {self.horizon} "
                f"{self.unit} and is asked to resume with {horizon}; resume with the same "
                "epochs (or horizon) or overwrite=True.")
        self.horizon = horizon
        self._make_estimator()

    def trials_before_first_update(self) -> int:
        """Trials the search runs before its first outer step: the staggered
        start's burn-in (pairs joining one round at a time) and one full round."""
        offsets = [int(v) for v in self.estimator.start_offsets(self.num_pairs).numpy()]
        burn_in = max(offsets)
        waits = [burn_in - o for o in offsets]
        return sum(2 * (burn_in - w) for w in waits) + self.num_particles

    # ------------------------------------------------------------------ public views
    @property
    def num_pairs(self) -> int:
        return self.num_particles // 2

    @property
    def history(self) -> list[dict]:
        """One entry per outer step: the loss, valid pairs and theta decoded after it."""
        return list(self._es["history"]) if self._es else []

    @property
    def theta(self) -> np.ndarray | None:
        """The current mean theta (unconstrained), or ``None`` before the search."""
        return None if self._es is None else np.asarray(self._es["theta"], np.float32)

    def mean_values(self) -> dict:
        """The current mean theta decoded to plain Python values."""
        if self._es is None:
            return {}
        return self._decode(np.asarray(self._es["theta"], np.float64))

    # ------------------------------------------------------------------ keras-tuner API
    def populate_space(self, trial_id):
        if self._es is None:
            self._start()
        plan = self._es["round"]
        for i in plan["particles"]:
            key = str(i)
            if key not in plan["trial_ids"]:
                plan["trial_ids"][key] = trial_id
                plan["assigned_at"][key] = time.time()
                meta = plan["meta"][key]
                self._es["trials"][trial_id] = {
                    k: meta[k] for k in ("particle", "round", "episode", "window",
                                         "checkpoint_out")}
                return {"status": trial_module.TrialStatus.RUNNING,
                        "values": self._complete(plan["values"][key])}
        return {"status": trial_module.TrialStatus.IDLE}

    @keras_tuner.synchronized
    def create_trial(self, tuner_id):
        trial = self._reassign(tuner_id)
        if trial is not None:
            return trial
        return super().create_trial(tuner_id)

    def score_trial(self, trial):
        super().score_trial(trial)
        # A diverged particle is a result (its pair restarts), not a failed trial:
        # keras-tuner would mark a NaN score INVALID and count it toward
        # max_consecutive_failed_trials.
        if trial.score is None or not math.isfinite(trial.score):
            trial.score = float("inf") if self.objective.direction == "min" else float("-inf")

    @keras_tuner.synchronized
    def end_trial(self, trial):
        if trial.trial_id in self.end_order:
            # A reassigned trial reported twice: the first report counted.
            for tuner_id, ongoing in list(self.ongoing_trials.items()):
                if ongoing.trial_id == trial.trial_id:
                    self.ongoing_trials.pop(tuner_id)
            return
        # Record the result in our state before keras-tuner saves oracle.json (one
        # write for both), so a crash never keeps one without the other.
        self._record(trial)
        super().end_trial(trial)

    def get_best_trials(self, num_trials=1):
        """The mean-theta trial first, then the best particle trials."""
        mean = self._mean_trial()
        particles = self.get_best_particle_trials(num_trials)
        if mean is None or mean.score is None:
            # Before the first outer step: no score to rank the mean by (keras-tuner
            # would print "Best ... So Far: None").
            return particles
        return [mean] + particles[: max(num_trials - 1, 0)]

    def get_best_particle_trials(self, num_trials=1):
        """The best particle unrolls by their reported objective."""
        return super().get_best_trials(num_trials)

    def update_space(self, hyperparameters):
        super().update_space(hyperparameters)
        if self._es is None:
            return
        untuned = self._es.setdefault("untuned", [])
        known = set(self._es["config"]["names"]) | set(untuned)
        new = [hp.name for hp in self.hyperparameters.space
               if not isinstance(hp, _HP.Fixed) and hp.name not in known]
        if new:
            # theta's coordinates are fixed when the search starts; say so, once per name.
            untuned.extend(new)
            print(f"ESOracle: {', '.join(new)} appeared after the search started (declared "
                  "in HyperModel.fit, or in build() under a branch the first model did not "
                  "take) and are not tuned: trials get their defaults. To tune them, "
                  "declare them in build() (e.g. hp.Boolean('shuffle') there, then "
                  "hp.get('shuffle') in fit).")

    def get_state(self):
        state = super().get_state()
        state["es"] = copy.deepcopy(self._es)
        return state

    def set_state(self, state):
        super().set_state(state)
        self._es = state.get("es")
        if self._es is None and (state.get("end_order") or state.get("ongoing_trials")):
            # Trials ran, but the ES section is gone: starting ES over would silently
            # throw away the learned theta.
            raise ValueError(
                "The saved search (oracle.json) has trials but no 'es' section, so "
                "ESOracle cannot resume it; restore oracle.json, or start over with "
                "overwrite=True (or another project_name).")
        if self._es is not None:
            _check_es_state(self._es)
            if self.estimator is None:  # horizon=None: the saved search's
                self.horizon = self._es["config"]["horizon"]
                self._make_estimator()
            self._check_config(self._es["config"])
            _upgrade(self._es)
            dim = sum(_width(hp) for hp in self._tuned())
            if len(self._es["theta"]) != dim:
                raise ValueError(
                    f"The saved search's theta has {len(self._es['theta'])} coordinates, this "
                    f"search space {dim} (since keras_es 0.2 a Choice or Boolean has one "
                    "logit per value); resume with the keras_es that saved it or "
                    "overwrite=True.")
            self._restore_optimizer(self._es["optimizer"])

    # ------------------------------------------------------------------ search state
    def _config(self) -> dict:
        return {"estimator": self.estimator_name, "num_particles": self.num_particles,
                "sigma": self.sigma, "truncation_length": self.truncation_length,
                "horizon": self.horizon, "meta_objective": self.meta_objective,
                "stagger": self.stagger, "names": [hp.name for hp in self._tuned()]}

    def _check_config(self, saved: dict) -> None:
        current = self._config()
        for key in ("estimator", "num_particles", "sigma", "truncation_length", "horizon",
                    "meta_objective", "stagger"):
            if saved[key] != current[key]:
                raise ValueError(
                    f"{key}={current[key]!r} does not match the saved search's "
                    f"{key}={saved[key]!r}; resume with the same settings or overwrite=True.")

    def _tuned(self):
        """The hyperparameters theta covers, in search-space order (Fixed excluded)."""
        hps = [hp for hp in self.hyperparameters.space
               if not isinstance(hp, keras_tuner.engine.hyperparameters.Fixed)]
        if self._es is not None:
            names = self._es["config"]["names"]
            by_name = {hp.name: hp for hp in hps}
            return [by_name[n] for n in names if n in by_name]
        return hps

    def _start(self) -> None:
        """Encodes the defaults into theta and plans the first round."""
        tuned = self._tuned()
        if not tuned:
            raise ValueError("The search space has no tunable hyperparameter (only Fixed or "
                             "none); ESOracle needs at least one.")
        if self.estimator is None:
            raise ValueError("horizon=None: the length of a training run is not known yet; "
                             "run the search through ESTuner.search(..., epochs=...), which "
                             "sets it, or pass horizon= to ESOracle.")
        theta, moved = [], []
        for hp in tuned:
            if isinstance(hp, _CATEGORICAL):
                theta.extend(_initial_logits(hp))
                continue
            prob = float(hp.value_to_prob(hp.default))
            if hp.default == hp.min_value and hp.max_value > hp.min_value:
                # keras-tuner's default for a range without default= is its minimum (and
                # it keeps no record of whether one was given): a corner, not a guess.
                prob = 0.5
                moved.append(f"{hp.name}={_format(_plain(hp.prob_to_value(prob)))}")
            prob = float(np.clip(prob, _EDGE, 1.0 - _EDGE))
            theta.append(float(_LOGIT.encode(np.float64(prob))))
        if moved:
            print("ESOracle: ranges whose default is their minimum (keras-tuner's default "
                  f"when none is given) start mid-range instead: {', '.join(moved)}. Pass a "
                  "default=... inside the range to start there.")
        dim = len(theta)
        held = self.per_episode
        if held is None:
            held = [hp.name for hp in tuned if isinstance(
                hp, (keras_tuner.engine.hyperparameters.Int,
                     keras_tuner.engine.hyperparameters.Choice,
                     keras_tuner.engine.hyperparameters.Boolean))]
        unknown = sorted(set(held) - {hp.name for hp in tuned})
        if unknown:
            raise ValueError(f"per_episode={self.per_episode!r} names {unknown}, which are not "
                             "tunable hyperparameters of the search space.")
        state = self.estimator.init(self.num_pairs, dim)
        offsets = [int(v) for v in self.estimator.start_offsets(self.num_pairs).numpy()]
        self._es = {
            "config": {**self._config(), "names": [hp.name for hp in tuned]},
            "per_episode": held,
            "theta": [float(v) for v in np.asarray(theta, np.float32)],
            "optimizer": [],
            "estimator": _to_json(state),
            "last_reported": [0.0] * self.num_particles,
            "burn_in": max(offsets),
            "wait": [max(offsets) - o for o in offsets],
            "round_index": 0,
            "outer_step": 0,
            "trials": {},
            "particles": [{"checkpoint": "", "previous": "", "held": {}}
                          for _ in range(self.num_particles)],
            "history": [],
            "last_loss": None,
            "round": None,
        }
        self._es["optimizer"] = _optimizer_to_json(self._optimizer())
        self._plan_round()

    def _optimizer(self):
        """The outer optimizer, built for a theta variable holding the current theta."""
        theta = np.asarray(self._es["theta"], np.float32)
        if self._theta_variable is None:
            self._theta_variable = keras.Variable(theta, name="theta")
            self.outer_optimizer.build([self._theta_variable])
        self._theta_variable.assign(theta)
        return self.outer_optimizer

    def _restore_optimizer(self, saved) -> None:
        variables = self._optimizer().variables
        if len(variables) != len(saved):
            raise ValueError("outer_optimizer does not match the saved search's (different "
                             "number of variables); resume with the same optimizer.")
        for variable, value in zip(variables, saved, strict=True):
            variable.assign(np.asarray(value, variable.dtype))

    def _active_pairs(self) -> list[bool]:
        r = self._es["round_index"]
        if r < self._es["burn_in"]:
            return [r >= w for w in self._es["wait"]]
        return [True] * self.num_pairs

    def _plan_round(self) -> None:
        """Decides which particles run next and with which values (stored, not redrawn)."""
        es = self._es
        state = _from_json(es["estimator"], self.estimator.init(self.num_pairs,
                                                                 len(es["theta"])))
        active = self._active_pairs()
        thetas = self.estimator.perturbed_theta(
            state, tf.constant(es["theta"], tf.float32), self._seed(), tf.constant(active))
        thetas = thetas.numpy().astype(np.float64)
        episode = state.episode.numpy()
        episode_step = state.episode_step.numpy()
        steps = state.steps.numpy()
        credited = es["round_index"] >= es["burn_in"]
        particles, values, meta = [], {}, {}
        dim = len(es["theta"])
        for i in range(self.num_particles):
            p = i // 2
            if not active[p]:
                continue
            record = es["particles"][i]
            decoded = self._decode(thetas[i], self._gumbel(p, int(episode[p]), dim))
            if episode_step[p] == 0:
                record["held"] = {n: decoded[n] for n in es["per_episode"] if n in decoded}
            decoded.update({n: v for n, v in record["held"].items() if n in decoded})
            out = (f"particle_{i:03d}/episode_{int(episode[p]):05d}_"
                   f"window_{int(episode_step[p]) + 1:05d}.weights.h5")
            meta[str(i)] = {
                "particle": i,
                "round": es["round_index"],
                "outer_step": es["outer_step"],
                "credited": credited,
                "episode": int(episode[p]),
                "window": int(episode_step[p]),
                "checkpoint_in": record["checkpoint"] if episode_step[p] else "",
                "checkpoint_out": out,
                "checkpoint_stale": record["previous"],
                "init_seed": _int_seed(self._seed(), noise_lib.STREAM_EPISODE, p,
                                       int(episode[p])),
                "data_seed": _int_seed(self._seed(), noise_lib.STREAM_STEP, p, int(steps[p])),
                "truncation_length": self.truncation_length,
                "unit": self.unit,
            }
            if _distributed():
                # Workers learn a trial only through its values (keras-tuner's gRPC).
                decoded.update({PREFIX + k: v for k, v in meta[str(i)].items()})
            particles.append(i)
            values[str(i)] = decoded
        es["round"] = {"particles": particles, "values": values, "meta": meta,
                       "trial_ids": {}, "assigned_at": {}, "results": {}}

    def trial_metadata(self, trial_id: str) -> dict | None:
        """What ESTuner needs to run trial ``trial_id``, kept out of its hyperparameter
        values (so keras-tuner's per-trial table shows only the user's): ``particle``,
        ``round``, ``episode``, ``window``, the checkpoints to read, write and delete
        (relative to the tuner's checkpoint directory), the initialization and data
        seeds, ``truncation_length`` and ``unit``. None for a trial ESOracle did not
        plan. Trials of past rounds keep only ``particle``, ``round``, ``episode``,
        ``window`` and ``checkpoint_out``."""
        if self._es is None:
            return None
        record = self._es.get("trials", {}).get(trial_id)
        if record is not None:
            plan = self._es["round"]
            key = str(record["particle"])
            if record["round"] == self._es["round_index"] and \
                    plan["trial_ids"].get(key) == trial_id:
                return dict(plan["meta"][key])
            return dict(record)
        trial = self.trials.get(trial_id)  # distributed mode, or a search saved before 0.2
        if trial is None:
            return None
        values = trial.hyperparameters.values
        meta = {k[len(PREFIX):]: v for k, v in values.items() if k.startswith(PREFIX)}
        return meta or None

    def _gumbel(self, pair: int, episode: int, dim: int) -> np.ndarray:
        """Gumbel noise ``[dim]`` for pair ``pair``'s inner problem ``episode``: twins
        share it (common random numbers), and it is redrawn when the episode restarts."""
        key = noise_lib.pair_seeds(self._seed(), noise_lib.STREAM_CHOICE, tf.constant([pair]),
                                   tf.constant([episode]))[0]
        u = tf.random.stateless_uniform([dim], key, 1e-7, 1.0 - 1e-7).numpy()
        return -np.log(-np.log(u.astype(np.float64)))

    def _seed(self) -> int:
        return int(self.seed)

    def _decode(self, theta, gumbel=None) -> dict:
        """theta -> plain Python values of the hyperparameters active for these values.

        A Choice or Boolean takes the value whose logit (plus ``gumbel``, when given) is
        largest: with Gumbel noise that is a draw from the softmax of its logits; without,
        the most likely value.
        """
        tuned = self._tuned()
        theta = np.asarray(theta, np.float64)
        decoded, start = {}, 0
        for hp in tuned:
            width = _width(hp)
            coordinates = theta[start:start + width]
            if isinstance(hp, _CATEGORICAL):
                if gumbel is not None:
                    coordinates = coordinates + gumbel[start:start + width]
                value = _choices(hp)[int(np.argmax(coordinates))]
            else:
                prob = float(np.clip(_LOGIT.decode(coordinates[0]), 0.0, 1.0 - 1e-9))
                value = hp.prob_to_value(prob)
            decoded[hp.name] = _plain(value)
            start += width
        hps = keras_tuner.HyperParameters()
        values = {}
        for hp in self.hyperparameters.space:
            hps.merge([hp])
            if hps.is_active(hp):
                value = decoded.get(hp.name, _plain(hp.default))
                hps.values[hp.name] = value
                values[hp.name] = value
        return values

    def _complete(self, values: dict) -> dict:
        """``values`` plus the default of every hyperparameter that appeared in the
        space after they were planned (e.g. ``units_1`` once a model with two layers
        was built) and is active for them: such entries are not tuned, and a trial
        must not be left to fill them in by itself."""
        values = dict(values)
        hps = keras_tuner.HyperParameters()
        for hp in self.hyperparameters.space:
            hps.merge([hp])
            hps.values[hp.name] = values.get(hp.name, _plain(hp.default))
            if hp.name not in values and hps.is_active(hp):
                values[hp.name] = _plain(hp.default)
        return values

    def _record(self, trial) -> None:
        """Stores a finished particle trial's result; completes the round when all are in."""
        es = self._es
        if es is None:
            return
        plan = es["round"]
        meta = self.trial_metadata(trial.trial_id) or {}
        i = meta.get("particle")
        if (i is None or meta.get("round") != es["round_index"]
                or plan["trial_ids"].get(str(i)) != trial.trial_id
                or str(i) in plan["results"]):
            return
        status = trial.status
        if status == trial_module.TrialStatus.INVALID:
            retries_left = (kt_compat.retries_used(self, trial.trial_id) + 1
                            < self.max_retries_per_trial + 1)
            if retries_left:
                return  # keras-tuner will run it again
            loss = None  # out of retries: the pair is invalid this round and restarts
        elif status == trial_module.TrialStatus.COMPLETED:
            metrics = self.trials[trial.trial_id].metrics
            value = metrics.get_last_value(self.objective.name) \
                if metrics.exists(self.objective.name) else None
            loss = None
            if value is not None and math.isfinite(float(value)):
                loss = float(value) if self.objective.direction == "min" else -float(value)
        else:
            loss = None
        plan["results"][str(i)] = loss
        if len(plan["results"]) == len(plan["particles"]):
            self._finish_round()

    def _finish_round(self) -> None:
        """Runs the estimator core on the round's reported losses and updates theta."""
        es = self._es
        plan = es["round"]
        dim = len(es["theta"])
        template = self.estimator.init(self.num_pairs, dim)
        state = _from_json(es["estimator"], template)
        reported = np.zeros([self.num_particles], np.float32)
        for key, loss in plan["results"].items():
            reported[int(key)] = np.nan if loss is None else loss
        last = np.asarray([np.nan if v is None else v for v in es["last_reported"]],
                          np.float32)
        system = _ReportedLosses(tf.constant(reported))
        active = self._active_pairs()
        credited = es["round_index"] >= es["burn_in"]
        theta = tf.constant(es["theta"], tf.float32)
        episode_before = state.episode.numpy()
        _, state, result = self.estimator.window(
            system, tf.constant(last), state, theta, self._seed(),
            active=tf.constant(active), credit=credited)
        # The reported values are the replayed system's state (F_j for telescoping).
        for key in plan["results"]:
            value = reported[int(key)]
            es["last_reported"][int(key)] = float(value) if np.isfinite(value) else None
        if credited:
            self._restore_optimizer(es["optimizer"])
            # The rule MetaTrainer applies too: skipped without a valid pair, undone
            # (theta and the optimizer's slots) when it would leave anything non-finite.
            applied = bool(outer_update(self.outer_optimizer, self._theta_variable,
                                        result.gradient, result.valid_pairs))
            es["theta"] = [float(v) for v in np.asarray(self._theta_variable.numpy(),
                                                        np.float32)]
            es["optimizer"] = _optimizer_to_json(self.outer_optimizer)
            es["outer_step"] += 1
            losses = [v for v in plan["results"].values() if v is not None]
            mean_loss = float(np.mean(losses)) if losses else None
            es["last_loss"] = mean_loss
            sign = 1.0 if self.objective.direction == "min" else -1.0
            es["history"].append({
                "outer_step": es["outer_step"],
                "round": es["round_index"],
                "trials": [plan["trial_ids"][str(i)] for i in plan["particles"]],
                self.objective.name: None if mean_loss is None else sign * mean_loss,
                "valid_pairs": int(result.valid_pairs),
                "diverged_pairs": int(result.diverged_pairs),
                "clipped_pairs": int(result.clipped_pairs),
                "updated": applied,
                "gradient_norm": float(np.linalg.norm(
                    result.gradient.numpy().astype(np.float64))),
                "gradient": [float(v) for v in result.gradient.numpy()],
                "values": self.mean_values(),
            })
        episode_after = state.episode.numpy()
        for i in plan["particles"]:
            record = es["particles"][i]
            record["previous"] = record["checkpoint"]
            if episode_after[i // 2] != episode_before[i // 2]:
                # The inner problem restarts (horizon reached or a non-finite loss).
                record["checkpoint"] = ""
            else:
                record["checkpoint"] = plan["meta"][str(i)]["checkpoint_out"]
        es["estimator"] = _to_json(state)
        es["round_index"] += 1
        self._plan_round()

    def _reassign(self, tuner_id):
        """Hands a trial that has not reported for ``reassign_after`` s to ``tuner_id``."""
        if (self.reassign_after is None or self._es is None or tuner_id in self.ongoing_trials
                or kt_compat.has_retry_queued(self)):
            return None
        plan = self._es["round"]
        if len(plan["trial_ids"]) < len(plan["particles"]):
            return None  # fresh work is available
        now = time.time()
        for owner, trial in list(self.ongoing_trials.items()):
            key = next((k for k, t in plan["trial_ids"].items() if t == trial.trial_id), None)
            if key is None or key in plan["results"]:
                continue
            if now - plan["assigned_at"][key] < self.reassign_after:
                continue
            # The owner is presumed dead: keras-tuner's chief waits for every tuner id it
            # has seen before it exits, so forget the owner too (it is re-added if it
            # comes back and asks for work).
            self.ongoing_trials.pop(owner)
            self.tuner_ids.discard(owner)
            self.tuner_ids.add(tuner_id)
            plan["assigned_at"][key] = now
            trial.status = trial_module.TrialStatus.RUNNING
            self.ongoing_trials[tuner_id] = trial
            self.save()
            kt_compat.display_trial_begin(self, trial)
            return trial
        return None

    def _mean_trial(self):
        if self._es is None:
            return None
        hps = self.hyperparameters.copy()
        hps.values = self.mean_values()
        trial = trial_module.Trial(hyperparameters=hps, trial_id="mean_theta",
                                   status=trial_module.TrialStatus.COMPLETED)
        loss = self._es["last_loss"]
        if loss is not None:
            trial.score = loss if self.objective.direction == "min" else -loss
        trial.message = (f"ES mean theta after {self._es['outer_step']} outer steps "
                         f"({self.estimator_name}); score = mean {self.objective.name} of "
                         "the last round's particles.")
        return trial


class _ReportedLosses(UnrolledSystem):
    """The estimator core's view of a round: each particle's step is its trial.

    ``step`` returns the objective each particle's trial reported, which is also the
    state ``meta_loss`` reads (the window-end value ``F_j`` for telescoping).
    """

    def __init__(self, reported: tf.Tensor):
        self.reported = reported

    def init(self, keys):
        return tf.zeros([keys.shape[0]], tf.float32)

    def step(self, state, theta, keys):
        return self.reported, self.reported, None

    def meta_loss(self, state, keys):
        return state


class ESTuner(keras_tuner.Tuner):
    """Runs `ESOracle` trials: each continues one particle's training run.

    A trial restores particle ``i``'s checkpoint (weights, optimizer slots and
    iteration count; the optimizer's learning rate comes from the trial's
    hyperparameters, not the checkpoint), trains K steps or epochs, saves a new
    checkpoint under ``<project>/es_checkpoints`` and reports the last epoch's logs.
    Checkpoints are written to a new file and renamed, so a trial killed while saving
    leaves the previous one intact and a re-run trial starts from the same weights. In
    distributed search the project directory must be on a shared filesystem.

    The hypermodel builds and compiles the model from ``hp`` as usual; the two twins of
    a pair get the same initial weights and the same data order (common random
    numbers) through ``keras.utils.set_random_seed``.

    Args:
        oracle: An `ESOracle`.
        hypermodel: A `keras_tuner.HyperModel` or a ``build(hp)`` function.
        idle_sleep: Seconds to wait after the oracle answers IDLE (round in progress
            elsewhere), doubled on each further IDLE up to ``max_idle_sleep``.
        max_idle_sleep: Longest wait between IDLE answers, in seconds.
        **kwargs: `keras_tuner.Tuner` arguments (``directory``, ``project_name``,
            ``overwrite``, ...).
    """

    def __init__(self, oracle: ESOracle, hypermodel=None, idle_sleep: float = 0.05,
                 max_idle_sleep: float = 2.0, **kwargs):
        if not isinstance(oracle, ESOracle):
            raise ValueError(f"oracle={oracle!r} is invalid; expected a keras_es.ESOracle.")
        checks.positive_float("idle_sleep", idle_sleep)
        checks.positive_float("max_idle_sleep", max_idle_sleep)
        self.idle_sleep = float(idle_sleep)
        self.max_idle_sleep = float(max_idle_sleep)
        self._asked = False
        self._idle_streak = 0
        super().__init__(oracle, hypermodel, **kwargs)

    # keras-tuner's search loop retries at once when the oracle is IDLE; back off.
    def pre_create_trial(self):
        if self._asked:
            self._idle_streak += 1
            time.sleep(min(self.max_idle_sleep,
                           self.idle_sleep * 2.0 ** (self._idle_streak - 1)))
        self._asked = True

    def on_trial_begin(self, trial):
        self._asked = False
        self._idle_streak = 0
        super().on_trial_begin(trial)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.project_dir, "es_checkpoints")

    def search(self, *fit_args, **fit_kwargs):
        """Runs the search, as `keras_tuner.Tuner.search` does.

        ``epochs`` means what it means to every keras-tuner user: the length of the
        training run being tuned. With ``horizon=None`` (the default) it sets T,
        ``epochs`` x the steps of one epoch of ``x``; each trial still trains
        ``truncation_length`` steps of one such run. Before any work starts, a
        ``max_trials`` too small for one outer step is refused, and the plan
        (trials per outer step, outer steps within ``max_trials``) is printed.
        """
        oracle = self.oracle
        if isinstance(oracle, ESOracle):  # not on a distributed worker: the chief plans
            _plan_search(oracle, fit_args, fit_kwargs)
        return super().search(*fit_args, **fit_kwargs)

    def _metadata(self, trial) -> dict:
        values = trial.hyperparameters.values
        meta = {k[len(PREFIX):]: v for k, v in values.items() if k.startswith(PREFIX)}
        if not meta and isinstance(self.oracle, ESOracle):
            meta = self.oracle.trial_metadata(trial.trial_id) or {}
        return meta

    def _path(self, relative) -> str:
        """The checkpoint file ``relative`` names, inside `checkpoint_dir`.

        Names come from oracle.json or, in distributed search, from the chief over the
        network, and a trial writes and deletes what they name: only names of the form
        ESOracle plans (``particle_NNN/episode_NNNNN_window_NNNNN.weights.h5``) pass.
        """
        if not (isinstance(relative, str) and _CHECKPOINT_NAME.fullmatch(relative)):
            raise keras_tuner.errors.FatalError(
                f"Refusing checkpoint path {relative!r} from the search state: expected "
                "particle_NNN/episode_NNNNN_window_NNNNN.weights.h5 inside "
                f"{self.checkpoint_dir}. Was oracle.json edited?")
        return os.path.join(self.checkpoint_dir, relative)

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        es = self._metadata(trial)
        if "checkpoint_out" not in es:
            raise keras_tuner.errors.FatalError(
                "ESTuner got a trial without ESOracle's values; use it with keras_es.ESOracle.")
        _check_metadata(es)
        # Every path checked before any work.
        out = self._path(es["checkpoint_out"])
        source = self._path(es["checkpoint_in"]) if es["checkpoint_in"] else None
        stale = self._path(es["checkpoint_stale"]) if es["checkpoint_stale"] else None
        # Fresh layer names for every build; skip its gc.collect() (0.4 s a trial here).
        keras.backend.clear_session(free_memory=False)
        keras.utils.set_random_seed(es["init_seed"])
        model = self.hypermodel.build(hp)
        if not isinstance(model, keras.Model):
            raise keras_tuner.errors.FatalTypeError(
                f"The hypermodel returned {model!r}; expected a compiled keras.Model.")
        if source:
            self._restore(model, source)
        keras.utils.set_random_seed(es["data_seed"])
        kwargs = dict(kwargs)
        if es["unit"] == "steps":
            kwargs["epochs"] = 1
            kwargs["steps_per_epoch"] = es["truncation_length"]
        else:
            kwargs["epochs"] = es["truncation_length"]
        kwargs.setdefault("verbose", 0)
        history = self.hypermodel.fit(hp, model, *args, **kwargs)
        logs = history.history if isinstance(history, keras.callbacks.History) else history
        os.makedirs(os.path.dirname(out), exist_ok=True)
        partial = f"{out[: -len('.weights.h5')]}.partial{os.getpid()}"
        # The build config first (a Sequential without an Input is built from data, and
        # a checkpoint loads only into a built model), then the weights, each written to
        # a new file and renamed: a kill leaves the previous pair intact.
        with open(partial + ".json", "w") as f:
            json.dump(model.get_build_config(), f)
        os.replace(partial + ".json", _build_config_path(out))
        model.save_weights(partial + ".weights.h5")
        os.replace(partial + ".weights.h5", out)
        if stale:
            # A reassigned trial may run twice at once: the other run may delete it first.
            for path in (stale, _build_config_path(stale)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        if isinstance(logs, dict):
            return {k: float(v[-1]) if isinstance(v, (list, tuple)) else float(v)
                    for k, v in logs.items()}
        return logs

    @staticmethod
    def _restore(model: keras.Model, path: str) -> None:
        optimizer = model.optimizer
        if optimizer is None:
            raise ValueError("The hypermodel's model is not compiled; ESTuner needs an "
                             "optimizer to carry its state between trials.")
        if not model.built:
            config = _build_config_path(path)
            if not os.path.exists(config):
                raise ValueError(
                    f"The model is not built and {config} (its build config) is missing; "
                    "give the model an Input, or resume with the keras_es that saved "
                    f"{path}.")
            with open(config) as f:
                model.build_from_config(json.load(f))
        optimizer.build(model.trainable_variables)
        # The checkpoint holds the optimizer's scalars too (the learning rate): keep the
        # trial's, restore only weights, slots and the iteration count.
        scalars = [(v, v.numpy()) for v in optimizer.variables
                   if len(v.shape) == 0 and "iteration" not in v.path]
        model.load_weights(path)
        for variable, value in scalars:
            variable.assign(value)

    def load_model(self, trial):
        """The model of a particle trial, with the weights that trial saved."""
        relative = self._metadata(trial).get("checkpoint_out")
        if not relative:
            raise ValueError(
                f"Trial {trial.trial_id!r} has no trained weights: the mean theta is never "
                "trained as such. Build it with tuner.hypermodel.build(best_hp) and fit it, "
                "or use get_best_models(), which returns the best particle models.")
        path = self._path(relative)
        if not os.path.exists(path):
            raise ValueError(
                f"Trial {trial.trial_id!r}'s checkpoint {path} was deleted: ESTuner keeps only "
                "each particle's latest checkpoint and the last one of every inner problem.")
        keras.backend.clear_session(free_memory=False)
        model = self.hypermodel.build(trial.hyperparameters)
        self._restore(model, path)
        return model

    def get_best_models(self, num_models=1):
        """The best particle models whose checkpoints are still on disk, best first."""
        models = []
        for trial in self.oracle.get_best_particle_trials(len(self.oracle.trials)):
            relative = self._metadata(trial).get("checkpoint_out")
            if relative and os.path.exists(self._path(relative)):
                models.append(self.load_model(trial))
            if len(models) == num_models:
                break
        return models

    def results_summary(self, num_trials=10):
        """Prints the learned mean theta, the outer-step trajectory and the best trials."""
        oracle = self.oracle
        print("Results summary")
        print(f"Results in {self.project_dir}")
        print(f"{oracle.objective}")
        if not isinstance(oracle, ESOracle) or oracle._es is None:
            print("No outer step yet.")
            return
        es = oracle._es
        print(f"ES: {oracle.estimator_name}, {oracle.num_particles} particles, "
              f"sigma={oracle.sigma}, K={oracle.truncation_length} {oracle.unit}, "
              f"T={oracle.horizon} {oracle.unit}, meta-objective {oracle.meta_objective}")
        print(f"{es['outer_step']} outer steps over {es['round_index']} rounds "
              f"({es['burn_in']} burn-in); {len(oracle.trials)} trials")
        print()
        print("Mean theta (get_best_hyperparameters()[0]):")
        tuned = set(es["config"]["names"])
        for name, value in oracle.mean_values().items():
            note = "" if name in tuned else "  (not tuned: its default)"
            print(f"  {name}: {_format(value)}{note}")
        history = oracle.history
        if history:
            print()
            print(f"Trajectory (outer step: mean {oracle.objective.name} of the round):")
            shown = history if len(history) <= 10 else history[:3] + [None] + history[-6:]
            for entry in shown:
                if entry is None:
                    print("  ...")
                    continue
                value = entry[oracle.objective.name]
                print(f"  {entry['outer_step']:5d}: {_format(value)}  "
                      f"(valid pairs {entry['valid_pairs']})")
        print()
        print(f"Showing {num_trials} best particle trials")
        for trial in oracle.get_best_particle_trials(num_trials):
            print()
            trial.summary()


class ESSearch(ESTuner):
    """Evolution-strategies search, used like ``keras_tuner.RandomSearch``.

    Example:

    ```python
    tuner = keras_es.ESSearch(
        build_model, objective="val_loss", max_trials=400, estimator="es_single",
        num_particles=8, sigma=0.3, truncation_length=20, horizon=200,
        directory="runs", project_name="es_single")
    tuner.search(x, y, validation_data=(x_val, y_val), batch_size=64)
    tuner.results_summary()
    ```

    Every argument but ``hypermodel`` and ``**kwargs`` is the `ESOracle` argument of the
    same name, with the same default.

    Args:
        hypermodel: A `keras_tuner.HyperModel` or a ``build(hp)`` function returning a
            compiled model.
        **kwargs: `ESTuner` / `keras_tuner.Tuner` arguments (``directory``,
            ``project_name``, ``overwrite``, ``idle_sleep``, ...).
    """

    def __init__(self, hypermodel=None, objective=None, max_trials=None,
                 estimator="es_single", num_particles=8, sigma=0.3, truncation_length=10,
                 horizon=None, unit="steps", meta_objective="sum", outer_learning_rate=0.01,
                 outer_optimizer=None, stagger=True, per_episode=None,
                 clip_loss_difference=None, normalize=False, reassign_after=None, seed=None,
                 hyperparameters=None, tune_new_entries=True, allow_new_entries=True,
                 max_retries_per_trial=0, max_consecutive_failed_trials=3, **kwargs):
        oracle = ESOracle(
            objective=objective, max_trials=max_trials, estimator=estimator,
            num_particles=num_particles, sigma=sigma, truncation_length=truncation_length,
            horizon=horizon, unit=unit, meta_objective=meta_objective,
            outer_learning_rate=outer_learning_rate, outer_optimizer=outer_optimizer,
            stagger=stagger, per_episode=per_episode,
            clip_loss_difference=clip_loss_difference, normalize=normalize,
            reassign_after=reassign_after, seed=seed, hyperparameters=hyperparameters,
            tune_new_entries=tune_new_entries, allow_new_entries=allow_new_entries,
            max_retries_per_trial=max_retries_per_trial,
            max_consecutive_failed_trials=max_consecutive_failed_trials)
        super().__init__(oracle, hypermodel, **kwargs)


# ---------------------------------------------------------------------- helpers
def _steps_per_epoch(fit_args, fit_kwargs) -> int | None:
    """Batches in one epoch of ``fit``'s training data, or None if it cannot tell."""
    if fit_kwargs.get("steps_per_epoch"):
        return int(fit_kwargs["steps_per_epoch"])
    x = fit_args[0] if fit_args else fit_kwargs.get("x")
    batch_size = fit_kwargs.get("batch_size") or (fit_args[2] if len(fit_args) > 2 else None)
    if isinstance(x, tf.data.Dataset):
        count = int(x.cardinality())
        return count if count > 0 else None
    if isinstance(x, keras.utils.PyDataset):
        try:
            return len(x)
        except (TypeError, NotImplementedError):
            return None
    if isinstance(x, dict) and x:
        x = next(iter(x.values()))
    if isinstance(x, (list, tuple)) and x:
        x = x[0]
    if getattr(x, "shape", None) is None or not len(x.shape):
        return None  # a generator or something else fit takes without a length
    rows = int(x.shape[0])
    split = fit_kwargs.get("validation_split") or 0.0
    rows = int(math.floor(rows * (1.0 - split)))
    return max(1, math.ceil(rows / (batch_size or 32)))


def _plan_search(oracle: ESOracle, fit_args, fit_kwargs) -> None:
    """Sets T from ``search(epochs=...)`` when the oracle has no horizon, refuses an
    ``epochs`` that contradicts a given horizon and a ``max_trials`` too small for one
    outer step, and prints the plan, all before any trial runs."""
    epochs = fit_kwargs.get("epochs", fit_args[3] if len(fit_args) > 3 else None)
    if epochs is not None:
        checks.positive_int("epochs", epochs)
    length, unit = oracle.truncation_length, oracle.unit
    per_epoch = 1 if unit == "epochs" else _steps_per_epoch(fit_args, fit_kwargs)
    asked = None if per_epoch is None else (epochs or 1) * per_epoch
    if oracle.horizon_given:
        if epochs is not None and asked is not None and asked != oracle.horizon:
            raise ValueError(
                f"search(epochs={epochs}) asks for training runs of {asked} {unit}, but this "
                f"ESSearch was built with horizon={oracle.horizon} {unit}; drop one of the "
                "two (horizon is the length of one training run).")
    else:
        if asked is None:
            raise ValueError(
                "ESSearch cannot tell how many steps one epoch of this data has (a generator "
                "or a dataset of unknown length); pass steps_per_epoch=... to search(), or "
                "horizon=... (steps of one training run) to ESSearch.")
        horizon = max(length, round(asked / length) * length)
        oracle.set_horizon(horizon)
        if horizon != asked:
            print(f"ESSearch: training runs of {horizon} {unit} ({asked} rounded to a "
                  f"multiple of truncation_length={length}).")
    first = oracle.trials_before_first_update()
    if oracle._es is None and oracle.max_trials is not None and oracle.max_trials < first:
        raise ValueError(
            f"max_trials={oracle.max_trials} is too small: each trial trains one particle "
            f"for {length} {unit}, and the first outer step needs {first} trials "
            f"({oracle.num_particles} particles, plus the staggered start's burn-in). Pass "
            f"max_trials >= {first} (one more outer step per {oracle.num_particles} trials), "
            "fewer num_particles, or stagger=False.")
    if oracle._es is None and oracle.max_trials is not None:
        steps = (oracle.max_trials - first) // oracle.num_particles + 1
        print(f"ESSearch: {oracle.num_particles} particles, training runs of {oracle.horizon} "
              f"{unit}, {length} {unit} per trial: the first outer step after {first} trials, "
              f"then one every {oracle.num_particles}; max_trials={oracle.max_trials} gives "
              f"{steps} outer step{'s' if steps != 1 else ''}.")


_METADATA_TYPES = {"init_seed": int, "data_seed": int, "truncation_length": int, "unit": str,
                   "checkpoint_in": str, "checkpoint_out": str, "checkpoint_stale": str}


def _check_metadata(meta: dict) -> None:
    """Refuses trial metadata (read from storage or the network) of the wrong shape."""
    for key, kind in _METADATA_TYPES.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise keras_tuner.errors.FatalError(
                f"Refusing the trial's {key}={value!r} from the search state: expected "
                f"{kind.__name__}. Was oracle.json edited?")
    if meta["unit"] not in _UNITS or meta["truncation_length"] < 1:
        raise keras_tuner.errors.FatalError(
            f"Refusing the trial's unit={meta['unit']!r} / truncation_length="
            f"{meta['truncation_length']!r} from the search state.")


def _build_config_path(checkpoint: str) -> str:
    """Where the build config of a ``.weights.h5`` checkpoint is kept."""
    return checkpoint[: -len(".weights.h5")] + ".build.json"


def _choices(hp) -> list:
    return [False, True] if isinstance(hp, _HP.Boolean) else list(hp.values)


def _width(hp) -> int:
    """theta coordinates of ``hp``: one logit per value of a Choice or Boolean, else
    one (the logit of keras-tuner's [0, 1] relaxation)."""
    return len(_choices(hp)) if isinstance(hp, _CATEGORICAL) else 1


def _initial_logits(hp) -> list[float]:
    """Starting logits of a Choice or Boolean: the default value gets probability 0.6
    of two, or 1/2 of more, and the others share the rest. So the mean decodes to the
    default, and every value is drawn from the first round on (a bucket of
    keras-tuner's [0, 1] relaxation would start several sigmas from the next value
    and almost never cross it)."""
    choices = _choices(hp)
    default = choices.index(hp.default) if hp.default in choices else 0
    first = 0.6 if len(choices) == 2 else 0.5
    rest = (1.0 - first) / max(len(choices) - 1, 1)
    return [math.log(first if k == default else rest) for k in range(len(choices))]


def _distributed() -> bool:
    """Whether keras-tuner runs distributed (its chief/worker environment is set)."""
    return bool(os.environ.get("KERASTUNER_ORACLE_IP"))


def _finite_numbers(value) -> bool:
    """Whether ``value`` is a (nested) list of finite numbers."""
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_es_state(es) -> None:
    """Refuses an 'es' section of oracle.json that is not what ESOracle writes (read
    from storage: a torn write or a hand edit), naming what is wrong."""
    def refuse(what):
        raise ValueError(f"The saved search's ES state (oracle.json, 'es') is damaged: "
                         f"{what}. Restore oracle.json, or start over with overwrite=True.")

    if not isinstance(es, dict):
        refuse(f"expected an object, got {type(es).__name__}")
    for key in ("config", "theta", "optimizer", "estimator", "particles", "round_index",
                "outer_step", "burn_in", "wait", "per_episode"):
        if key not in es:
            refuse(f"'{key}' is missing")
    theta = es["theta"]
    if not (isinstance(theta, list) and theta and _finite_numbers(theta)):
        refuse(f"theta={theta!r} is not a non-empty list of finite numbers")
    if not _finite_numbers(es["optimizer"]):
        refuse("the outer optimizer's state holds non-finite or non-numeric values")
    if not _finite_numbers(es["estimator"]):
        refuse("the estimator state holds non-finite or non-numeric values")
    for key in ("round_index", "outer_step", "burn_in"):
        if not (isinstance(es[key], int) and not isinstance(es[key], bool) and es[key] >= 0):
            refuse(f"{key}={es[key]!r} is not a non-negative integer")
    if not (isinstance(es["particles"], list) and all(
            isinstance(p, dict) and isinstance(p.get("checkpoint"), str)
            and isinstance(p.get("previous"), str) for p in es["particles"])):
        refuse("the particles' records are not what ESOracle writes")


def _upgrade(es: dict) -> None:
    """Brings a search state saved by keras_es 0.1 (particle metadata among the trial
    values) to this version's layout, in place."""
    es.setdefault("trials", {})
    plan = es.get("round")
    if plan is not None and "meta" not in plan:
        plan["meta"] = {key: {k[len(PREFIX):]: v for k, v in values.items()
                              if k.startswith(PREFIX)}
                        for key, values in plan["values"].items()}


def _to_json(state) -> list:
    """An `EstimatorState` as nested lists of plain numbers (exact for float32/int32)."""
    return [np.asarray(t).tolist() for t in tf.nest.flatten(state)]


def _from_json(saved: list, template):
    leaves = tf.nest.flatten(template)
    if len(saved) == len(leaves) - 1:
        # Saved by keras_es 0.1, before the running scale of loss differences (the
        # last field): it starts at 0, as in a new search.
        saved = [*saved, np.asarray(leaves[-1]).tolist()]
    if len(saved) != len(leaves):
        raise ValueError("The saved estimator state does not match this ESOracle's estimator.")
    restored = [tf.constant(np.asarray(v, t.dtype.as_numpy_dtype).reshape(t.shape), t.dtype)
                for v, t in zip(saved, leaves, strict=True)]
    return tf.nest.pack_sequence_as(template, restored)


def _optimizer_to_json(optimizer) -> list:
    return [np.asarray(v.numpy()).tolist() for v in optimizer.variables]


def _int_seed(seed: int, stream: int, pair: int, counter: int) -> int:
    """A Python int seed for ``keras.utils.set_random_seed`` from keras_es's noise keys."""
    key = noise_lib.pair_seeds(seed, stream, tf.constant([pair]), tf.constant([counter]))
    a, b = (int(v) & 0xFFFF for v in key.numpy()[0])
    return (a << 15 ^ b) % (2 ** 31 - 1)


def _plain(value):
    """numpy scalars -> Python bool/int/float/str (keras-tuner's gRPC needs plain values)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)
