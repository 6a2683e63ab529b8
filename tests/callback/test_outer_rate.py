"""ESCallback's outer learning rate follows the windows of the fit when none is given."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_es


@pytest.mark.slow
def test_the_default_outer_rate_follows_the_fits_windows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.5),
                  loss="sparse_categorical_crossentropy")
    callback = keras_es.ESCallback(["learning_rate"], train_data=(x, y), num_particles=2,
                                   truncation_length=2)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    # 25 batches x 2 epochs / K = 2: 25 windows.
    assert len(callback.window_history) == 25
    rate = float(callback.trainer.optimizer.learning_rate)
    assert rate == pytest.approx(keras_es.outer.outer_learning_rate_for(25)) == \
        pytest.approx(0.2)
