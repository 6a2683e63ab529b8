"""ES-Single, PES, truncated ES and full ES as a keras-tuner search algorithm.

`ESOracle` is a `keras_tuner.Oracle`; `ESTuner` is the thin `keras_tuner.Tuner` it
needs and `ESSearch` puts the two together the way `keras_tuner.RandomSearch` does
(both in `keras_es.tuner`, importable from here too).

A trial is one *particle unroll*: particle ``i`` continues its training run from its
last checkpoint (weights, optimizer slots and iteration count) for K more steps (or
epochs) at ``theta + eps_i`` decoded, saves a new checkpoint and reports its objective.
When every particle of a round has reported, the oracle tells the estimator core the
reported values (`keras_es.Estimator`'s ask/tell, one window per trial: the same
counter-based noise, the same ``1 / (2 sigma^2)`` pair convention, the same
telescoping and non-finite guards) and updates ``theta`` with the one outer-update rule
of every front end; a particle's training run (its inner problem) restarts from fresh
weights after the horizon T. The search's state machine is `keras_es.tuner.search_state`;
this module is its keras-tuner adaptor.

Hyperparameters map to theta through `keras_es.tuner.kt_space`: a ``Float`` range through
`keras_es.transforms.Logit` or `keras_es.transforms.LogRange` (the transforms
`keras_es.ESCallback` uses for ranges), ``Int``, ``reverse_log`` and ``step`` through
keras-tuner's own continuous relaxation, ``Choice`` and ``Boolean`` as a categorical
distribution with one logit per value; ``Fixed`` is not part of theta; conditional
hyperparameters get a coordinate each and are sent only when their parents make them
active.

Hyperparameters that usually shape the model (Int, Choice, Boolean, or the names in
``per_episode``) keep the value decoded at the start of a particle's inner problem until
it restarts, so a checkpoint is never loaded into a model of another shape. With
ES-Single the perturbation is fixed for the episode anyway. With PES a held coordinate
responds only to the episode's first perturbation while the accumulator ``xi`` keeps
adding later draws: those draws are independent of the loss, so they add variance to
that coordinate's estimate but no bias.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import time

import keras
import keras_tuner
import numpy as np
from keras_tuner.engine import trial as trial_module

from keras_es import checks
from keras_es import estimators as estimators_lib
from keras_es.outer import default_outer_optimizer
from keras_es.tuner import kt_compat, kt_space
from keras_es.tuner.search_state import PREFIX, SearchState, check, first_update_trials, upgrade

_ESTIMATORS = tuple(estimators_lib.ESTIMATORS)
_UNITS = ("steps", "epochs")
_META_OBJECTIVES = ("sum", "final")
# Settings of a saved search that an oracle built without them takes over on resume.
_ADOPTED = ("sigma",)
_HP = keras_tuner.engine.hyperparameters
_UNTUNED = ("ESOracle: {} appeared after the search started (declared in HyperModel.fit, or "
            "in build() under a branch the first model did not take) and are not tuned: "
            "trials get their defaults. To tune them, declare them in build() (e.g. "
            "hp.Boolean('shuffle') there, then hp.get('shuffle') in fit).")
_GUIDED = ("guided=... is not available in ESOracle: guided ES samples along surrogate "
           "gradients (Estimator.push_surrogate, e.g. a hypergradient), and an oracle sees "
           "only the objective its trials report. Use guided ES with keras_es.MetaTrainer "
           "or ESCallback, or leave guided unset.")


class ESOracle(kt_compat.HeldSaves, keras_tuner.Oracle):
    """Evolution-strategies hyperparameter search: ES-Single, PES, truncated ES or full
    ES.

    Use it where keras-tuner takes an oracle, with `ESTuner` running the trials (or
    use `ESSearch`, which builds both). Example:

    ```python
    import keras_es

    oracle = keras_es.ESOracle(
        objective="val_loss", max_trials=400, estimator="es_single",
        num_particles=8, sigma=0.3, truncation_length=20, horizon=200)
    assert oracle.estimator.truncation_length == 1   # one window per trial
    ```

    Args:
        objective: The metric the trials report (a name, or a
            `keras_tuner.Objective`); ``"max"`` objectives are negated.
        max_trials: Particle unrolls to run in total (each trains
            ``truncation_length`` steps or epochs); ``None`` runs until stopped.
        estimator: ``"es_single"`` (default), ``"pes"``, ``"truncated_es"`` (biased),
            ``"full_es"`` (a trial is a whole training run), or a `keras_es.Estimator` in
            steps, which carries its own settings (its horizon may be None: then
            ``search(epochs=...)`` sets it), run one window per trial (`trial_units`).
        num_particles: N, an even number: ``N / 2`` antithetic pairs. A round is N
            trials (fewer during the staggered start).
        sigma: Perturbation scale in theta units (the logit of a value's position in
            its range); default 0.1. A resumed search without it keeps the saved one.
        truncation_length: K, steps (or epochs) each trial trains; default 10.
        meta_objective: ``"sum"`` (default) or ``"final"`` (`keras_es.estimators.resolve`).
        telescope: As in `keras_es.Estimator`.
        stagger: Spread the pairs' restarts with burn-in trials at the start (default).
        clip_loss_difference: As in `keras_es.Estimator`.
        normalize: As in `keras_es.Estimator`.
        horizon: T, steps (or epochs) of one inner problem (one training run); a
            multiple of K. Default None: the training run ``ESTuner.search`` asks for,
            ``epochs`` (default 1, as in ``fit``) times the steps of one epoch of its
            data, rounded to a multiple of K, as keras-tuner users mean ``epochs``.
        unit: ``"steps"`` (K optimizer steps per trial) or ``"epochs"``.
        guided: Refused: guided ES samples along surrogate gradients (such as a
            hypergradient), and an oracle sees only the objective its trials report.
        outer_learning_rate: The default outer optimizer's (Adam) learning rate; default:
            `keras_es.outer.outer_learning_rate_for` the outer steps ``max_trials``
            buys (set by `ESTuner.search`), else 0.01.
        outer_optimizer: Optional Keras optimizer for theta (replaces the default).
        per_episode: Names of hyperparameters held fixed within an inner problem;
            default: every Int, Choice and Boolean.
        reassign_after: Seconds after which a trial that has not reported may be handed
            to another tuner asking for work (a worker that died mid-trial); well above
            the longest trial (a reassigned live trial only costs the work twice).
            ``None`` (default) never reassigns; a tuner restarted with the same
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

    def __init__(self, objective=None, max_trials: int | None = None,  # noqa: PLR0913
                 estimator: str | estimators_lib.Estimator = "es_single",
                 num_particles: int = 8, sigma: float | None = None,
                 truncation_length: int | None = None, horizon: int | None = None,
                 unit: str = "steps", meta_objective: str | None = None,
                 telescope: bool | None = None, guided=None, stagger: bool | None = None,
                 clip_loss_difference: float | None = None, normalize: bool | None = None,
                 outer_learning_rate: float | None = None,
                 outer_optimizer: keras.optimizers.Optimizer | None = None,
                 per_episode: list[str] | None = None, reassign_after: float | None = None,
                 hyperparameters=None, allow_new_entries: bool = True,
                 tune_new_entries: bool = True, seed: int | None = None,
                 max_retries_per_trial: int = 0, max_consecutive_failed_trials: int = 3):
        self._settings = _check_arguments(
            estimator, num_particles, horizon, unit, outer_learning_rate, outer_optimizer,
            max_trials, reassign_after, seed, per_episode,
            {"sigma": sigma, "truncation_length": truncation_length,
             "meta_objective": meta_objective, "telescope": telescope, "guided": guided,
             "stagger": stagger, "clip_loss_difference": clip_loss_difference,
             "normalize": normalize})
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
        self._spec, self.num_particles, self.unit = estimator, num_particles, unit
        self.per_episode = None if per_episode is None else list(per_episode)
        self.reassign_after = reassign_after
        # ESTuner.search sets the rate from the planned outer steps unless one is given.
        self.auto_outer_rate = outer_optimizer is None and outer_learning_rate is None
        self.outer_optimizer = outer_optimizer or default_outer_optimizer(
            *([] if outer_learning_rate is None else [outer_learning_rate]))
        horizon = estimator.horizon if isinstance(estimator, estimators_lib.Estimator) \
            else horizon
        self.horizon, self.horizon_given = horizon, horizon is not None
        self._make_estimator()
        self._search = None  # the search's state machine, created by the first trial

    # ------------------------------------------------------------------ estimator
    @property
    def full_unroll(self) -> bool:
        """Whether one trial is one whole training run (``estimator="full_es"``)."""
        return _name(self._spec) == "full_es"

    def _make_estimator(self) -> None:
        """The estimator in steps and, once the horizon is known, in trials
        (``estimator``), with the settings it carries as attributes."""
        est = _steps_estimator(self._spec, self._settings, self.horizon)
        self.estimator_name, self.sigma = est.name, float(est.sigma)
        self.meta_objective, self.stagger = est.objective, est.stagger
        known = self.horizon is not None
        self.truncation_length = est.truncation_length if known or not self.full_unroll \
            else None
        self.estimator = trial_units(est) if known else None

    def set_horizon(self, horizon: int) -> None:
        """Sets T (steps or epochs of one training run) before the search starts; a
        multiple of ``truncation_length`` (``full_es``: K = T). `ESTuner.search` calls it
        from ``epochs``."""
        _check_horizon(self, horizon)
        self.horizon = horizon
        self._make_estimator()
        if self._search is not None:
            self._search.estimator = self.estimator

    def trials_before_first_update(self) -> int:
        """Trials the search runs before its first outer step: one round."""
        return first_update_trials(self.estimator, self.num_particles)

    @property
    def steps_spent(self) -> int:
        """Training steps (or epochs) the search's finished trials have run."""
        done = sum(t.status == "COMPLETED" for t in self.trials.values())
        return done * (self.truncation_length or self.horizon or 0)

    # ------------------------------------------------------------------ public views
    @property
    def num_pairs(self) -> int:
        return self.num_particles // 2

    @property
    def search_state(self) -> SearchState | None:
        """The search's state machine (`keras_es.tuner.search_state.SearchState`), or None
        before the first trial."""
        return self._search

    @property
    def _es(self) -> dict | None:
        """The search's JSON state (saved in oracle.json), or None before it starts."""
        return None if self._search is None else self._search.es

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

    def trial_metadata(self, trial_id: str) -> dict | None:
        """What ESTuner needs to run trial ``trial_id`` (kept out of its values):
        ``particle``, ``round``, ``episode``, ``window``, the checkpoints to read, write
        and delete, the initialization and data seeds, ``truncation_length`` and
        ``unit`` (`keras_es.tuner.search_state.SearchState.trial_metadata`); None for a trial
        ESOracle did not plan."""
        if self._search is None:
            return None
        meta = self._search.trial_metadata(trial_id)
        trial = self.trials.get(trial_id)  # distributed mode, or a search saved before 0.2
        if meta is None and trial is not None:
            values = trial.hyperparameters.values
            meta = {k[len(PREFIX):]: v for k, v in values.items() if k.startswith(PREFIX)}
        return meta or None

    # ------------------------------------------------------------------ keras-tuner API
    def populate_space(self, trial_id):
        if self._search is None:
            self._search = _start(self)
        if not _round_fits(self):
            return {"status": trial_module.TrialStatus.STOPPED}
        values = self._search.assign(trial_id)
        if values is None:
            return {"status": trial_module.TrialStatus.IDLE}
        return {"status": trial_module.TrialStatus.RUNNING,
                "values": kt_space.complete(self.hyperparameters, values)}

    @keras_tuner.synchronized
    def create_trial(self, tuner_id):
        trial = _reassign(self, tuner_id)
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
        _record(self, trial)
        super().end_trial(trial)

    def get_best_trials(self, num_trials=1):
        """The mean-theta trial first, then the best particle trials."""
        mean = _mean_trial(self)
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
        if self._es is not None:
            _note_untuned(self._es, self.hyperparameters)

    def holding_saves(self) -> bool:
        """Whether keras-tuner's writes wait for the round's end: while a round runs on
        the particle engine, whose round file answers its trials again after a kill
        (`keras_es.tuner.kt_compat.HeldSaves`)."""
        es = self._es
        return bool(es and es.get("execution") == "engine" and es["round"]["trial_ids"])

    def get_state(self):
        state = super().get_state()
        state["es"] = copy.deepcopy(self._es)
        return state

    def set_state(self, state):
        super().set_state(state)
        es = state.get("es")
        if es is None and (state.get("end_order") or state.get("ongoing_trials")):
            # Trials ran, but the ES section is gone: starting ES over would silently
            # throw away the learned theta.
            raise ValueError(
                "The saved search (oracle.json) has trials but no 'es' section, so "
                "ESOracle cannot resume it; restore oracle.json, or start over with "
                "overwrite=True (or another project_name).")
        self._search = None if es is None else _resume(self, es)
        _forget_unrecorded_trials(self)

    # ------------------------------------------------------------------ search state
    def _tuned(self):
        """The hyperparameters theta covers, in search-space order (Fixed excluded)."""
        hps = [hp for hp in self.hyperparameters.space if not isinstance(hp, _HP.Fixed)]
        if self._es is not None:
            by_name = {hp.name: hp for hp in hps}
            return [by_name[n] for n in self._es["config"]["names"] if n in by_name]
        return hps

    def _decode(self, theta, gumbel=None) -> dict:
        """theta -> plain Python values of the hyperparameters active for these values
        (`keras_es.tuner.kt_space`; ``gumbel`` draws each Choice and Boolean)."""
        decoded = kt_space.KerasTunerSpace(self._tuned()).decode(theta, gumbel)
        return kt_space.active_values(self.hyperparameters, decoded)


