"""Runs small MetaTrainer trajectories under tf.distribute strategies, in a process of
its own (logical devices must be configured before TensorFlow initializes).

Used by tests/distribute/test_distribute.py:

    python tests/distribute/distributed_runs.py mirrored --devices 4 --out result.json
    python tests/distribute/distributed_runs.py worker --out result.json   # with TF_CONFIG set

Prints nothing; writes ``{run name: {"theta": [[...] per step], ...}}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

STEPS = 4


def configure_devices(count: int) -> list[str]:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def oracle_trainer(strategy):
    import keras

    import keras_es
    from keras_es import testing

    # PES on the telescoped final loss, normalized: every reduction path is exercised
    # (the dim-sized all-reduce and the per-pair gather of the differences).
    estimator = keras_es.pes(0.1, 3, horizon=7, objective="final", normalize=True)
    with strategy.scope():
        optimizer = keras.optimizers.Adam(0.05)
    return keras_es.MetaTrainer(testing.oracle_system(), estimator, testing.ORACLE_THETA,
                                num_particles=16, outer_optimizer=optimizer, seed=5,
                                strategy=strategy)


def keras_trainer(strategy, jit_compile=False, hidden=8):
    import keras

    import keras_es

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, :3].sum(1) > 0).astype(np.int32) + (x[:, 3] > 0.5).astype(np.int32)
    keras.utils.set_random_seed(0)
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.05, "log"),
                                  keras_es.Hyperparameter("momentum", 0.5, "logit")])
    with strategy.scope():  # mirrored weights and data: each replica reads its own
        model = keras.Sequential([keras.Input((6,)),
                                  keras.layers.Dense(hidden, activation="relu"),
                                  keras.layers.Dense(3)])
        population = keras_es.Population(
            model, 8, space, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            keras_es.engine.SGD("lr", momentum="momentum"))
        system = keras_es.KerasSystem(population, (x[:48], y[:48]), (x[48:], y[48:]),
                                      batch_size=8, step_loss="meta")
        optimizer = keras.optimizers.Adam(0.05)
    return keras_es.MetaTrainer(system, keras_es.es_single(0.1, 2, horizon=6), space,
                                num_particles=8, outer_optimizer=optimizer, seed=3,
                                strategy=strategy, jit_compile=jit_compile)


def cnn_trainer(strategy):
    """A convolutional model with BatchNormalization: the stacked engine (grouped
    convolutions, per-particle moving statistics) inside each replica."""
    import keras

    import keras_es

    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 6, 6, 1)).astype(np.float32)
    y = (x[:, :3, :3, 0].sum((1, 2)) > 0).astype(np.int32)
    keras.utils.set_random_seed(0)
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.05, "log")])
    with strategy.scope():
        model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3),
                                  keras.layers.BatchNormalization(),
                                  keras.layers.Activation("relu"), keras.layers.Flatten(),
                                  keras.layers.Dense(2)])
        population = keras_es.Population(
            model, 8, space, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            keras_es.engine.SGD("lr", momentum=0.5))
        # Stacked where the device has grouped-convolution gradients (oneDNN on a CPU).
        assert population.stacked == (keras_es.engine.stacked.missing_kernel(model) is None)
        system = keras_es.KerasSystem(population, (x[:48], y[:48]), (x[48:], y[48:]),
                                      batch_size=8, step_loss="meta")
        optimizer = keras.optimizers.Adam(0.1)
    return keras_es.MetaTrainer(system, keras_es.es_single(0.1, 2, horizon=6), space,
                                num_particles=8, outer_optimizer=optimizer, seed=4,
                                strategy=strategy)


def poisoned_trainer(strategy):
    """Particles whose perturbed theta[0] passes a threshold get an Inf loss and a NaN
    state: which ones depends only on their noise, so on the same particles whatever
    replica holds them."""
    import keras

    import keras_es
    from keras_es import testing
    from keras_es.systems import LinearQuadraticSystem

    class Poisoned(LinearQuadraticSystem):
        def step(self, state, theta, keys):
            state, loss, done = super().step(state, theta, keys)
            hit = theta[:, 0] > testing.ORACLE_THETA[0] + 0.12
            return (tf.where(hit[:, None], np.nan, state), tf.where(hit, np.inf, loss),
                    done)

    inner = testing.oracle_system()
    system = Poisoned(inner.A, inner.B, inner.c, inner.H, inner.y, inner.s0, inner.meta_H,
                      inner.meta_y)
    with strategy.scope():
        optimizer = keras.optimizers.SGD(0.05)
    return keras_es.MetaTrainer(system, keras_es.pes(0.1, 3, horizon=7), testing.ORACLE_THETA,
                                num_particles=16, outer_optimizer=optimizer, seed=7,
                                strategy=strategy)


def guided_trainer(strategy):
    """Guided ES-Single with a surrogate pushed every step: the FIFO is replicated."""
    import keras

    import keras_es
    from keras_es import testing

    with strategy.scope():
        optimizer = keras.optimizers.Adam(0.05)
    estimator = keras_es.es_single(0.1, 3, horizon=7, objective="final",
                                   guided=keras_es.GuidedConfig(k=1))
    return keras_es.MetaTrainer(
        testing.oracle_system(), estimator, testing.ORACLE_THETA, num_particles=16,
        outer_optimizer=optimizer, seed=2, strategy=strategy,
        surrogate=lambda theta, step: theta * tf.cast(step + 1, tf.float32))


BUILDERS = {"oracle": oracle_trainer, "keras": keras_trainer, "poisoned": poisoned_trainer,
            "guided": guided_trainer, "cnn": cnn_trainer}


def callback_run(strategy):
    """``model.fit`` under ``strategy`` with an ESCallback that inherits it."""
    import keras

    import keras_es

    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 6)).astype(np.float32)
    y = (x[:, :3].sum(1) > 0).astype(np.int32)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.05, "log"),
                                  keras_es.Hyperparameter("momentum", 0.5, "logit")])
    callback = keras_es.ESCallback(space, keras_es.engine.SGD("lr", momentum="momentum"),
                                   train_data=(x[:64], y[:64]), meta_data=(x[64:], y[64:]),
                                   num_particles=8, truncation_length=2, batch_size=8,
                                   seed=1, jit_compile=False)
    history = model.fit(x[:64], y[:64], batch_size=16, epochs=2, shuffle=False, verbose=0,
                        callbacks=[callback])
    return {"theta": callback.trainer.theta_value.tolist(),
            "replicas": callback.trainer.strategy.num_replicas_in_sync,
            "es_lr": history.history["es_lr"],
            "es_momentum": history.history["es_momentum"]}


def trajectory(trainer, steps=STEPS):
    thetas, losses, valid, diverged = [], [], [], []
    for _ in range(steps):
        logs = trainer.step()
        thetas.append(trainer.theta_value.tolist())
        losses.append(logs["loss"])
        valid.append(logs["valid_pairs"])
        diverged.append(logs["diverged_pairs"])
    return {"theta": thetas, "loss": losses, "valid_pairs": valid, "diverged_pairs": diverged}


def mirrored(args):
    # One MirroredStrategy per process: TensorFlow numbers collective groups per
    # strategy object, and a second strategy over other devices would collide.
    devices = configure_devices(args.devices)
    strategy = tf.distribute.MirroredStrategy(devices)
    default = tf.distribute.get_strategy()
    out = {}
    for name, build in BUILDERS.items():
        out[f"{name}/1"] = trajectory(build(default))
        out[f"{name}/{args.devices}"] = trajectory(build(strategy))
    if args.checkpoints:
        # 2 steps under one strategy, restored under the other, 2 more.
        for source, target, tag in ((strategy, default, f"{args.devices}_to_1"),
                                    (default, strategy, f"1_to_{args.devices}")):
            first = BUILDERS["keras"](source)
            head = trajectory(first, 2)
            path = first.save(os.path.join(args.scratch, f"ckpt_{tag}"))
            second = BUILDERS["keras"](target)
            second.restore(path)
            tail = trajectory(second, STEPS - 2)
            out[f"keras/restore_{tag}"] = {key: head[key] + tail[key] for key in head}
    if args.callback:
        out["callback/1"] = callback_run(default)
        out[f"callback/{args.devices}"] = callback_run(strategy)
    if args.payloads:
        from keras_es import distribute

        # What crosses replicas per step, for a small and a 100x larger model.
        for hidden in (8, 1024):
            trainer = keras_trainer(strategy, hidden=hidden)
            out[f"payloads/{hidden}"] = {
                "parameters": int(sum(np.prod(v.shape) for v in
                                      trainer.system.population.model.trainable_variables)),
                "entries": distribute.collective_payloads(trainer)}
    if args.xla:
        # The same code path with each replica's steps compiled by XLA.
        out[f"keras/{args.devices}_xla"] = trajectory(keras_trainer(strategy, jit_compile=True))
        out["keras/1_xla"] = trajectory(keras_trainer(default, jit_compile=True))
    return out


def worker(args):
    """One worker of a MultiWorkerMirroredStrategy cluster (TF_CONFIG set by the caller)."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    out = {"replicas": strategy.num_replicas_in_sync,
           "oracle/workers": trajectory(oracle_trainer(strategy))}
    trainer = keras_trainer(strategy)
    head = trajectory(trainer, 2)
    # Every worker saves (the shards are all-gathered); only the chief writes the path.
    out["checkpoint"] = trainer.save(os.path.join(args.scratch, "ckpt_workers"))
    tail = trajectory(trainer, STEPS - 2)
    out["keras/workers"] = {key: head[key] + tail[key] for key in head}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("mirrored", "worker"))
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--checkpoints", action="store_true")
    parser.add_argument("--xla", action="store_true")
    parser.add_argument("--callback", action="store_true")
    parser.add_argument("--payloads", action="store_true")
    args = parser.parse_args(argv)
    args.scratch = args.scratch or os.path.dirname(os.path.abspath(args.out))
    result = mirrored(args) if args.mode == "mirrored" else worker(args)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
