"""The particle engine: equivalence with Keras optimizers, per-particle state, resets."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es import engine

N = 3
STEPS = 20


def _model(seed=0, batch_norm=True, l2=None):
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2) if l2 else None
    layers = [keras.Input((6,)), keras.layers.Dense(8, activation="relu", kernel_regularizer=reg)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers += [keras.layers.Dense(8, activation="tanh", kernel_regularizer=reg),
               keras.layers.Dense(3, kernel_regularizer=reg)]
    return keras.Sequential(layers)


def _batches():
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(16, 6)).astype("float32"), rng.integers(0, 3, 16))
            for _ in range(STEPS)]


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _keras_reference(optimizer, l2=None):
    model = _model(l2=l2)
    model.compile(optimizer=optimizer, loss=LOSS)
    for x, y in _batches():
        model.train_on_batch(x, y)
    return model


CASES = {
    "sgd": (lambda: keras.optimizers.SGD(0.05),
            lambda: engine.SGD("lr"), {"lr": 0.05}),
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.05, momentum=0.9),
                     lambda: engine.SGD("lr", momentum="momentum"),
                     {"lr": 0.05, "momentum": 0.9}),
    "sgd_nesterov_wd": (lambda: keras.optimizers.SGD(0.05, momentum=0.8, nesterov=True,
                                                     weight_decay=0.01),
                        lambda: engine.SGD("lr", momentum="momentum", nesterov=True,
                                           weight_decay="wd"),
                        {"lr": 0.05, "momentum": 0.8, "wd": 0.01}),
    "adam": (lambda: keras.optimizers.Adam(0.01, beta_1=0.8, beta_2=0.99),
             lambda: engine.Adam("lr", beta_1="beta_1", beta_2="beta_2"),
             {"lr": 0.01, "beta_1": 0.8, "beta_2": 0.99}),
    # The model's own regularizers count, as in fit ...
    "sgd_model_regularizer": (lambda: keras.optimizers.SGD(0.05, momentum=0.9),
                              lambda: engine.SGD("lr", momentum="momentum"),
                              {"lr": 0.05, "momentum": 0.9}, {"l2": 0.01}, {"l2": 0.01}),
    # ... and the engine's per-particle l2 is the same penalty.
    "sgd_engine_l2": (lambda: keras.optimizers.SGD(0.05, momentum=0.9),
                      lambda: engine.SGD("lr", momentum="momentum", l2="l2"),
                      {"lr": 0.05, "momentum": 0.9, "l2": 0.01}, {"l2": 0.01}, {}),
    "adam_schedule": (
        lambda: keras.optimizers.Adam(keras.optimizers.schedules.InverseTimeDecay(
            0.01, decay_steps=5, decay_rate=1.0)),
        lambda: engine.Adam(keras_es.schedules.InverseTimeDecay("lr", 5.0, 1.0)),
        {"lr": 0.01}),
}

TRANSFORMS = {"lr": "log", "momentum": "logit", "wd": "log", "l2": "log", "beta_1": "logit",
              "beta_2": "log_one_minus"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_keras_optimizer(name):
    keras_optimizer, engine_optimizer, values, *model_kwargs = CASES[name]
    reference_kwargs, engine_kwargs = model_kwargs or ({}, {})
    reference = _keras_reference(keras_optimizer(), **reference_kwargs)
    space = keras_es.SearchSpace([keras_es.Hyperparameter(k, v, TRANSFORMS[k])
                                  for k, v in values.items()])
    template = _model(**engine_kwargs)
    population = keras_es.Population(template, N, space, LOSS, engine_optimizer(),
                                     initialize="copy")
    state = population.copy_state()
    theta = tf.tile(space.encode()[None], [N, 1])
    step = tf.function(population.train_step, jit_compile=True)
    for x, y in _batches():
        state, loss = step(state, theta, x, y)
    assert np.all(state.step.numpy() == STEPS)
    for i in range(N):
        for ref, got in zip(reference.trainable_variables + reference.non_trainable_variables,
                            state.trainable + state.non_trainable, strict=True):
            np.testing.assert_allclose(got.numpy()[i], ref.numpy(), rtol=2e-4, atol=2e-5,
                                       err_msg=f"{name}: {ref.path}")


@pytest.fixture(scope="module")
def mlp_population():
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.1, "log")])
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dropout(0.5), keras.layers.BatchNormalization(),
                              keras.layers.Dense(3)])
    return keras_es.Population(model, 4, space, LOSS, engine.SGD("lr"),
                               metrics={"accuracy": keras.metrics.sparse_categorical_accuracy})


def test_per_particle_initialization_and_twins(mlp_population):
    keys = tf.constant([[1, 2], [1, 2], [3, 4], [3, 4]], tf.int32)
    state = mlp_population.init(keys)
    kernel = state.trainable[0].numpy()
    np.testing.assert_array_equal(kernel[0], kernel[1])
    assert not np.allclose(kernel[0], kernel[2])
    # Drawn from the model's own initializer (Glorot uniform) limits.
    limit = np.sqrt(6.0 / (6 + 8))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.8 * limit
    np.testing.assert_array_equal(state.trainable[1].numpy(), 0.0)  # zeros bias


def test_dropout_masks_shared_by_twins_distinct_across_pairs(mlp_population):
    keys = tf.constant([[1, 2], [1, 2], [3, 4], [3, 4]], tf.int32)
    state = mlp_population.init(keys)
    # Same weights everywhere, so only dropout masks can differ.
    copied = mlp_population.copy_state()
    state = state._replace(trainable=copied.trainable)
    theta = tf.zeros([4, 1]) + np.log(0.1)
    x = np.random.default_rng(1).normal(size=(32, 6)).astype("float32")
    y = np.zeros(32, np.int64)
    state, loss = mlp_population.train_step(state, theta, x, y)
    loss = loss.numpy()
    assert loss[0] == loss[1] and loss[2] == loss[3] and loss[0] != loss[2]


def test_per_key_draws_are_written_out_in_graphs_and_a_loop_under_xla():
    from keras_es.engine.population import per_key

    keys = tf.constant([[i, 7] for i in range(6)], tf.int32)

    def draw(keys):
        return per_key(lambda k: tf.random.stateless_uniform([3], k), keys, tf.float32)

    loops = {}
    for jit in (False, True):
        # XLA's stateless generator gives other numbers than TensorFlow's kernels: each
        # mode is compared with one draw per key in that mode.
        one = tf.function(lambda k: tf.random.stateless_uniform([3], k), jit_compile=jit)
        expected = np.stack([one(k).numpy() for k in keys])
        fn = tf.function(draw, jit_compile=jit)
        np.testing.assert_allclose(fn(keys).numpy(), expected, rtol=1e-6)
        ops = fn.get_concrete_function(keys).graph.get_operations()
        loops[jit] = sum(op.type in ("While", "StatelessWhile") for op in ops)
    # Written out in graph mode (cheaper for the executor); under XLA a loop, which
    # compiles in a fraction of the time for many keys.
    assert loops == {False: 0, True: 1}


def test_reset_restores_fresh_particles_only(mlp_population):
    keys = tf.constant([[1, 2], [1, 2], [3, 4], [3, 4]], tf.int32)
    fresh = mlp_population.init(keys)
    theta = tf.zeros([4, 1]) + np.log(0.1)
    x = np.random.default_rng(1).normal(size=(32, 6)).astype("float32")
    y = np.zeros(32, np.int64)
    trained, _ = mlp_population.train_step(fresh, theta, x, y)
    reset = mlp_population.reset(trained, tf.constant([False, False, True, True]), keys)
    np.testing.assert_array_equal(reset.step.numpy(), [1, 1, 0, 0])
    np.testing.assert_array_equal(reset.trainable[0].numpy()[2:], fresh.trainable[0].numpy()[2:])
    np.testing.assert_array_equal(reset.trainable[0].numpy()[:2],
                                  trained.trainable[0].numpy()[:2])
    # BatchNorm statistics are per particle and reset with the particle.
    moving_mean = [v for v in reset.non_trainable if v.dtype == tf.float32][0].numpy()
    np.testing.assert_array_equal(moving_mean[2:], 0.0)
    assert not np.allclose(moving_mean[:2], 0.0)


def test_evaluate_and_per_particle_batches(mlp_population):
    keys = tf.constant([[1, 2], [1, 2], [3, 4], [3, 4]], tf.int32)
    state = mlp_population.init(keys)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 16, 6)).astype("float32")
    y = rng.integers(0, 3, (4, 16))
    out = mlp_population.evaluate(state, x, y)
    assert out["loss"].shape == (4,) and out["accuracy"].shape == (4,)
    # Particle 0 on its own batch equals a plain Keras forward pass.
    model = mlp_population.model
    mlp_population.set_weights(state, 0, model)
    expected = LOSS(y[0], model(x[0], training=False))
    np.testing.assert_allclose(out["loss"].numpy()[0], expected.numpy(), rtol=1e-5)


def test_bad_population_arguments():
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.1, "log")])
    model = _model(batch_norm=False)
    with pytest.raises(ValueError, match=r"hyperparameters \['momentum'\]"):
        keras_es.Population(model, 4, space, LOSS, engine.SGD("lr", momentum="momentum"))
    with pytest.raises(ValueError, match="num_particles=0"):
        keras_es.Population(model, 0, space, LOSS, engine.SGD("lr"))
    with pytest.raises(ValueError, match="optimizer="):
        keras_es.Population(model, 4, space, LOSS, keras.optimizers.SGD())
    with pytest.raises(ValueError, match="unknown roles"):
        engine.SGD("lr", per_variable={"*": {"beta": 0.1}})
    with pytest.raises(ValueError, match="built keras.Model"):
        keras_es.Population(keras.Sequential([keras.layers.Dense(2)]), 4, space, LOSS,
                            engine.SGD("lr"))


def _classification_data(n, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 3))
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, np.argmax(x @ w + 0.3 * rng.normal(size=(n, 3)), axis=1)


@pytest.mark.slow
def test_meta_training_a_learning_rate_lowers_the_meta_loss():
    """es_single on a KerasSystem raises a far too small learning rate; the meta-loss
    (the summed training loss of the staggered particles' windows) falls."""
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 1e-3, "log")])
    model = _model(batch_norm=False)
    population = keras_es.Population(model, 16, space, LOSS, engine.SGD("lr", momentum=0.9))
    train = tf.data.Dataset.from_tensor_slices(_classification_data(512, 0)).batch(64)
    system = keras_es.KerasSystem(population, train, batch_size=32)
    estimator = keras_es.es_single(0.3, truncation_length=5, horizon=30)
    trainer = keras_es.MetaTrainer(system, estimator, space, 16,
                                   outer_optimizer=keras.optimizers.Adam(0.1), seed=0,
                                   jit_compile=True)
    history = trainer.train(40)
    meta = np.asarray(history["loss"])
    assert trainer.values["lr"] > 1e-2, trainer.values
    assert meta[-8:].mean() < 0.85 * meta[:8].mean(), (meta[:8].mean(), meta[-8:].mean())