# ---------------------------------------------------------------------- helpers
def _config(oracle: ESOracle) -> dict:
    est = oracle.estimator
    learned = None if est is None or est.learn_sigma is None else repr(est.learn_sigma)
    return {"estimator": oracle.estimator_name, "num_particles": oracle.num_particles,
            "sigma": oracle.sigma, "truncation_length": oracle.truncation_length,
            "horizon": oracle.horizon, "meta_objective": oracle.meta_objective,
            "stagger": oracle.stagger, "names": [hp.name for hp in oracle._tuned()],
            "fitness_shaping": None if est is None else est.fitness_shaping,
            "learn_sigma": learned}


def _round_fits(oracle: ESOracle) -> bool:
    """Whether the next trial may be handed out: always within a round; a new round
    only if ``max_trials`` leaves room for all of it (a cut-off round would spend
    trials without an outer step). Says so once when the search stops early."""
    search = oracle.search_state
    if oracle.max_trials is None or search.es["round"]["trial_ids"]:
        return True
    size, left = search.round_size(), oracle.max_trials - len(oracle.trials)
    if left >= size:
        return True
    if left > 0 and not getattr(oracle, "_told_stop", False):
        oracle._told_stop = True
        print(f"ESOracle: stopping after {search.es['outer_step']} outer steps: the "
              f"{left} trials left of max_trials={oracle.max_trials} cannot complete a "
              f"round of {size}.")
    return False


