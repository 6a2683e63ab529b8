"""examples/mnist_lr_schedule.py: the quick run meets its expectation, and the real
``tfds.load`` path (``--dataset mnist``) works under ``tfds.testing.mock_data``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_es import datasets


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("mnist_lr_schedule")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_embedded_digits_through_tfds(data_dir):
    x, y = datasets.load("digits", "train", data_dir)
    x_val, y_val = datasets.load("digits", "test", data_dir)
    assert x.shape == (1437, 64) and x_val.shape == (360, 64)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    again, _ = datasets.load("digits", "train", data_dir, max_examples=5)
    np.testing.assert_array_equal(again, x[:5])  # a fixed split, the same on every load
    with pytest.raises(ValueError, match="max_examples=0"):
        datasets.load("digits", "train", data_dir, max_examples=0)


@pytest.mark.slow
def test_quick_run_learns_a_schedule_near_the_grid_best(example, tmp_path):
    out = tmp_path / "schedule.json"
    result = example.main(["--quick", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert (tmp_path / "schedule.png").stat().st_size > 10_000
    assert len(written["theta_init"]) == len(written["theta_final"]) == 2
    losses = written["final_val_loss"]
    # The expectation: within 5% of the grid's best, clearly below the start.
    assert losses["learned_schedule"] <= 1.05 * losses["grid_best"], losses
    assert losses["learned_schedule"] < 0.25 * losses["initial_schedule"], losses
    assert written["diverged_pairs"] >= 0


@pytest.mark.slow
def test_real_tfds_path_with_mock_data(example, tmp_path):
    out = tmp_path / "mnist.json"
    with tfds.testing.mock_data(num_examples=64):
        x, y = datasets.load("mnist", "train")
        assert x.shape == (64, 784) and y.shape == (64,)
        result = example.main(["--dataset", "mnist", "--horizon", "20", "--windows", "4",
                               "--particles", "4", "--grid", "2", "--grid-seeds", "1",
                               "--eval-seeds", "1", "--out", str(out)])
    assert result["dataset"] == "mnist"
    assert np.all(np.isfinite(result["theta_final"]))
    assert set(result["final_val_loss"]) == {"initial_schedule", "learned_schedule",
                                             "grid_best"}
    assert (tmp_path / "mnist.png").exists()


@pytest.mark.parametrize("argv, match", [
    (["--particles", "3"], "--particles=3"),
    (["--windows", "0"], "--windows=0"),
    (["--horizon", "5"], "--horizon=5"),
])
def test_bad_arguments_exit_with_a_message(example, argv, match, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert match in capsys.readouterr().err