def test_keras_system_batches_are_shared_by_twins_only():
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 1e-3, "log")])
    population = keras_es.Population(_model(batch_norm=False), 4, space, LOSS, engine.SGD("lr"),
                                     initialize="copy")
    system = keras_es.KerasSystem(population, _classification_data(1000, 0), batch_size=8)
    keys = tf.constant([[1, 2], [1, 2], [3, 4], [3, 4]], tf.int32)
    x, _ = system._batch(system.x, system.y, keys, 8, False)
    np.testing.assert_array_equal(x[0], x[1])
    assert not np.allclose(x[0], x[2])
    with pytest.raises(ValueError, match="batch_size=0"):
        keras_es.KerasSystem(population, _classification_data(10, 0), batch_size=0)
    with pytest.raises(ValueError, match="infinite"):
        keras_es.KerasSystem(population, tf.data.Dataset.from_tensor_slices(
            _classification_data(10, 0)).repeat())


def test_layer_hyperparameters_widths_and_dropout_rates_per_particle():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16)(inputs)
    h = keras_es.layers.UnitMask(name="width")(h)
    h = keras.layers.Activation("relu")(h)
    h = keras_es.layers.Dropout(0.5, name="drop")(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    space = keras_es.SearchSpace([
        keras_es.Hyperparameter("lr", 0.1, "log"),
        keras_es.Hyperparameter("units", 8.0, keras_es.transforms.Logit(0, 16)),
        keras_es.Hyperparameter("rate", 0.0, "identity")])
    population = keras_es.Population(
        model, 2, space, LOSS, engine.SGD("lr"), initialize="copy",
        layer_hyperparameters={"*width/units": "units", "*drop/rate": "rate"})
    theta = np.stack([space.encode({"units": 4.7, "rate": 0.0}),
                      space.encode({"units": 15.5, "rate": 0.5})])
    x, y = _classification_data(32, 4)
    state = population.copy_state()
    evaluated = population.evaluate(state, x, y, theta=theta)["loss"].numpy()
    _, train_loss = population.train_step(state, theta, x, y)
    # Particle 0: rate 0 gives the inference-mode loss; particle 1 drops units.
    np.testing.assert_allclose(train_loss.numpy()[0], evaluated[0], rtol=1e-5)
    assert abs(train_loss.numpy()[1] - evaluated[1]) > 1e-4
    # Particle 0 has floor(4.7) = 4 active units: kernel columns 4.. do not matter.
    kernel = state.trainable[0].numpy().copy()
    kernel[:, :, 4:] += 10.0
    changed = state._replace(trainable=(tf.constant(kernel),) + state.trainable[1:])
    again = population.evaluate(changed, x, y, theta=theta)["loss"].numpy()
    np.testing.assert_allclose(again[0], evaluated[0], rtol=1e-6)
    assert abs(again[1] - evaluated[1]) > 1e-3
    # The same layers in a plain Keras model behave like fixed-value layers.
    np.testing.assert_allclose(model(x, training=False).shape, (32, 3))
    with pytest.raises(ValueError, match="matches no non-trainable variable"):
        keras_es.Population(model, 2, space, LOSS, engine.SGD("lr"),
                            layer_hyperparameters={"*nothing*": "units"})


@pytest.mark.slow
def test_population_checkpoint_resume_reproduces_meta_training(tmp_path):
    """The whole population (weights, BatchNorm statistics, momentum, step counters,
    dropout seeds) and the estimator state round-trip through a checkpoint."""
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.05, "log")])

    def build():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dropout(0.2), keras.layers.BatchNormalization(),
                                  keras.layers.Dense(3)])
        population = keras_es.Population(model, 4, space, LOSS, engine.SGD("lr", momentum=0.9))
        system = keras_es.KerasSystem(population, _classification_data(256, 0), batch_size=16)
        return keras_es.MetaTrainer(system, keras_es.pes(0.2, 3, horizon=7), space, 4,
                                    outer_optimizer=keras.optimizers.Adam(0.05), seed=5)

    straight = build()
    straight.train(3)
    path = straight.save(str(tmp_path / "ckpt"))
    expected = straight.train(3)
    resumed = build()
    resumed.restore(path)
    got = resumed.train(3)
    np.testing.assert_array_equal(got["lr"], expected["lr"])
    np.testing.assert_array_equal(got["loss"], expected["loss"])


