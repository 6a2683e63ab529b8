"""examples/learned_optimizer.py: the learned optimizer is an UnrolledSystem whose
update is its MLP; the quick run and the ``tfds.load`` path (``--dataset
fashion_mnist`` under ``tfds.testing.mock_data``) run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("learned_optimizer")


def _data(n=32, dim=5):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, dim)).astype(np.float32),
            rng.integers(0, 10, size=n).astype(np.int32))


def test_optimizer_mlp_that_outputs_adams_direction_is_adam(example):
    """theta that makes MLP(f) - MLP(-f) the second feature (m_hat / sqrt(v_hat)) turns
    the learned optimizer into Adam at learning rate OUTPUT_SCALE: the two systems take
    the same steps."""
    data, h = _data(), 2
    learned = example.LearnedOptimizerSystem(data, hidden=4, batch_size=8,
                                             optimizer_hidden=h)
    adam = example.AdamSystem(data, hidden=4, batch_size=8)
    # Hidden unit 0 reads feature 1: relu(m) - relu(-m) = m; unit 1 is off.
    w1 = np.zeros((example.FEATURES, h), np.float32)
    w1[1, 0] = 1.0
    theta = np.concatenate([w1.ravel(), np.zeros(h), [1.0, 0.0]]).astype(np.float32)
    assert theta.size == learned.dim == 2 * h + 2 * h
    keys = tf.constant([[1, 2], [1, 2]], tf.int32)
    a, b = learned.init(keys), adam.init(keys)
    for t in range(3):
        step_keys = tf.constant([[t, 0], [t, 0]], tf.int32)
        a, loss_a, _ = learned.step(a, tf.constant(np.stack([theta] * 2)), step_keys)
        b, loss_b, _ = adam.step(b, tf.fill([2, 1], math.log(example.OUTPUT_SCALE)), step_keys)
        np.testing.assert_allclose(loss_a.numpy(), loss_b.numpy(), rtol=1e-5)
    np.testing.assert_allclose(a["weights"].numpy(), b["weights"].numpy(), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.slow
def test_quick_run(example, tmp_path):
    out = tmp_path / "lopt.json"
    result = example.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "lopt.png").stat().st_size > 10_000
    assert set(result["meta_training"]) == {"es_single", "pes"}
    names = set(result["evaluation"])
    assert {"learned (es_single)", "learned (pes)", "learned, initial theta"} <= names
    assert result["adam_best"] in names
    for run in result["meta_training"].values():
        assert len(run["window_loss"]) == 12
        assert len(run["theta_final"]) == result["settings"]["theta_dim"] == 16
    for row in result["evaluation"].values():
        assert 0.0 < row["mean_loss"] <= 10.0 and 0.0 <= row["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_real_tfds_path_with_mock_data(example, tmp_path):
    with tfds.testing.mock_data(num_examples=32):
        result = example.main(["--quick", "--dataset", "fashion_mnist", "--windows", "2",
                               "--horizon", "10", "--out", str(tmp_path / "f.json")])
    assert result["dataset"] == "fashion_mnist"
    assert result["settings"]["inner_weights"] == 784 * 8 + 8 + 8 * 10 + 10
    assert (tmp_path / "f.png").exists()


@pytest.mark.parametrize("argv, match", [
    (["--particles", "5"], "--particles=5"),
    (["--horizon", "5"], "--horizon=5"),
    (["--sigma", "0"], "--sigma=0"),
])
def test_bad_arguments_exit_with_a_message(example, argv, match, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert match in capsys.readouterr().err
