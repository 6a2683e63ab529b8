"""The particle engine: N copies of a Keras model trained in one compiled step.

A `Population` stacks every weight of a Keras model N times (leading particle
dimension) and runs every particle's forward and backward pass at once, in one of two
ways: ``model.stateless_call`` under ``tf.vectorized_map`` with the gradient taken
*inside* the map (a tape around the map is pathologically slow under XLA;
`keras_es.engine.vectorize` swaps Conv2D and max pooling for ops that vectorize while the step
is traced), or, for convolutional Sequential and chain-shaped functional models, with
particles stacked along channels and grouped convolutions (`keras_es.engine.stacked`). It
then applies Keras's own optimizer equations with per-particle hyperparameters. Keras
optimizers bake momentum and betas in as Python floats at trace time and cannot be
stacked per particle, so the update equations of `SGD` and `Adam` are written here,
term for term as in Keras 3.

Per-particle hyperparameters are decoded from one unconstrained vector per particle
(``theta[i]``) through a `SearchSpace`. Non-trainable state (BatchNormalization
statistics, dropout seed generators) is per particle as well.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from keras_es import checks, keras_compat, schedules, tf_compat
from keras_es.engine import initializers, stacked, vectorize
from keras_es.schedules import Schedule, Value
from keras_es.transforms import SearchSpace
from keras_es.unrolled import select

# Reductions for which a Keras loss divides by the number of replicas in sync.
_KERAS_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


class PopulationState(NamedTuple):
    """Every particle's weights and optimizer state (leading dimension N).

    Attributes:
        trainable: One ``[N, *shape]`` tensor per trainable weight of the model.
        non_trainable: One per non-trainable weight (BatchNorm statistics, seeds).
        slots: Optimizer slots, one tuple of ``[N, *shape]`` tensors per slot kind.
        step: int32 ``[N]``, optimizer steps taken since each particle's (re)start.
    """

    trainable: tuple
    non_trainable: tuple
    slots: tuple
    step: tf.Tensor


class _InnerOptimizer:
    """Keras optimizer equations with per-particle hyperparameters."""

    slot_names: tuple[str, ...] = ()

    def __init__(self, learning_rate, weight_decay, l2, per_variable):
        if not isinstance(learning_rate, Schedule):
            _check_constant("learning_rate", learning_rate, 0.0, None, low_open=True)
        _check_constant("weight_decay", weight_decay, 0.0, None)
        _check_constant("l2", l2, 0.0, None)
        self.learning_rate = (learning_rate if isinstance(learning_rate, Schedule)
                              else schedules.Constant(learning_rate))
        self.weight_decay, self.l2 = weight_decay, l2
        self.per_variable = dict(per_variable or {})
        for pattern, roles in self.per_variable.items():
            unknown = set(roles) - set(self._per_variable_roles())
            if unknown:
                raise ValueError(
                    f"per_variable[{pattern!r}] has unknown roles {sorted(unknown)}; expected "
                    f"some of {sorted(self._per_variable_roles())}.")

    def _per_variable_roles(self):
        return ("learning_rate", "learning_rate_multiplier")

    def values(self) -> list[Value]:
        out = [self.learning_rate]
        out += [v for v in (self.weight_decay, self.l2) if v is not None]
        for roles in self.per_variable.values():
            out.extend(roles.values())
        return out

    def _role(self, path, role, default):
        for pattern, roles in self.per_variable.items():
            if role in roles and fnmatch.fnmatch(path, pattern):
                return roles[role]
        return default

    def apply(self, variables, gradients, slots, step, hp, paths):
        """Returns ``(new variables, new slots)``; all tensors ``[N, ...]``."""
        n = tf.shape(step)[0]
        learning_rate = self.learning_rate(tf.cast(step, tf.float32), hp)
        new_vars, new_slots = [], [[] for _ in self.slot_names]
        for i, (var, grad, path) in enumerate(zip(variables, gradients, paths, strict=True)):
            shape = tf.concat([[n], tf.ones([tf.rank(var) - 1], tf.int32)], 0)
            multiplier = schedules.resolve(self._role(path, "learning_rate_multiplier", 1.0),
                                           hp, n)
            own = self._role(path, "learning_rate", None)
            base = learning_rate if own is None else schedules.resolve(own, hp, n)
            lr = tf.reshape(base * multiplier, shape)
            if self.l2 is not None and path.endswith(("kernel", "embeddings")):
                # d/dw of l2 * sum(w^2), Keras's L2 regularizer
                grad = grad + 2.0 * tf.reshape(schedules.resolve(self.l2, hp, n), shape) * var
            if self.weight_decay is not None:
                wd = tf.reshape(schedules.resolve(self.weight_decay, hp, n), shape)
                var = var - var * wd * lr  # Keras: decay applied before the update
            var_slots = [s[i] for s in slots]
            var, var_slots = self._update(var, grad, var_slots, lr, step, hp, path, shape)
            new_vars.append(var)
            for k, s in enumerate(var_slots):
                new_slots[k].append(s)
        return tuple(new_vars), tuple(tuple(s) for s in new_slots)


class SGD(_InnerOptimizer):
    """SGD with momentum and Nesterov, as ``keras.optimizers.SGD``.

    Args:
        learning_rate: A number, a hyperparameter name, or a `Schedule`.
        momentum: A number or a hyperparameter name.
        nesterov: Nesterov momentum (static).
        weight_decay: Optional decoupled weight decay (Keras semantics), number or name.
        l2: Optional L2 penalty ``l2 * sum(w^2)`` on kernels and embeddings (variables
            whose path matches ``*kernel`` or ``*embeddings``), number or name.
        per_variable: ``{glob pattern on variable path: {role: value}}``, per weight-block
            values; roles ``"learning_rate"`` (replaces the schedule),
            ``"learning_rate_multiplier"`` and ``"momentum"``. The first matching
            pattern that sets a role wins.
    """

    slot_names = ("momentum",)

    def __init__(self, learning_rate: Value | Schedule = 0.01, momentum: Value = 0.0,
                 nesterov: bool = False, weight_decay: Value | None = None,
                 l2: Value | None = None,
                 per_variable: Mapping[str, Mapping[str, Value]] | None = None):
        _check_constant("momentum", momentum, 0.0, 1.0, high_open=True)
        checks.boolean("nesterov", nesterov)
        self.momentum, self.nesterov = momentum, nesterov
        super().__init__(learning_rate, weight_decay, l2, per_variable)

    def _per_variable_roles(self):
        return ("learning_rate", "learning_rate_multiplier", "momentum")

    def values(self):
        return super().values() + [self.momentum]

    def _update(self, var, grad, slots, lr, step, hp, path, shape):
        (m,) = slots
        n = tf.shape(step)[0]
        momentum = tf.reshape(schedules.resolve(self._role(path, "momentum", self.momentum),
                                                hp, n), shape)
        m = m * momentum - grad * lr
        if self.nesterov:
            var = var + (m * momentum - grad * lr)
        else:
            var = var + m
        return var, [m]


class Adam(_InnerOptimizer):
    """Adam, as ``keras.optimizers.Adam`` (without amsgrad).

    Args:
        learning_rate: A number, a hyperparameter name, or a `Schedule`.
        beta_1: A number or a hyperparameter name.
        beta_2: A number or a hyperparameter name.
        epsilon: A number.
        weight_decay: Optional decoupled weight decay (Keras semantics).
        l2: Optional L2 penalty on kernels and embeddings, as for `SGD`.
        per_variable: ``{glob pattern: {"learning_rate": v,
            "learning_rate_multiplier": v}}``.
    """

    slot_names = ("m", "v")

    def __init__(self, learning_rate: Value | Schedule = 0.001, beta_1: Value = 0.9,
                 beta_2: Value = 0.999, epsilon: float = 1e-7,
                 weight_decay: Value | None = None, l2: Value | None = None,
                 per_variable: Mapping[str, Mapping[str, Value]] | None = None):
        _check_constant("beta_1", beta_1, 0.0, 1.0, high_open=True)
        _check_constant("beta_2", beta_2, 0.0, 1.0, high_open=True)
        checks.positive_float("epsilon", epsilon)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, float(epsilon)
        super().__init__(learning_rate, weight_decay, l2, per_variable)

    def values(self):
        return super().values() + [self.beta_1, self.beta_2]

    def _update(self, var, grad, slots, lr, step, hp, path, shape):
        m, v = slots
        n = tf.shape(step)[0]
        beta_1 = tf.reshape(schedules.resolve(self.beta_1, hp, n), shape)
        beta_2 = tf.reshape(schedules.resolve(self.beta_2, hp, n), shape)
        local_step = tf.reshape(tf.cast(step + 1, tf.float32), shape)
        alpha = lr * tf.sqrt(1.0 - tf.pow(beta_2, local_step)) / (1.0 - tf.pow(beta_1, local_step))
        m = m + (grad - m) * (1.0 - beta_1)
        v = v + (tf.square(grad) - v) * (1.0 - beta_2)
        var = var - (m * alpha) / (tf.sqrt(v) + self.epsilon)
        return var, [m, v]


_WARNED: set = set()


def _check_constant(name, value, low, high, low_open=False, high_open=False) -> None:
    """A constant optimizer value (not a hyperparameter name) must lie in its domain:
    ``momentum=-1`` or ``beta_1=1.5`` would train, wrongly, without a word."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
            np.isfinite(value)
            and (value > low if low_open else value >= low)
            and (high is None or (value < high if high_open else value <= high))):
        interval = (("(" if low_open else "[") + f"{low}, "
                    + ("inf)" if high is None else f"{high}" + (")" if high_open else "]")))
        raise ValueError(f"{name}={value!r} is invalid; expected a hyperparameter name or a "
                         f"number in {interval}.")