def test_per_variable_learning_rates():
    """A block with learning rate 0 stays put; a multiplier scales another block's step."""
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.1, "log"),
                                  keras_es.Hyperparameter("frozen", 0.0, "identity")])
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="first"),
                              keras.layers.Dense(3, name="second")])
    optimizer = engine.SGD("lr", per_variable={"*first/kernel": {"learning_rate": "frozen"},
                                               "*second/*": {"learning_rate_multiplier": 2.0}})
    population = keras_es.Population(model, 2, space, LOSS, optimizer, initialize="copy")
    paths = population.trainable_paths
    state = population.copy_state()
    x, y = _classification_data(16, 0)
    new, _ = population.train_step(state, tf.tile(space.encode()[None], [2, 1]), x, y)
    first = paths.index([p for p in paths if p.endswith("first/kernel")][0])
    np.testing.assert_array_equal(new.trainable[first], state.trainable[first])
    plain = keras_es.Population(model, 2, space, LOSS, engine.SGD("lr"), initialize="copy")
    reference, _ = plain.train_step(state, tf.tile(space.encode()[None], [2, 1]), x, y)
    second = paths.index([p for p in paths if p.endswith("second/kernel")][0])
    np.testing.assert_allclose(new.trainable[second] - state.trainable[second],
                               2.0 * (reference.trainable[second] - state.trainable[second]),
                               rtol=1e-5, atol=1e-7)


