"""A tiny ESSearch run in its own process, for the crash-resume and distributed tests.

Role comes from keras-tuner's own environment variables (``KERASTUNER_TUNER_ID``,
``KERASTUNER_ORACLE_IP``, ``KERASTUNER_ORACLE_PORT``). ``--kill-mid-trial N`` SIGKILLs
this process during the N-th trial it runs (inside ``fit``); ``--kill-after-trial N``
right after its N-th trial saved its checkpoint, before the result reaches the oracle.
``--engine`` searches a hypermodel whose tuned values are all optimizer values, on the
particle engine (the round file is written by the round's first trial).
"""

from __future__ import annotations

import argparse
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_es  # noqa: E402

MAX_TRIALS = 14  # a staggered-start round of 2 trials + 3 rounds of 4: four outer steps


def build(hp):
    units = hp.Int("units", 2, 8, default=4)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation="tanh"),
                              keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(hp.Float("lr", 1e-3, 1.0, sampling="log", default=0.05),
                                       momentum=hp.Float("momentum", 0.0, 0.99, default=0.5)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)
    return model


def build_optimizer_only(hp):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(hp.Float("lr", 1e-3, 1.0, sampling="log", default=0.05),
                                       momentum=hp.Float("momentum", 0.0, 0.99, default=0.5)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class _Kill(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--directory", required=True)
    parser.add_argument("--kill-mid-trial", type=int, default=0)
    parser.add_argument("--kill-after-trial", type=int, default=0)
    parser.add_argument("--reassign-after", type=float, default=None)
    parser.add_argument("--engine", action="store_true")
    args = parser.parse_args()

    class Search(keras_es.ESSearch):
        trials_run = 0

        def run_trial(self, trial, *fit_args, **fit_kwargs):
            Search.trials_run += 1
            if Search.trials_run == args.kill_mid_trial:
                fit_kwargs["callbacks"] = [_Kill()]
            results = super().run_trial(trial, *fit_args, **fit_kwargs)
            if Search.trials_run == args.kill_after_trial:
                os.kill(os.getpid(), signal.SIGKILL)
            return results

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    execution = "engine" if args.engine else "auto"
    tuner = Search(build_optimizer_only if args.engine else build, objective="val_loss",
                   max_trials=MAX_TRIALS, num_particles=4,
                   sigma=0.3, truncation_length=2, horizon=4, outer_learning_rate=0.1, seed=3,
                   reassign_after=args.reassign_after, directory=args.directory,
                   project_name="search", overwrite=False, idle_sleep=0.05,
                   max_idle_sleep=0.5, execution=execution)
    tuner.search(x[:64], y[:64], validation_data=(x[64:], y[64:]), batch_size=16)
    print("SEARCH DONE", flush=True)


if __name__ == "__main__":
    main()