class _FunctionLoss(keras.losses.Loss):
    """A loss function as a ``keras.losses.Loss`` with ``compile``'s reduction (the
    batch mean). Keras wraps function losses in its ``LossFunctionWrapper``, which it
    does not export; this is the same: targets and predictions brought to the same
    rank when one has an extra trailing axis of 1, then the function per example."""

    def __init__(self, function, name=None):
        super().__init__(name=name or getattr(function, "__name__", None))
        self.function = function

    def call(self, y_true, y_pred):
        if y_true.shape.rank == y_pred.shape.rank + 1 and y_true.shape[-1] == 1:
            y_true = tf.squeeze(y_true, -1)
        elif y_pred.shape.rank == y_true.shape.rank + 1 and y_pred.shape[-1] == 1:
            y_true = tf.expand_dims(y_true, -1) if y_true.shape.rank == 1 else y_true
            y_pred = y_pred if y_true.shape.rank == y_pred.shape.rank else tf.squeeze(y_pred,
                                                                                        -1)
        return self.function(y_true, y_pred)


class _ByShape(keras.losses.Loss):
    """``loss="crossentropy"`` (or ``"ce"``): binary, sparse or categorical
    cross-entropy picked from the shapes of the targets and predictions, as Keras's
    ``compile`` does."""

    def call(self, y_true, y_pred):
        if y_pred.shape[-1] == 1:
            function = keras.losses.binary_crossentropy
        elif y_true.shape.rank == y_pred.shape.rank - 1 or y_true.shape[-1] == 1:
            function = keras.losses.sparse_categorical_crossentropy
        else:
            function = keras.losses.categorical_crossentropy
        return _FunctionLoss(function).call(y_true, y_pred)