def test_datasets_of_examples_or_batches_load_the_same():
    x, y = _classification_data(100, 0)
    examples = keras_es.engine.keras_system.as_tensors(
        tf.data.Dataset.from_tensor_slices((x, y)), "train_data")
    batches = keras_es.engine.keras_system.as_tensors(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(7), "train_data")
    for got in (examples, batches):
        np.testing.assert_array_equal(got[0], x)
        np.testing.assert_array_equal(got[1], y)
    with pytest.raises(ValueError, match="empty"):
        keras_es.engine.keras_system.as_tensors(
            tf.data.Dataset.from_tensor_slices((x[:0], y[:0])), "train_data")


def test_one_step_hypergradient_is_the_chain_rule_through_the_update():
    """d L_meta(w') / d theta with w' = w + mu m - lr g (Keras SGD momentum), for
    theta = (log lr, logit mu), against the chain rule written out by hand."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    meta_x, meta_y = (rng.normal(size=(16, 5)).astype("float32"),
                      rng.normal(size=(16, 1)).astype("float32"))
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.05, "log"),
                                  keras_es.Hyperparameter("momentum", 0.7, "logit")])
    population = keras_es.Population(model, 2, space, keras.losses.MeanSquaredError(),
                                     engine.SGD("lr", momentum="momentum"))
    theta = tf.constant(space.encode(), tf.float32)
    state = population.init(tf.constant([[1, 2], [3, 4]], tf.int32))
    for _ in range(3):  # non-zero momentum slots
        state, _ = population.train_step(state, tf.tile(theta[None], [2, 1]), x, y)
    got = tf.function(lambda s, t: population.hypergradient(s, t, x, y, meta_x, meta_y,
                                                            particle=1))(state, theta)

    lr, mu = 0.05, 0.7
    w = [v[1] for v in state.trainable]
    m = [s[1] for s in state.slots[0]]
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = tf.reduce_mean(tf.square(x @ w[0] + w[1] - y))
    g = tape.gradient(loss, w)
    new_w = [wi + mu * mi - lr * gi for wi, mi, gi in zip(w, m, g, strict=True)]
    with tf.GradientTape() as tape:
        tape.watch(new_w)
        meta = tf.reduce_mean(tf.square(meta_x @ new_w[0] + new_w[1] - meta_y))
    meta_grad = tape.gradient(meta, new_w)
    dot = lambda a, b: sum(float(tf.reduce_sum(ai * bi)) for ai, bi in zip(a, b, strict=True))  # noqa: E731, E501
    expected = [dot(meta_grad, [-lr * gi for gi in g]),              # d/d log lr
                dot(meta_grad, [mu * (1 - mu) * mi for mi in m])]    # d/d logit mu
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-7)
