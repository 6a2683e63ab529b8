"""examples/rnn_long_unrolls.py: the copy task's sequences and the RNN system, and the
quick run end to end (three estimators, the landscape, JSON and plot)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorflow as tf


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("rnn_long_unrolls")


def test_copy_task_sequences_and_common_random_numbers(example):
    system = example.CopyTaskRNN(symbols=3, length=2, delay=1, hidden=4, batch_size=5,
                                 init_scale=1.0)
    keys = tf.constant([[0, 1], [0, 1], [0, 2]], tf.int32)
    x, targets = system.sequences(keys)
    assert x.shape == (3, 5, 5, 5) and targets.shape == (3, 5, 2)
    symbols = np.argmax(x.numpy(), -1)
    np.testing.assert_array_equal(symbols[..., :2], targets.numpy())  # read
    assert np.all(symbols[..., 2] == 3) and np.all(symbols[..., 3:] == 4)  # blank, go
    # Equal keys (the twins of a pair): equal sequences and initial weights.
    np.testing.assert_array_equal(x[0], x[1])
    state = system.init(keys)
    np.testing.assert_array_equal(state["wh"][0], state["wh"][1])
    assert np.any(state["wh"][0].numpy() != state["wh"][2].numpy())
    # One SGD step at learning rate 0 changes nothing; the loss starts near chance.
    new, loss, done = system.step(state, tf.fill([3, 1], -1e4), keys)
    assert done is None
    np.testing.assert_allclose(new["wh"].numpy(), state["wh"].numpy())
    assert np.all(np.abs(loss.numpy() - math.log(3)) < 1.0)


@pytest.mark.slow
def test_quick_run(example, tmp_path):
    out = tmp_path / "rnn.json"
    result = example.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "rnn.png").stat().st_size > 10_000
    assert set(result["methods"]) == set(example.METHODS)
    assert len(result["landscape"]["mean_loss"]) == 3
    for run in result["methods"].values():
        assert len(run["log_learning_rate"]) == len(run["window_loss"]) == 12
        assert [c["window"] for c in run["checkpoints"]] == [0, 6, 12]
        assert run["estimate_mean_square"] > 0
        assert math.isfinite(run["mean_loss_final"])


@pytest.mark.parametrize("argv, match", [
    (["--particles", "3"], "--particles=3"),
    (["--horizon", "5"], "--horizon=5"),
    (["--sigma", "0"], "--sigma=0"),
])
def test_bad_arguments_exit_with_a_message(example, argv, match, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert match in capsys.readouterr().err