def resolve_loss(loss):
    """A loss as ``model.compile`` accepts it, made a callable ``(y_true, y_pred)``.

    Strings (``"mse"``, ``"sparse_categorical_crossentropy"``, ...) and plain functions
    (which return one value per example) are wrapped as ``compile`` wraps them, so the
    particles train on the batch mean Keras's ``fit`` trains on. ``keras.losses.Loss``
    objects are used as they are. Raises ``ValueError`` for anything else (a dict or
    list of losses for several outputs).
    """
    if isinstance(loss, keras.losses.Loss):
        return loss
    if isinstance(loss, str) and loss.lower() in ("crossentropy", "ce"):
        return _ByShape(name=loss)
    if isinstance(loss, str):
        try:
            function = keras.losses.get(loss)
        except ValueError as error:
            raise ValueError(f"loss={loss!r} is invalid; expected a name keras.losses.get "
                             f"knows ({error}).") from None
        if isinstance(function, keras.losses.Loss):
            return function
        return _FunctionLoss(function, name=loss)
    if callable(loss):
        return _FunctionLoss(loss)
    raise ValueError(f"loss={loss!r} is invalid; expected one loss for the model's single "
                     "output: a keras.losses.Loss, a loss name such as 'mse', or a function "
                     "(y_true, y_pred) -> loss.")


