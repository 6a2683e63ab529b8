"""Tune 29 hyperparameters of a 5-hidden-layer MLP with keras_es.ESSearch (ES-Single).

The 29 hyperparameters of the ES-Single paper's experiment: a learning rate and a
momentum for every weight block (kernel and bias of 6 Dense layers: 24 values) and the
width of each of the 5 hidden layers (Int, 10 to 100 units). Each trial continues one
particle's training run for ``truncation_length`` steps; theta is updated after every
round of particle trials and the runs restart every ``horizon`` steps.

Runs on scikit-learn's bundled digits by default (no download); ``--dataset
fashion_mnist`` loads FashionMNIST through ``tfds.load`` (needs the data or internet).

    python examples/fashion_mnist_29_hparams.py --quick
    python examples/fashion_mnist_29_hparams.py --dataset fashion_mnist

The module also defines the task (`load_data`, `build_model`) that
``benchmarks/tuner_comparison.py`` compares keras-tuner's own oracles on.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import keras
import numpy as np

NUM_HIDDEN = 5
BLOCKS = [f"{part}_{layer}" for layer in [*range(1, NUM_HIDDEN + 1), "out"]
          for part in ("kernel", "bias")]
DEFAULT_LEARNING_RATE = 0.01
DEFAULT_MOMENTUM = 0.9
DEFAULT_UNITS = 50


class BlockSGD(keras.optimizers.Optimizer):
    """SGD with momentum and its own learning rate and momentum per variable.

    Keras's update ``m = momentum * m - lr * g; w += m`` with ``learning_rates[i]`` and
    ``momenta[i]`` for the model's i-th trainable variable.
    """

    def __init__(self, learning_rates, momenta, name="block_sgd", **kwargs):
        super().__init__(learning_rate=1.0, name=name, **kwargs)
        self.learning_rates = [float(v) for v in learning_rates]
        self.momenta = [float(v) for v in momenta]

    def build(self, variables):
        if self.built:
            return
        if len(variables) != len(self.learning_rates):
            raise ValueError(f"BlockSGD has {len(self.learning_rates)} learning rates for "
                             f"{len(variables)} variables.")
        super().build(variables)
        self.velocities = [self.add_variable_from_reference(v, "velocity") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        i = self._get_variable_index(variable)
        velocity = self.velocities[i]
        self.assign(velocity, self.momenta[i] * velocity - self.learning_rates[i] * gradient)
        self.assign_add(variable, velocity)

    def get_config(self):
        config = super().get_config()
        config.update({"learning_rates": self.learning_rates, "momenta": self.momenta})
        return config


def build_model(hp, input_dim: int = 64, num_classes: int = 10, run_eagerly: bool = True):
    """The 29-hyperparameter MLP (a keras-tuner build function)."""
    layers = [keras.Input((input_dim,))]
    for layer in range(1, NUM_HIDDEN + 1):
        units = hp.Int(f"units_{layer}", 10, 100, default=DEFAULT_UNITS)
        layers.append(keras.layers.Dense(units, activation="relu"))
    layers.append(keras.layers.Dense(num_classes))
    model = keras.Sequential(layers)
    learning_rates = [hp.Float(f"lr_{b}", 1e-4, 1.0, sampling="log",
                               default=DEFAULT_LEARNING_RATE) for b in BLOCKS]
    momenta = [hp.Float(f"momentum_{b}", 0.0, 0.99, default=DEFAULT_MOMENTUM) for b in BLOCKS]
    # Tiny networks: eager steps beat tracing a new graph for every short trial.
    model.compile(BlockSGD(learning_rates, momenta),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=run_eagerly)
    return model


def load_data(dataset: str = "digits", seed: int = 0):
    """``(x_train, y_train, x_val, y_val)`` float32 features in [0, 1], int labels."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).astype("float32")
        y = digits.target.astype("int32")
        order = np.random.default_rng(seed).permutation(len(x))
        x, y = x[order], y[order]
        return x[:1297], y[:1297], x[1297:], y[1297:]
    if dataset == "fashion_mnist":
        import tensorflow_datasets as tfds

        train, test = tfds.load("fashion_mnist", split=["train[:10000]", "test[:2000]"],
                                as_supervised=True, batch_size=-1)

        def arrays(split):
            images, labels = tfds.as_numpy(split)
            return (images.reshape(len(images), -1) / 255.0).astype("float32"), \
                labels.astype("int32")

        return (*arrays(train), *arrays(test))
    raise ValueError(f"dataset={dataset!r} is invalid; expected 'digits' or 'fashion_mnist'.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion_mnist"])
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--directory", default=None, help="keras-tuner project directory")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    import keras_es

    x, y, x_val, y_val = load_data(args.dataset)
    horizon, truncation = (50, 25) if args.quick else (200, 25)
    rounds = 3 if args.quick else 40
    particles = 4 if args.quick else 8
    directory = args.directory or tempfile.mkdtemp(prefix="keras_es_29_")

    def build(hp):
        return build_model(hp, input_dim=x.shape[1])

    tuner = keras_es.ESSearch(
        build, objective="val_loss", max_trials=rounds * particles, estimator="es_single",
        num_particles=particles, sigma=0.3, truncation_length=truncation, horizon=horizon,
        outer_learning_rate=0.05, seed=args.seed, directory=directory,
        project_name="fashion_mnist_29_hparams", overwrite=True)
    tuner.search(x, y, validation_data=(x_val, y_val), batch_size=32,
                 validation_batch_size=len(x_val), verbose=0)
    tuner.results_summary(num_trials=1)

    best = tuner.get_best_hyperparameters()[0]
    keras.utils.set_random_seed(args.seed)
    model = build(best)
    model.fit(x, y, batch_size=32, epochs=horizon // truncation, steps_per_epoch=truncation,
              verbose=0)
    val_loss = model.evaluate(x_val, y_val, batch_size=len(x_val), verbose=0)
    print(f"\nA fresh {horizon}-step run at the learned mean theta: val_loss = {val_loss:.4f}")
    print(f"Project directory: {os.path.join(directory, 'fashion_mnist_29_hparams')}")
    return val_loss


if __name__ == "__main__":
    main()