def tuned_hyperparameters(oracle: ESOracle) -> list:
    """The keras-tuner hyperparameters ``oracle``'s theta covers, in order."""
    return oracle._tuned()


def start_values(oracle: ESOracle) -> dict:
    """The values ``oracle``'s search starts from (its mean theta once it runs): the
    tuned hyperparameters' defaults, ranges whose default is their minimum mid-range."""
    if oracle.search_state is not None:
        return oracle.mean_values()
    theta, _ = kt_space.KerasTunerSpace(oracle._tuned()).start()
    return oracle._decode(np.asarray(theta, np.float64))


def _reassign(oracle: ESOracle, tuner_id):
    """Hands a trial that has not reported for ``reassign_after`` s to ``tuner_id``."""
    if (oracle.reassign_after is None or oracle.search_state is None
            or tuner_id in oracle.ongoing_trials
            or kt_compat.has_retry_queued(oracle)):
        return None
    plan = oracle.search_state.es["round"]
    if len(plan["trial_ids"]) < len(plan["particles"]):
        return None  # fresh work is available
    now = time.time()
    for owner, trial in list(oracle.ongoing_trials.items()):
        key = next((k for k, t in plan["trial_ids"].items() if t == trial.trial_id), None)
        if key is None or key in plan["results"]:
            continue
        if now - plan["assigned_at"][key] < oracle.reassign_after:
            continue
        # The owner is presumed dead: keras-tuner's chief waits for every tuner id it
        # has seen before it exits, so forget the owner too (it is re-added if it
        # comes back and asks for work).
        oracle.ongoing_trials.pop(owner)
        oracle.tuner_ids.discard(owner)
        oracle.tuner_ids.add(tuner_id)
        plan["assigned_at"][key] = now
        trial.status = trial_module.TrialStatus.RUNNING
        oracle.ongoing_trials[tuner_id] = trial
        oracle.save()
        kt_compat.display_trial_begin(oracle, trial)
        return trial
    return None

