"""A particle population training a Keras model, as an unrolled system for the estimators.

One step of the system is one optimizer step of every particle on a minibatch; an
episode is a training run from a fresh initialization. Minibatches are drawn from the
step keys the estimator passes, so the twins of an antithetic pair always see the same
examples (and, through their shared seed states, the same dropout masks), and a run is
reproducible and resumable from its integers alone.
"""

from __future__ import annotations

import tensorflow as tf

from keras_es import checks
from keras_es.engine import Population
from keras_es.engine.population import per_key
from keras_es.unrolled import UnrolledSystem

# The most data as_tensors reads into memory before it calls a dataset endless.
MAX_DATA_BYTES = 4 * 2**30


def as_tensors(data, name: str):
    """``(x, y)`` tensors from arrays or a finite ``tf.data.Dataset`` of ``(x, y)``.

    A dataset of examples, or of batches from ``.batch()``, is read once into memory:
    random access by key is what makes minibatches reproducible per particle.
    """
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise ValueError(f"{name}={data!r} is invalid; expected a dataset of (x, y) pairs.")
        if data.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError(f"{name} is an infinite dataset; expected a finite one "
                             "(drop .repeat()).")
        if spec[0].shape.rank and spec[0].shape[0] is None:
            data = data.unbatch()  # batched by .batch(): back to examples
        xs, ys, size = [], [], 0
        for x, y in data.batch(8192):  # large blocks: far fewer tensors to join
            xs.append(x)
            ys.append(y)
            size += int(tf.size(x)) * x.dtype.size + int(tf.size(y)) * y.dtype.size
            if size > MAX_DATA_BYTES:
                # A dataset of unknown length (from a generator) may never end.
                raise ValueError(
                    f"{name} yielded more than {MAX_DATA_BYTES // 2**30} GiB without ending "
                    "(an endless generator?); the particles hold their data in memory. "
                    "Pass arrays or a finite dataset (e.g. dataset.take(n)).")
        if not xs:
            raise ValueError(f"{name} is an empty dataset.")
        return tf.concat(xs, 0), tf.concat(ys, 0)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{name}={type(data).__name__} is invalid; expected (x, y) arrays or a "
                         "tf.data.Dataset of (x, y).")
    x, y = (tf.convert_to_tensor(a) for a in data)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name} has x with {x.shape[0]} rows and y with {y.shape[0]}; expected "
                         "the same, non-zero number.")
    return x, y


def _data_variable(tensor):
    return tf.Variable(tensor, trainable=False)