def _choose_stacked(model: keras.Model, execution: str) -> bool:
    """Whether a population of ``model`` runs stacked, for ``execution`` ("auto",
    "vectorized" or "stacked"); raises for an explicit "stacked" that cannot run."""
    if execution == "vectorized":
        return False
    if execution == "stacked":
        reason = stacked.unsupported_reason(model)
        if reason:
            raise ValueError(f"execution='stacked' is invalid for this model: {reason}; "
                             "use 'vectorized'.")
        reason = stacked.missing_kernel(model)
        if reason:
            raise ValueError(f"execution='stacked' cannot run here: {reason}. Use "
                             f"execution='vectorized' (or 'auto'), or, {stacked.ONEDNN_TIP}.")
        return True
    if not stacked.worthwhile(model):
        return False
    reason = stacked.missing_kernel(model)
    if reason:
        # Once per process (the device does not change), not once per population.
        if not _WARNED:
            _WARNED.add(reason)
            warnings.warn(
                f"keras_es: running the particles vectorized instead of stacked, which is "
                f"about half as fast on convolutional models: {reason}. To get the stacked "
                f"speed, {stacked.ONEDNN_TIP}.", RuntimeWarning, stacklevel=3)
        return False
    return True


def check_optimizer(optimizer, space: SearchSpace) -> None:
    """Raises ``ValueError`` unless ``optimizer`` is an inner optimizer whose
    hyperparameter names all belong to ``space``."""
    if not isinstance(optimizer, _InnerOptimizer):
        raise ValueError(f"optimizer={optimizer!r} is invalid; expected "
                         "keras_es.engine.SGD(...) or keras_es.engine.Adam(...).")
    missing = sorted({n for v in optimizer.values() for n in schedules.names(v)}
                     - set(space.names))
    if missing:
        raise ValueError(f"optimizer refers to hyperparameters {missing} that space does "
                         f"not declare; space has {space.names}.")