def _mean_trial(oracle: ESOracle):
    if oracle.search_state is None:
        return None
    hps = oracle.hyperparameters.copy()
    hps.values = oracle.mean_values()
    trial = trial_module.Trial(hyperparameters=hps, trial_id="mean_theta",
                               status=trial_module.TrialStatus.COMPLETED)
    loss = oracle.search_state.es["last_loss"]
    if loss is not None:
        trial.score = loss if oracle.objective.direction == "min" else -loss
    trial.message = (f"ES mean theta after {oracle.search_state.es['outer_step']} outer steps "
                     f"({oracle.estimator_name}); score = mean {oracle.objective.name} of "
                     "the last round's particles.")
    return trial


def _record(oracle: ESOracle, trial) -> None:
    """Stores a finished particle trial's result; completes the round when all are in."""
    search = oracle.search_state
    meta = (oracle.trial_metadata(trial.trial_id) or {}) if search else {}
    if meta.get("particle") is None or meta.get("round") != search.es["round_index"]:
        return
    if trial.status == trial_module.TrialStatus.INVALID and \
            kt_compat.retries_used(oracle, trial.trial_id) < oracle.max_retries_per_trial:
        return  # keras-tuner will run it again
    search.record(meta["particle"], trial.trial_id, _reported_loss(oracle, trial))


