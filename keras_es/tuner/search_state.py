"""The ES side of a keras-tuner search, in plain Python: `SearchState`.

A search is a sequence of *rounds*. At the start of a round the estimator is asked for
the particles' perturbed theta (`keras_es.Estimator.ask`, one window per trial), and
each active particle's trial is planned: its decoded values, checkpoints and seeds. As
trials report, their objective values are recorded; when the last one is in, the round
is told to the estimator (`start_window`, `tell`, `finish`, `combine`: the reported
values are the losses and, for ``meta_objective="final"``, the meta-losses) and theta
takes one outer step (`keras_es.outer.outer_update`). Everything lives in one JSON-able
dict, ``SearchState.es``, which keras-tuner saves in ``oracle.json``; `keras_es.ESOracle`
is the keras-tuner adaptor around it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_es import noise as noise_lib
from keras_es.estimators import Estimator
from keras_es.outer import outer_update

#: Trial values ESOracle adds for the tuner in distributed search; everything a worker
#: needs travels there.
PREFIX = "es/"
# Metadata a finished trial keeps once its round is over.
_KEPT = ("particle", "round", "episode", "window", "checkpoint_out")


class SearchState:
    """The search's JSON state ``es`` and the steps that move it.

    Args:
        estimator: The estimator in trial units (one window per trial).
        num_particles: N.
        seed: The search's integer seed.
        truncation_length: K, steps or epochs each trial trains (for its metadata).
        unit: ``"steps"`` or ``"epochs"``.
        outer_optimizer: The Keras optimizer of theta.
        decode: ``decode(theta, gumbel=None) -> {name: value}``, the values a trial gets
            (see `keras_es.tuner.kt_space`).
        objective: ``(name, direction)`` of the reported objective.
        es: A saved state (already checked), or None until `start`.
    """

    def __init__(self, estimator: Estimator, num_particles: int, seed: int,
                 truncation_length: int, unit: str, outer_optimizer,
                 decode: Callable, objective: tuple[str, str], es: dict | None = None):
        self.estimator = estimator
        self.num_particles = num_particles
        self.seed = int(seed)
        self.truncation_length = truncation_length
        self.unit = unit
        self.outer_optimizer = outer_optimizer
        self.decode = decode
        self.objective_name, self.direction = objective
        self.es = es
        self._theta_variable = None  # what outer_optimizer updates (value kept in es)
        self._gumbels = {}  # (pair, episode) -> Gumbel noise, drawn once each

    @property
    def num_pairs(self) -> int:
        return self.num_particles // 2

    # ------------------------------------------------------------------ start
    def start(self, config: dict, theta: list[float], held: list[str]) -> None:
        """A fresh search at ``theta``; plans the first round."""
        offsets = [int(v) for v in self.estimator.start_offsets(self.num_pairs).numpy()]
        state = self.estimator.init(self.num_pairs, len(theta))
        self.es = {
            "config": config,
            "per_episode": held,
            "theta": list(theta),
            "optimizer": [],
            "estimator": to_json(state),
            "burn_in": max(offsets),
            # Rounds of the staggered start (fewer pairs active) are credited too: each
            # active pair's window is an unbiased estimate, so every round moves theta.
            # A search saved before this key existed left them uncredited.
            "credit_burn_in": True,
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
        self.es["optimizer"] = optimizer_to_json(self.optimizer())
        self.plan_round()

    def optimizer(self):
        """The outer optimizer, built for a theta variable holding the current theta."""
        theta = np.asarray(self.es["theta"], np.float32)
        if self._theta_variable is None:
            self._theta_variable = keras.Variable(theta, name="theta")
            self.outer_optimizer.build([self._theta_variable])
        self._theta_variable.assign(theta)
        return self.outer_optimizer

    def restore_optimizer(self) -> None:
        """Loads the saved optimizer variables; refuses another optimizer's."""
        saved = self.es["optimizer"]
        variables = self.optimizer().variables
        if len(variables) != len(saved):
            raise ValueError("outer_optimizer does not match the saved search's (different "
                             "number of variables); resume with the same optimizer.")
        for variable, value in zip(variables, saved, strict=True):
            variable.assign(np.asarray(value, variable.dtype))

    # ------------------------------------------------------------------ rounds
    def active_pairs(self) -> list[bool]:
        """Pairs that run this round (the staggered start adds one group at a time)."""
        r = self.es["round_index"]
        if r < self.es["burn_in"]:
            return [r >= w for w in self.es["wait"]]
        return [True] * self.num_pairs

    def credited(self) -> bool:
        """Whether this round's estimate updates theta (every round, but for the
        staggered start of a search saved before its rounds were credited)."""
        es = self.es
        return es["round_index"] >= es["burn_in"] or bool(es.get("credit_burn_in", False))

    def round_size(self, round_index: int | None = None) -> int:
        """Trials in round ``round_index`` (default the current one)."""
        return round_sizes(self.es["wait"], self.num_particles,
                           self.es["round_index"] if round_index is None else round_index)

    def _state(self):
        template = self.estimator.init(self.num_pairs, len(self.es["theta"]))
        return self.estimator.restore_state(self.es["estimator"], template)

    def plan_round(self) -> None:
        """Asks the estimator for this round's perturbations and plans each active
        particle's trial (values stored, never redrawn)."""
        es = self.es
        active = self.active_pairs()
        state, thetas = self.estimator.ask(self._state(), tf.constant(es["theta"], tf.float32),
                                           self.seed, active=tf.constant(active))
        # The saved state already holds this round's draws (a search saved before this
        # marker existed saved the state before ask: `finish_round` asks again then).
        es["estimator"], es["estimator_asked"] = to_json(state), True
        thetas = thetas.numpy().astype(np.float64)
        episode, episode_step = state.episode.numpy(), state.episode_step.numpy()
        pairs = np.arange(self.num_pairs)
        # Every pair's seeds in one call each (twins share them).
        seeds = (_int_seeds(self.seed, noise_lib.STREAM_EPISODE, pairs, episode),
                 _int_seeds(self.seed, noise_lib.STREAM_STEP, pairs, state.steps.numpy()))
        particles, values, meta = [], {}, {}
        for i in range(self.num_particles):
            p = i // 2
            if not active[p]:
                continue
            record = es["particles"][i]
            decoded = self.decode(thetas[i], self._gumbel(p, int(episode[p])))
            if episode_step[p] == 0:
                record["held"] = {n: decoded[n] for n in es["per_episode"] if n in decoded}
            decoded.update({n: v for n, v in record["held"].items() if n in decoded})
            meta[str(i)] = self._metadata(i, int(episode[p]), int(episode_step[p]),
                                          seeds[0][p], seeds[1][p])
            if distributed():
                # Workers learn a trial only through its values (keras-tuner's gRPC).
                decoded.update({PREFIX + k: v for k, v in meta[str(i)].items()})
            particles.append(i)
            values[str(i)] = decoded
        es["round"] = {"particles": particles, "values": values, "meta": meta,
                       "trial_ids": {}, "assigned_at": {}, "results": {}}

    def _metadata(self, i: int, episode: int, window: int, init_seed: int,
                  data_seed: int) -> dict:
        es = self.es
        record = es["particles"][i]
        return {
            "particle": i,
            "round": es["round_index"],
            "outer_step": es["outer_step"],
            "credited": self.credited(),
            "episode": episode,
            "window": window,
            "checkpoint_in": record["checkpoint"] if window else "",
            "checkpoint_out": (f"particle_{i:03d}/episode_{episode:05d}_"
                               f"window_{window + 1:05d}.weights.h5"),
            "checkpoint_stale": record["previous"],
            "init_seed": init_seed,
            "data_seed": data_seed,
            "truncation_length": self.truncation_length,
            "unit": self.unit,
        }

    def _gumbel(self, pair: int, episode: int) -> np.ndarray:
        """Gumbel noise ``[dim]`` for pair ``pair``'s inner problem ``episode``: twins
        share it (common random numbers), and it is redrawn when the episode restarts
        (drawn once per pair and episode, then kept in memory)."""
        cache = self._gumbels
        if (pair, episode) not in cache:
            key = noise_lib.pair_seeds(self.seed, noise_lib.STREAM_CHOICE,
                                       tf.constant([pair]), tf.constant([episode]))[0]
            u = tf.random.stateless_uniform([len(self.es["theta"])], key, 1e-7,
                                            1.0 - 1e-7).numpy()
            if len(cache) > 4 * self.num_particles:
                cache.clear()
            cache[(pair, episode)] = -np.log(-np.log(u.astype(np.float64)))
        return cache[(pair, episode)]

    def assign(self, trial_id: str) -> dict | None:
        """Hands the next unassigned particle of the round to ``trial_id``: its values,
        or None when every particle of the round is out."""
        plan = self.es["round"]
        for i in plan["particles"]:
            key = str(i)
            if key not in plan["trial_ids"]:
                plan["trial_ids"][key] = trial_id
                plan["assigned_at"][key] = time.time()
                self.es["trials"][trial_id] = {k: plan["meta"][key][k] for k in _KEPT}
                return plan["values"][key]
        return None

    def trial_metadata(self, trial_id: str) -> dict | None:
        """The metadata of a trial planned by this state (full while its round runs,
        `_KEPT` after), or None."""
        record = self.es.get("trials", {}).get(trial_id)
        if record is None:
            return None
        plan = self.es["round"]
        key = str(record["particle"])
        if record["round"] == self.es["round_index"] and plan["trial_ids"].get(key) == trial_id:
            return dict(plan["meta"][key])
        return dict(record)

    def record(self, particle: int, trial_id: str, loss: float | None) -> None:
        """Stores particle ``particle``'s reported loss (None: no finite result) for
        trial ``trial_id`` if it is the one this round waits for; finishes the round
        when every particle has reported."""
        plan = self.es["round"]
        key = str(particle)
        if plan["trial_ids"].get(key) != trial_id or key in plan["results"]:
            return
        plan["results"][key] = loss
        if len(plan["results"]) == len(plan["particles"]):
            self.finish_round()

    def finish_round(self) -> None:
        """Tells the estimator the round's reported losses and updates theta."""
        es = self.es
        plan = es["round"]
        reported = np.zeros([self.num_particles], np.float32)
        for key, loss in plan["results"].items():
            reported[int(key)] = np.nan if loss is None else loss
        credited = self.credited()
        state, result, restarted = self._tell(reported, credited)
        if credited:
            self._outer_step(result)
        for i in plan["particles"]:
            record = es["particles"][i]
            record["previous"] = record["checkpoint"]
            # A restarted inner problem (horizon reached or a non-finite loss) starts
            # from fresh weights.
            record["checkpoint"] = "" if restarted[i // 2] else \
                plan["meta"][str(i)]["checkpoint_out"]
        es["estimator"], es["estimator_asked"] = to_json(state), False
        es["round_index"] += 1
        self.plan_round()

    def _tell(self, reported: np.ndarray, credited: bool):
        """One window of the estimator on the reported values: ``(state, WindowResult,
        restarted [pairs])``."""
        est = self.estimator
        active = tf.constant(self.active_pairs())
        state = self._state()
        if not self.es.get("estimator_asked", False):
            state, _ = est.ask(state, tf.constant(self.es["theta"], tf.float32), self.seed,
                               active=active)
        episode = state.episode.numpy()
        losses = tf.constant(reported)
        # Each trial's report is also its meta-loss F_j at the window end.
        meta = (losses[0::2], losses[1::2])
        state, sums, _ = est.tell(state, est.start_window(state), losses, active=active,
                                  meta_losses=lambda: meta, credit=credited)
        finite = np.isfinite(reported[0::2]) & np.isfinite(reported[1::2])
        state, partials, _ = est.finish(
            state, sums, meta_losses=meta if est.credit.final else None,
            finite=tf.constant(finite), credit=credited)
        state, result = est.combine(state, partials)
        return state, result, state.episode.numpy() != episode

    def _outer_step(self, result) -> None:
        """The rule MetaTrainer applies too: skipped without a valid pair, undone (theta
        and the optimizer's slots) when it would leave anything non-finite."""
        es, plan = self.es, self.es["round"]
        self.restore_optimizer()
        applied = bool(outer_update(self.outer_optimizer, self._theta_variable,
                                    result.gradient, result.valid_pairs))
        es["theta"] = [float(v) for v in np.asarray(self._theta_variable.numpy(), np.float32)]
        es["optimizer"] = optimizer_to_json(self.outer_optimizer)
        es["outer_step"] += 1
        losses = [v for v in plan["results"].values() if v is not None]
        mean_loss = float(np.mean(losses)) if losses else None
        es["last_loss"] = mean_loss
        sign = 1.0 if self.direction == "min" else -1.0
        es["history"].append({
            "outer_step": es["outer_step"],
            "round": es["round_index"],
            "trials": [plan["trial_ids"][str(i)] for i in plan["particles"]],
            self.objective_name: None if mean_loss is None else sign * mean_loss,
            "valid_pairs": int(result.valid_pairs),
            "diverged_pairs": int(result.diverged_pairs),
            "clipped_pairs": int(result.clipped_pairs),
            "updated": applied,
            "gradient_norm": float(np.linalg.norm(result.gradient.numpy().astype(np.float64))),
            "gradient": [float(v) for v in result.gradient.numpy()],
            "values": self.decode(np.asarray(es["theta"], np.float64)),
        })


# ---------------------------------------------------------------------- budget
def start_waits(estimator: Estimator, num_particles: int) -> list[int]:
    """Rounds each pair waits before its first trial (the staggered start)."""
    offsets = [int(v) for v in estimator.start_offsets(num_particles // 2).numpy()]
    return [max(offsets) - o for o in offsets]


def round_sizes(waits: list[int], num_particles: int, round_index: int) -> int:
    """Trials in round ``round_index``: both particles of every pair that has started."""
    if round_index >= max(waits, default=0):
        return num_particles
    return 2 * sum(round_index >= w for w in waits)


def plan_rounds(estimator: Estimator, num_particles: int, max_trials: int) -> list[int]:
    """The sizes of the whole rounds that fit in ``max_trials`` trials, one outer step
    each (a search stops before a round it cannot finish)."""
    waits, sizes, total = start_waits(estimator, num_particles), [], 0
    while True:
        size = round_sizes(waits, num_particles, len(sizes))
        if total + size > max_trials:
            return sizes
        sizes.append(size)
        total += size


def first_update_trials(estimator: Estimator, num_particles: int) -> int:
    """Trials a search runs before its first outer step: its first round (during the
    staggered start, the pairs that start first)."""
    return round_sizes(start_waits(estimator, num_particles), num_particles, 0)


# ---------------------------------------------------------------------- JSON


def distributed() -> bool:
    """Whether keras-tuner runs distributed (its chief/worker environment is set)."""
    return bool(os.environ.get("KERASTUNER_ORACLE_IP"))


def to_json(state) -> list:
    """An `EstimatorState` as its flat leaves, nested lists of plain numbers (exact for
    float32/int32)."""
    return [np.asarray(t).tolist() for t in tf.nest.flatten(state)]


def optimizer_to_json(optimizer) -> list:
    return [np.asarray(v.numpy()).tolist() for v in optimizer.variables]


def _int_seeds(seed: int, stream: int, pairs, counters) -> list[int]:
    """Python int seeds (for ``keras.utils.set_random_seed``), one per pair, from
    keras_es's noise keys."""
    keys = noise_lib.pair_seeds(seed, stream, tf.constant(pairs, tf.int32),
                                tf.constant(counters, tf.int32)).numpy()
    return [((int(a) & 0xFFFF) << 15 ^ (int(b) & 0xFFFF)) % (2 ** 31 - 1) for a, b in keys]


def _finite_numbers(value) -> bool:
    """Whether ``value`` is a (nested) list of finite numbers."""
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check(es) -> None:
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


def upgrade(es: dict) -> None:
    """Brings a search state saved by keras_es 0.1 (particle metadata among the trial
    values) to this version's layout, in place."""
    es.setdefault("trials", {})
    plan = es.get("round")
    if plan is not None and "meta" not in plan:
        plan["meta"] = {key: {k[len(PREFIX):]: v for k, v in values.items()
                              if k.startswith(PREFIX)}
                        for key, values in plan["values"].items()}
