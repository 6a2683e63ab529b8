"""Checkpoints written by keras_es 0.2 (one flat EstimatorState) load into this version,
and training continues exactly where it stopped.

The files in tests/data/v0_2 were written by keras_es at commit be6f708 with
``MetaTrainer(influence_balancing(), ..., [0.5], 4, seed=3)`` trained 3 steps and saved;
``expected.json`` holds what its next step logged.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es.systems import influence_balancing

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                    "v0_2")
CASES = {
    "pes_final": (lambda: keras_es.pes(0.1, 5, horizon=20, objective="final"), None),
    "guided_es_single": (
        lambda: keras_es.es_single(0.1, 5, horizon=20, guided=keras_es.GuidedConfig(k=1)),
        lambda theta, step: tf.ones([1])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_0_2_checkpoint_resumes_exactly(name):
    make, surrogate = CASES[name]
    with open(os.path.join(DATA, "expected.json")) as f:
        expected = json.load(f)[name]
    trainer = keras_es.MetaTrainer(influence_balancing(), make(), [0.5], 4, seed=3,
                                   surrogate=surrogate)
    trainer.restore(os.path.join(DATA, name))
    logs = trainer.step()
    np.testing.assert_allclose(trainer.theta_value, expected["theta"], rtol=1e-6)
    for key in ("loss", "meta_loss", "gradient_norm"):
        np.testing.assert_allclose(logs[key], expected[key], rtol=1e-5)


def test_a_checkpoint_of_another_estimator_is_refused_clearly():
    trainer = keras_es.MetaTrainer(influence_balancing(), keras_es.es_single(0.1, 5, horizon=20),
                                   [0.5], 4, seed=3)
    with pytest.raises(ValueError, match="guided estimator"):
        trainer.restore(os.path.join(DATA, "guided_es_single"))