def _note_untuned(es: dict, hyperparameters) -> None:
    """Names, once each, hyperparameters that appeared after the search started: theta's
    coordinates are fixed then, and they keep their defaults."""
    untuned = es.setdefault("untuned", [])
    known = set(es["config"]["names"]) | set(untuned)
    new = [hp.name for hp in hyperparameters.space
           if not isinstance(hp, _HP.Fixed) and hp.name not in known]
    if new:
        untuned.extend(new)
        print(_UNTUNED.format(", ".join(new)))


def _reported_loss(oracle: ESOracle, trial) -> float | None:
    """A finished trial's objective as a loss (negated for "max"), or None when it has
    no finite value (a diverged or failed particle: its pair restarts)."""
    if trial.status != trial_module.TrialStatus.COMPLETED:
        return None
    metrics = oracle.trials[trial.trial_id].metrics
    name = oracle.objective.name
    value = metrics.get_last_value(name) if metrics.exists(name) else None
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value) if oracle.objective.direction == "min" else -float(value)


def _initial(tuned, per_episode) -> tuple[list[float], list[str]]:
    """theta at the defaults of ``tuned`` and the names held per episode."""
    if not tuned:
        raise ValueError("The search space has no tunable hyperparameter (only Fixed or "
                         "none); ESOracle needs at least one.")
    theta, moved = kt_space.KerasTunerSpace(tuned).start()
    if moved:
        print("ESOracle: ranges whose default is their minimum (keras-tuner's default "
              f"when none is given) start mid-range instead: {', '.join(moved)}. Pass a "
              "default=... inside the range to start there.")
    held = per_episode
    if held is None:
        held = [hp.name for hp in tuned if isinstance(hp, (_HP.Int, _HP.Choice, _HP.Boolean))]
    unknown = sorted(set(held) - {hp.name for hp in tuned})
    if unknown:
        raise ValueError(f"per_episode={per_episode!r} names {unknown}, which are not "
                         "tunable hyperparameters of the search space.")
    return theta, held


def _name(spec) -> str:
    return spec.name if isinstance(spec, estimators_lib.Estimator) else spec


def _steps_estimator(spec, settings: dict, horizon: int | None) -> estimators_lib.Estimator:
    """The estimator in steps (or epochs): ``spec`` (a name, built by
    `keras_es.estimators.resolve` with ``settings``) with ``horizon`` when known."""
    if isinstance(spec, estimators_lib.Estimator):
        if spec.guided is not None:
            raise ValueError(_GUIDED)
        return spec if horizon is None else dataclasses.replace(spec, horizon=horizon)
    settings = dict(settings)
    if spec == "full_es":
        settings.pop("truncation_length", None)  # checked: it equals the horizon
    return estimators_lib.resolve(spec, horizon=horizon, **settings)