class Population:
    """N copies of a Keras model with per-particle hyperparameters.

    The population itself is stateless: `init` creates a `PopulationState` and every
    method maps states to states, so one compiled step serves any number of calls and
    the states can live wherever the caller keeps them (``tf.Variable`` objects,
    checkpoints, a `keras_es.MetaTrainer`).

    Example:

    ```python
    import keras
    import numpy as np
    import tensorflow as tf
    import keras_es

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3)])
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.05, "log")])
    population = keras_es.Population(model, num_particles=4, space=space,
                                     loss=keras.losses.SparseCategoricalCrossentropy(
                                         from_logits=True),
                                     optimizer=keras_es.engine.SGD("lr", momentum=0.9))
    keys = tf.random.stateless_uniform([4, 2], seed=[0, 1], maxval=2**31 - 1,
                                       dtype=tf.int32)
    state = population.init(keys)                       # 4 particles' weights
    theta = tf.constant(np.log([[0.01], [0.03], [0.1], [0.3]]), tf.float32)
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, size=32)
    state, loss = population.train_step(state, theta, x, y)   # loss: [4]
    ```

    Args:
        model: A built Keras model (Sequential or functional).
        num_particles: N.
        space: The `SearchSpace` that theta's columns decode with.
        loss: What ``model.compile(loss=...)`` takes for one output: a
            ``keras.losses.Loss`` (any reduction; with ``None`` the per-example losses
            are summed, as Keras's ``fit`` differentiates them), a name such as
            ``"mse"`` or ``"sparse_categorical_crossentropy"``, or a function
            ``loss(y_true, y_pred)`` (see `resolve_loss`).
        optimizer: `SGD` or `Adam` (inner optimizer with per-particle values).
        metrics: ``{name: fn(y_true, y_pred) -> per-example values}`` for `evaluate`.
        initialize: ``"initializers"`` draws each particle's initial weights from the
            model's own initializers with its key (weights whose initializer is unknown
            or deterministic are copied from the model); ``"copy"`` starts every
            particle from the model's current weights.
        layer_hyperparameters: ``{glob pattern on a non-trainable variable's path:
            hyperparameter name}``: scalar layer variables set per particle from theta
            before every step, such as `keras_es.layers.UnitMask` widths
            (``"*width_1/units"``) and `keras_es.layers.Dropout` rates.
        execution: How the particles run: ``"vectorized"`` (``tf.vectorized_map`` over
            ``model.stateless_call``, any model; fastest under XLA), ``"stacked"``
            (particles stacked along channels with grouped convolutions, see
            `keras_es.engine.stacked`; Sequential or chain-shaped functional models of
            Conv2D, pooling, padding, BatchNormalization, Dropout, Flatten, Dense and
            activations; fastest without XLA; needs gradient kernels for grouped
            convolutions, which CPUs have only with TensorFlow's oneDNN kernels on), or
            ``"auto"`` (default): stacked for a model it supports that has a Conv2D when
            the device has those kernels (probed once per process, see
            `keras_es.engine.stacked.missing_kernel`), vectorized otherwise, with one warning
            saying why. An explicit ``"stacked"`` that cannot run raises at once.
    """

    def __init__(self, model: keras.Model, num_particles: int, space: SearchSpace, loss,
                 optimizer: _InnerOptimizer, metrics: Mapping[str, Callable] | None = None,
                 initialize: str = "initializers",
                 layer_hyperparameters: Mapping[str, str] | None = None,
                 execution: str = "auto"):
        _check_population(model, num_particles, space, optimizer, initialize, execution)
        self.stacked = _choose_stacked(model, execution)
        self.model, self.num_particles, self.space = model, num_particles, space
        self.loss, self.optimizer = resolve_loss(loss), optimizer
        self.metrics = dict(metrics or {})
        self.initialize = initialize
        self.trainable_paths = [v.path for v in model.trainable_variables]
        self._init_specs = _initializer_specs(model)
        self._bound = _bind_layer_hyperparameters(model, space,
                                                  dict(layer_hyperparameters or {}))

    def _with_layer_hyperparameters(self, state, hp):
        if not self._bound:
            return state
        values = list(state.non_trainable)
        for i, name in self._bound.items():
            values[i] = tf.cast(hp[name], values[i].dtype)
        return state._replace(non_trainable=tuple(values))

    # ------------------------------------------------------------------ state
    def init(self, keys: tf.Tensor) -> PopulationState:
        """Fresh particles: weights from ``keys`` (``[N, 2]`` int32), zero optimizer state.

        Twins of an antithetic pair get equal keys and so equal initial weights and
        dropout seeds.
        """
        values = []
        for index, (variable, init) in enumerate(self._init_specs):
            value = tf.convert_to_tensor(variable.value)
            if "seed_generator_state" in variable.path:
                values.append(_seed_states(keys, index, value.dtype))
            elif self.initialize == "initializers" and init is not None:
                values.append(per_key(
                    lambda k, init=init, value=value, index=index: initializers.sample(
                        init, value.shape, tf.random.experimental.stateless_fold_in(k, index),
                        value),
                    keys, value.dtype))
            else:
                values.append(tf.tile(value[None], [tf.shape(keys)[0]] + [1] * value.shape.rank))
        n_train = len(self.model.trainable_variables)
        trainable = tuple(values[:n_train])
        slots = tuple(tuple(tf.zeros_like(v) for v in trainable)
                      for _ in self.optimizer.slot_names)
        return PopulationState(trainable, tuple(values[n_train:]), slots,
                               tf.zeros([tf.shape(keys)[0]], tf.int32))

    def reset(self, state: PopulationState, mask: tf.Tensor, keys: tf.Tensor) -> PopulationState:
        """Re-initializes the particles where ``mask`` is true (an episode restart)."""
        return select(mask, self.init(keys), state)

    def hyperparameters(self, theta: tf.Tensor) -> dict:
        """``{name: [N]}`` natural-unit values decoded from theta ``[N, dim]``."""
        return self.space.decode(tf.convert_to_tensor(theta, tf.float32))

    # ------------------------------------------------------------------ steps
    def _loss(self, y, y_pred):
        loss = tf.cast(self.loss(y, y_pred), tf.float32)
        if loss.shape.rank:
            # reduction=None: Keras's fit differentiates the sum of the per-example
            # losses (the gradient of a non-scalar target); train on the same.
            loss = tf.reduce_sum(loss)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if (replicas > 1 and isinstance(self.loss, keras.losses.Loss)
                and self.loss.reduction in _KERAS_MEAN_REDUCTIONS):
            # Under a tf.distribute strategy a Keras loss divides its mean by the number
            # of replicas, taking each replica's batch for a shard of one global batch.
            # A particle's batch is whole on its replica: undo the division.
            loss = loss * float(replicas)
        return loss

    @property
    def layer_hyperparameter_indices(self) -> dict[int, str]:
        """``{index into model.non_trainable_variables: hyperparameter name}``: the scalar
        layer variables that ``layer_hyperparameters`` binds, which every step sets per
        particle from theta (a copy; changing it changes nothing)."""
        return dict(self._bound)

    @property
    def xla_friendly(self) -> bool:
        """Whether the step runs faster compiled with XLA (``jit_compile=True``): True
        for vectorized execution, False for stacked (XLA's grouped convolutions are
        slow on a CPU)."""
        return not self.stacked

    @staticmethod
    def _per_particle(fn, y, y_pred, per_particle):
        """``[N]``: ``fn(y_true, y_pred)`` for each particle's predictions ``[N, B, ...]``."""
        if per_particle:
            return tf.vectorized_map(lambda a: fn(a[0], a[1]), (y, y_pred))
        return tf.vectorized_map(lambda p: fn(y, p), y_pred)

    def _stacked_forward(self, trainable, non_trainable, x, per_particle, training):
        """``(y_pred [N, B, ...], non_trainable)`` of the stacked forward pass."""
        n = trainable[0].shape[0] or tf.shape(trainable[0])[0]
        return stacked.forward(self.model, trainable, non_trainable, x, n, per_particle,
                               training)

    def _scores(self, y_true, y_pred) -> dict:
        """One particle's loss and metrics (scalars), as `evaluate` reports them."""
        out = {"loss": self._loss(y_true, y_pred)}
        for name, fn in self.metrics.items():
            out[name] = tf.reduce_mean(tf.cast(fn(y_true, y_pred), tf.float32))
        return out

    def train_step(self, state: PopulationState, theta: tf.Tensor, x, y):
        """One optimizer step for every particle.

        Args:
            state: The population's state.
            theta: float32 ``[N, dim]`` unconstrained hyperparameters.
            x: A batch shared by all particles (``[B, ...]``), or one batch per
                particle (``[N, B, ...]``) when ``x`` has one more dimension than the
                model's input.
            y: The matching targets.

        Returns:
            ``(new_state, loss [N])``.
        """
        hp = self.hyperparameters(theta)
        state = self._with_layer_hyperparameters(state, hp)
        per_particle = self._per_particle_batch(x)
        model = self.model

        def one(args):
            trainable, non_trainable = list(args[0]), list(args[1])
            xb, yb = (args[2], args[3]) if per_particle else (x, y)
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                y_pred, non_trainable, losses = model.stateless_call(
                    trainable, non_trainable, xb, training=True, return_losses=True)
                loss = self._loss(yb, y_pred)
                if losses:  # the model's own regularizers, as Keras's fit adds them
                    loss += tf.add_n([tf.cast(v, tf.float32) for v in losses])
            return loss, tuple(tape.gradient(loss, trainable)), tuple(non_trainable)

        if self.stacked:
            trainable = list(state.trainable)
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                y_pred, non_trainable = self._stacked_forward(
                    trainable, state.non_trainable, x, per_particle, training=True)
                loss = self._per_particle(self._loss, y, y_pred, per_particle)
                total = tf.reduce_sum(loss)  # particles are independent: d total / d w_n
            grads = tuple(tape.gradient(total, trainable))
        else:
            args = (state.trainable, state.non_trainable) + ((x, y) if per_particle else ())
            with vectorize.pfor_friendly(model):
                loss, grads, non_trainable = tf.vectorized_map(one, args)
        trainable, slots = self.optimizer.apply(state.trainable, grads, state.slots, state.step,
                                                hp, self.trainable_paths)
        return PopulationState(trainable, tuple(non_trainable), slots, state.step + 1), loss

    def evaluate(self, state: PopulationState, x, y, theta: tf.Tensor | None = None) -> dict:
        """Loss and metrics ``{name: [N]}`` of every particle (inference mode).

        ``theta`` is needed only to set layer hyperparameters (widths) first; without
        it the values from the last training step are used.
        """
        if theta is not None:
            state = self._with_layer_hyperparameters(state, self.hyperparameters(theta))
        per_particle = self._per_particle_batch(x)
        model = self.model

        def one(args):
            xb, yb = (args[2], args[3]) if per_particle else (x, y)
            y_pred, _ = model.stateless_call(list(args[0]), list(args[1]), xb, training=False)
            return self._scores(yb, y_pred)

        if self.stacked:
            y_pred, _ = self._stacked_forward(state.trainable, state.non_trainable, x,
                                              per_particle, training=False)
            return self._per_particle(self._scores, y, y_pred, per_particle)
        args = (state.trainable, state.non_trainable) + ((x, y) if per_particle else ())
        with vectorize.pfor_friendly(model):
            return tf.vectorized_map(one, args)

    def hypergradient(self, state: PopulationState, theta: tf.Tensor, x, y, meta_x, meta_y,
                      particle: int = 0) -> tf.Tensor:
        """The one-step hypergradient: d meta-loss(after one step) / d theta.

        Differentiates the meta-loss on ``(meta_x, meta_y)`` after one training step of
        particle ``particle`` on ``(x, y)`` with respect to its hyperparameters ``theta``
        (``[dim]``), through the learning rate, momentum, betas, weight decay and layer
        hyperparameters: a cheap, biased surrogate for the gradient of a long unroll,
        the "one step of BPTT" direction Guided ES concentrates its perturbations on.

        Returns:
            float32 ``[dim]``; zeros where the result is not finite.
        """
        one = tf.nest.map_structure(lambda t: t[particle:particle + 1], state)
        theta = tf.convert_to_tensor(theta, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(theta)
            new_state, _ = self.train_step(one, theta[None], x, y)
            loss = self.evaluate(new_state, meta_x, meta_y, theta[None])["loss"][0]
        gradient = tape.gradient(loss, theta)
        if gradient is None:  # theta does not reach the loss at all
            return tf.zeros_like(theta)
        return tf.where(tf.math.is_finite(gradient), gradient, 0.0)

    def _per_particle_batch(self, x) -> bool:
        rank = len(self.model.inputs[0].shape) if getattr(self.model, "inputs", None) else None
        return rank is not None and len(x.shape) == rank + 1

    # ------------------------------------------------------------------ helpers
    def set_weights(self, state: PopulationState, particle: int, model: keras.Model | None = None):
        """Copies particle ``particle``'s weights into ``model`` (default: the template)."""
        model = model or self.model
        for variable, value in zip(model.trainable_variables, state.trainable, strict=True):
            variable.assign(value[particle])
        for variable, value in zip(model.non_trainable_variables, state.non_trainable, strict=True):
            variable.assign(value[particle])

    def copy_state(self, model: keras.Model | None = None) -> PopulationState:
        """Every particle starts from ``model``'s (default: the template's) weights."""
        model = model or self.model
        n = self.num_particles
        tile = lambda v: tf.tile(tf.convert_to_tensor(v.value)[None],  # noqa: E731
                                 [n] + [1] * len(v.shape))
        trainable = tuple(tile(v) for v in model.trainable_variables)
        slots = tuple(tuple(tf.zeros_like(v) for v in trainable)
                      for _ in self.optimizer.slot_names)
        return PopulationState(trainable, tuple(tile(v) for v in model.non_trainable_variables),
                               slots, tf.zeros([n], tf.int32))

    def count_flops_per_example(self) -> int:
        """Multiply-adds x 2 of one forward pass (for benchmarks); see
        `count_flops_per_example`."""
        return count_flops_per_example(self.model)


def _check_population(model, num_particles, space, optimizer, initialize, execution):
    """`Population`'s argument checks, before any work."""
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(f"model={model!r} is invalid; expected a built keras.Model "
                         "(give it an Input or call it once).")
    checks.positive_int("num_particles", num_particles)
    if not isinstance(space, SearchSpace):
        raise ValueError(f"space={space!r} is invalid; expected a keras_es.SearchSpace.")
    check_optimizer(optimizer, space)
    if initialize not in ("initializers", "copy"):
        raise ValueError(f"initialize={initialize!r} is invalid; expected "
                         "'initializers' or 'copy'.")
    if execution not in ("auto", "vectorized", "stacked"):
        raise ValueError(f"execution={execution!r} is invalid; expected 'auto', "
                         "'vectorized' or 'stacked'.")


def _bind_layer_hyperparameters(model, space, bindings):
    """``{non-trainable index: hyperparameter name}`` for the given patterns."""
    bound = {}
    for pattern, name in bindings.items():
        if name not in space.names:
            raise ValueError(f"layer_hyperparameters[{pattern!r}]={name!r} is not in space; "
                             f"expected one of {space.names}.")
        hits = [i for i, v in enumerate(model.non_trainable_variables)
                if fnmatch.fnmatch(v.path, pattern)]
        if not hits:
            paths = [v.path for v in model.non_trainable_variables]
            raise ValueError(f"layer_hyperparameters pattern {pattern!r} matches no "
                             f"non-trainable variable; the model has {paths}.")
        for i in hits:
            if len(model.non_trainable_variables[i].shape) != 0:
                raise ValueError(f"layer_hyperparameters pattern {pattern!r} matches "
                                 f"{model.non_trainable_variables[i].path}, which is "
                                 "not a scalar.")
            bound[i] = name
    return bound


def _initializer_specs(model):
    """``(variable, initializer or None)`` for every variable of ``model``."""
    owner = {}
    for layer in keras_compat.sublayers(model):
        for v in keras_compat.own_variables(layer):
            owner[id(v)] = layer
    specs = []
    for v in model.trainable_variables + model.non_trainable_variables:
        layer = owner.get(id(v))
        init = initializers.find_initializer(layer, v) if layer is not None else None
        specs.append((v, init))
    return specs


# Up to this many keys, a per-key draw is written out once per key: N small ops that
# the executor runs side by side. A tf.map_fn loop draws the same numbers, but its
# iterations cost more than the draws (a step's three loops took ~7 of a window's
# ~80 ms for 32 particles of a small MLP, 2 CPU cores); past this many keys, the
# written-out graph would take longer to trace and optimize than it saves. Under XLA
# the loop costs nothing and the written-out graph costs compilation time: for 64
# particles of a 64-100-100-10 MLP, ESCallback's two compilations took 90 s each
# written out and 6 s each as loops, with the same window time (2 CPU cores).
MAX_UNROLLED_KEYS = 64


def per_key(fn, keys, dtype):
    """``tf.stack([fn(k) for k in keys])`` for int32 ``keys`` ``[N, 2]``."""
    n = keys.shape[0]
    if n is not None and n <= MAX_UNROLLED_KEYS and not tf_compat.compiling_with_xla():
        return tf.stack([fn(key) for key in tf.unstack(keys)])
    return tf.map_fn(fn, keys, fn_output_signature=dtype)


def _seed_states(keys, index, dtype):
    folded = per_key(lambda k: tf.random.experimental.stateless_fold_in(k, index), keys,
                     tf.int32)
    return tf.cast(folded, dtype)


def count_flops_per_example(model: keras.Model) -> int:
    """Multiply-adds x 2 of one forward pass (for benchmarks).

    Counts ``Dense`` layers on 2-D inputs and ``Conv2D`` layers only: a Dense layer
    applied per position of a longer input is counted once, and other layers
    (Conv1D/3D, depthwise, separable, transposed, EinsumDense, recurrent) not at all.
    """
    flops = 0
    for layer in keras_compat.sublayers(model):
        if isinstance(layer, keras.layers.Dense):
            flops += 2 * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Conv2D):
            out = layer.output.shape
            flops += 2 * int(np.prod(layer.kernel.shape)) * int(out[1]) * int(out[2])
    return flops