class KerasSystem(UnrolledSystem):
    """Trains a `Population` on minibatches; the meta-loss evaluates it on meta data.

    The data is held in ``tf.Variable`` objects: build the system inside
    ``strategy.scope()`` (with the model) to give every replica of a ``tf.distribute``
    strategy its own copy.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_es

    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(256, 8)).astype("float32")
    y_train = rng.integers(0, 3, size=256)
    x_val, y_val = x_train[:64], y_train[:64]
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3)])
    space = keras_es.SearchSpace([keras_es.Hyperparameter("learning_rate", 0.05, "log")])
    population = keras_es.Population(
        model, num_particles=8, space=space,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=keras_es.engine.SGD("learning_rate"))

    system = keras_es.KerasSystem(population, train_data=(x_train, y_train),
                                  meta_data=(x_val, y_val), batch_size=32)
    trainer = keras_es.MetaTrainer(system, keras_es.es_single(0.1, 10, horizon=50),
                                   theta=space, num_particles=population.num_particles)
    trainer.train(3)
    trainer.values                    # {"learning_rate": ...}
    ```

    Args:
        population: The `Population` to train.
        train_data: ``(x, y)`` arrays or a finite ``tf.data.Dataset`` of ``(x, y)``.
        meta_data: Data for the meta-loss (default: ``train_data``).
        batch_size: Training minibatch size.
        meta_batch_size: Meta-loss batch size; ``None`` evaluates all of ``meta_data``.
            A meta batch is drawn once per episode, so it stays fixed while the episode
            runs (what telescoping needs).
        step_loss: What ``step`` reports as the per-step loss credited by
            ``objective="sum"``: ``"train"`` (the minibatch's training loss) or
            ``"meta"`` (the meta-loss after the step, on a meta batch drawn per step).
        shared_batch: Give all particles the same minibatch each step (default: each
            pair its own, twins always sharing).
    """

    def __init__(self, population: Population, train_data, meta_data=None, batch_size: int = 32,
                 meta_batch_size: int | None = None, step_loss: str = "train",
                 shared_batch: bool = False):
        if not isinstance(population, Population):
            raise ValueError(f"population={population!r} is invalid; expected a "
                             "keras_es.Population.")
        checks.positive_int("batch_size", batch_size)
        if meta_batch_size is not None:
            checks.positive_int("meta_batch_size", meta_batch_size)
        if step_loss not in ("train", "meta"):
            raise ValueError(f"step_loss={step_loss!r} is invalid; expected 'train' or 'meta'.")
        self.population = population
        # Variables made in the current strategy's scope: under a tf.distribute strategy
        # every replica then reads its own copy of the data instead of receiving the
        # whole array from the first device at every step.
        self.x, self.y = (_data_variable(t) for t in as_tensors(train_data, "train_data"))
        self.meta_x, self.meta_y = ((_data_variable(t) for t in as_tensors(meta_data, "meta_data"))
                                    if meta_data is not None else (self.x, self.y))
        if step_loss == "meta" and meta_batch_size is None:
            meta_batch_size = batch_size
        self.batch_size, self.meta_batch_size = batch_size, meta_batch_size
        self.step_loss, self.shared_batch = step_loss, bool(shared_batch)

    def init(self, keys):
        return self.population.init(keys)

    def reset(self, state, mask, keys):
        return self.population.reset(state, mask, keys)

    def _batch(self, x, y, keys, size, shared):
        n = tf.shape(x)[0]
        if shared:
            index = tf.random.stateless_uniform([size], keys[0], 0, n, tf.int32)
        else:
            index = per_key(lambda k: tf.random.stateless_uniform([size], k, 0, n, tf.int32),
                             keys, tf.int32)
        return tf.gather(x, index), tf.gather(y, index)

    def step(self, state, theta, keys):
        x, y = self._batch(self.x, self.y, keys, self.batch_size, self.shared_batch)
        state, loss = self.population.train_step(state, theta, x, y)
        if self.step_loss == "meta":
            meta_keys = per_key(lambda k: tf.random.experimental.stateless_fold_in(k, 1), keys,
                                 keys.dtype)
            loss = self._evaluate(state, meta_keys)
        return state, loss, None

    def meta_loss(self, state, keys):
        return self._evaluate(state, keys)

    def hypergradient(self, state, theta, key, particle: int = 0):
        """`Population.hypergradient` of particle ``particle`` on a training minibatch
        and a meta batch drawn with ``key`` (int32 ``[2]``): a Guided ES surrogate."""
        train_key = tf.random.experimental.stateless_fold_in(key, 0)
        meta_key = tf.random.experimental.stateless_fold_in(key, 1)
        x, y = self._batch(self.x, self.y, train_key[None], self.batch_size, True)
        size = self.meta_batch_size or self.batch_size
        meta_x, meta_y = self._batch(self.meta_x, self.meta_y, meta_key[None], size, True)
        return self.population.hypergradient(state, theta, x, y, meta_x, meta_y, particle)

    def _evaluate(self, state, keys):
        if self.meta_batch_size is None:
            return self.population.evaluate(state, tf.convert_to_tensor(self.meta_x),
                                            tf.convert_to_tensor(self.meta_y))["loss"]
        x, y = self._batch(self.meta_x, self.meta_y, keys, self.meta_batch_size, False)
        return self.population.evaluate(state, x, y)["loss"]