def _forget_unrecorded_trials(oracle: ESOracle) -> None:
    """Drops reloaded trials that oracle.json does not record. keras-tuner writes a
    trial's file before oracle.json (and on the particle engine a round's files at its
    end), so a run killed in between leaves files that keras-tuner would count: every
    later trial id would shift (two trials can then get one id) and ``max_trials``
    would be spent on them. Their work is done again under the same ids (on the engine,
    read back from the round's file)."""
    recorded = set(oracle.start_order)
    unknown = sorted(t for t in oracle.trials if t not in recorded)
    for trial_id in unknown:
        del oracle.trials[trial_id]
    if unknown:
        print(f"ESOracle: ignoring the saved files of trial(s) {', '.join(unknown)}, which "
              "oracle.json does not record (the last run stopped while saving); they run "
              "again under the same ids.")


def _new_search(oracle: ESOracle, es=None) -> SearchState:
    return SearchState(oracle.estimator, oracle.num_particles, int(oracle.seed),
                       oracle.truncation_length, oracle.unit, oracle.outer_optimizer,
                       oracle._decode, (oracle.objective.name, oracle.objective.direction), es)


def _start(oracle: ESOracle) -> SearchState:
    """A new search: the defaults encoded into theta, the first round planned."""
    if oracle.estimator is None:
        raise ValueError("horizon=None: the length of a training run is not known yet; "
                         "run the search through ESTuner.search(..., epochs=...), which "
                         "sets it, or pass horizon= to ESOracle.")
    tuned = oracle._tuned()
    theta, held = _initial(tuned, oracle.per_episode)
    search = _new_search(oracle)
    search.start({**_config(oracle), "names": [hp.name for hp in tuned]}, theta, held)
    return search


def _resume(oracle: ESOracle, es: dict) -> SearchState:
    """The search state of a saved search, checked against this oracle; an oracle built
    with horizon=None takes the saved horizon, and one without sigma the saved sigma."""
    check(es)
    saved = es["config"]
    if oracle.horizon is None:
        oracle.horizon = saved["horizon"]
    if not isinstance(oracle._spec, estimators_lib.Estimator):
        oracle._settings.update({k: saved[k] for k in _ADOPTED if k not in oracle._settings})
    oracle._make_estimator()
    _check_config(saved, _config(oracle))
    upgrade(es)
    search = _new_search(oracle, es)
    _check_dim(es["theta"], sum(kt_space.width(hp) for hp in oracle._tuned()))
    search.restore_optimizer()
    return search


def _check_horizon(oracle: ESOracle, horizon) -> None:
    checks.positive_int("horizon", horizon)
    length = oracle.truncation_length
    if length and horizon % length:
        raise ValueError(f"horizon={horizon!r} is invalid; expected a multiple of "
                         f"truncation_length={length}.")
    if oracle.search_state is not None and horizon != oracle.horizon:
        raise ValueError(
            f"This search was started with training runs of {oracle.horizon} "
            f"{oracle.unit} and is asked to resume with {horizon}; resume with the same "
            "epochs (or horizon) or overwrite=True.")


def _check_config(saved: dict, current: dict) -> None:
    for key in ("estimator", "num_particles", "sigma", "truncation_length", "horizon",
                "meta_objective", "stagger", "fitness_shaping", "learn_sigma"):
        # A search saved before an option existed ran without it.
        if saved.get(key) != current[key]:
            raise ValueError(
                f"{key}={current[key]!r} does not match the saved search's "
                f"{key}={saved[key]!r}; resume with the same settings or overwrite=True.")


def _check_dim(theta: list, dim: int) -> None:
    if len(theta) != dim:
        raise ValueError(
            f"The saved search's theta has {len(theta)} coordinates, this search space "
            f"{dim} (since keras_es 0.2 a Choice or Boolean has one logit per value); "
            "resume with the keras_es that saved it or overwrite=True.")


def trial_units(estimator: estimators_lib.Estimator) -> estimators_lib.Estimator:
    """``estimator`` (K steps per window, horizon T steps) as ESOracle runs it: one
    window per trial, T / K windows per inner problem; a resampling interval M of
    ``pes`` becomes M / K trials.

    Example:

    ```python
    import keras_es
    from keras_es.tuner.oracle import trial_units

    est = trial_units(keras_es.pes(0.1, truncation_length=20, horizon=200))
    assert (est.truncation_length, est.horizon) == (1, 10)
    ```
    """
    if estimator.guided is not None:
        raise ValueError(_GUIDED)
    length, horizon = estimator.truncation_length, estimator.horizon
    if horizon is None or horizon % length:
        raise ValueError(f"horizon={horizon!r} is invalid; expected a multiple of "
                         f"truncation_length={length}.")
    resample = estimator.resample
    if not isinstance(resample, str):
        if resample % length:
            raise ValueError(f"resample={resample!r} is invalid for ESOracle; expected a "
                             f"multiple of truncation_length={length} (a trial trains "
                             f"{length} steps at one perturbation).")
        resample //= length
    return dataclasses.replace(estimator, truncation_length=1, horizon=horizon // length,
                               resample=resample)


def _check_arguments(estimator, num_particles, horizon, unit, outer_learning_rate,
                     outer_optimizer, max_trials, reassign_after, seed, per_episode,
                     settings) -> dict:
    """Refuses bad ESOracle arguments before any work, naming argument and value;
    returns the estimator settings given (not None)."""
    checks.num_particles(num_particles)
    if unit not in _UNITS:
        raise ValueError(f"unit={unit!r} is invalid; expected one of {_UNITS}.")
    if outer_learning_rate is not None:
        checks.positive_float("outer_learning_rate", outer_learning_rate)
    checks.optimizer("outer_optimizer", outer_optimizer)
    if max_trials is not None:
        checks.positive_int("max_trials", max_trials)
    if reassign_after is not None:
        checks.positive_float("reassign_after", reassign_after)
    checks.seed(seed, allow_none=True)
    if per_episode is not None and (isinstance(per_episode, str) or not all(
            isinstance(n, str) for n in per_episode)):
        raise ValueError(f"per_episode={per_episode!r} is invalid; expected a list of "
                         "hyperparameter names or None.")
    return _check_settings(estimator, horizon, settings)


def _check_settings(estimator, horizon, settings: dict) -> dict:
    """Checks the estimator and its settings (those `keras_es.estimators.resolve` cannot
    name as ESOracle's arguments); returns the settings given."""
    if not isinstance(estimator, estimators_lib.Estimator) and estimator not in _ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is invalid; expected one of "
                         f"{_ESTIMATORS} or a keras_es Estimator.")
    given = {k: v for k, v in settings.items() if v is not None}
    if "sigma" in given:
        checks.sigma(given["sigma"])
    length = given.get("truncation_length")
    if length is not None:
        checks.positive_int("truncation_length", length)
    if horizon is not None:
        checks.positive_int("horizon", horizon)
    if estimator == "full_es" and length is not None and length != horizon:
        raise ValueError(f"estimator='full_es' trains one whole training run per trial: "
                         f"truncation_length={length!r} must equal horizon={horizon!r} (or "
                         "be left out, and horizon sets it).")
    length = length or estimators_lib.DEFAULTS["truncation_length"]
    if horizon is not None and estimator != "full_es" and horizon % length:
        raise ValueError(f"horizon={horizon!r} is invalid; expected a multiple of "
                         f"truncation_length={length}.")
    if given.get("meta_objective", "sum") not in _META_OBJECTIVES:
        raise ValueError(f"meta_objective={given['meta_objective']!r} is invalid; "
                         f"expected one of {_META_OBJECTIVES}.")
    if "guided" in given:
        raise ValueError(_GUIDED)
    if isinstance(estimator, estimators_lib.Estimator):
        # Refuses settings given beside an Estimator (it carries its own).
        estimators_lib.resolve(estimator, horizon=horizon, **given)
    return given


def __getattr__(name):
    # ESTuner and ESSearch live in keras_es.tuner.tuners (which imports this module).
    if name in ("ESTuner", "ESSearch"):
        return getattr(importlib.import_module("keras_es.tuner.tuners"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
