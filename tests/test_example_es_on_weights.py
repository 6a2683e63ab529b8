"""examples/es_on_weights.py: the counter-based ES update is keras_es's full_es estimate
without an N x P noise matrix; the quick run and the ``tfds.load`` path (``--dataset
mnist`` under ``tfds.testing.mock_data``) run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("es_on_weights")


def _data(n=64, dim=6):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, dim)).astype(np.float32),
            rng.integers(0, 10, size=n).astype(np.int32))


@pytest.mark.slow
def test_chunks_do_not_change_the_estimate(example):
    data = _data()
    w = tf.constant(example.initial_weights(6, 5, seed=1))
    one_by_one = example.CounterES(data, 5, 6, 0.1, 1, 8, seed=3)
    together = example.CounterES(data, 5, 6, 0.1, 6, 8, seed=3)
    g = together.gradient(w, 2)[0].numpy()
    np.testing.assert_allclose(one_by_one.gradient(w, 2)[0].numpy(), g, rtol=1e-5, atol=1e-6)
    # Another update counter draws other noise (and minibatches).
    assert np.max(np.abs(together.gradient(w, 3)[0].numpy() - g)) > 1e-3


def test_bad_settings_name_the_argument(example):
    data = _data()
    with pytest.raises(ValueError, match="chunk=4.*num_pairs=6"):
        example.CounterES(data, 5, 6, 0.1, 4, 8, seed=0)
    with pytest.raises(ValueError, match="sigma=0"):
        example.CounterES(data, 5, 6, 0, 3, 8, seed=0)
    with pytest.raises(ValueError, match="num_pairs=0"):
        example.CounterES(data, 5, 0, 0.1, 3, 8, seed=0)


@pytest.mark.slow
def test_quick_run(example, tmp_path):
    out = tmp_path / "weights.json"
    result = example.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "weights.png").stat().st_size > 10_000
    # The same estimate as MetaTrainer + full_es, up to float rounding.
    for row in result["scaling"]:
        assert row["relative_difference"] < 1e-4, row
        # 3 x chunk x P floats at once against (3 N/2 + N) x P: noise, score and
        # accumulator of every pair, and every particle's weights.
        p, n, chunk = row["weights"], 20, 5
        assert row["counter"]["noise_bytes"] == 3 * chunk * p * 4
        assert row["library"]["noise_bytes"] == (3 * n // 2 + n) * p * 4
        assert row["counter"]["seconds_per_update"] > 0
    assert [r["weights"] for r in result["scaling"]] == sorted(
        r["weights"] for r in result["scaling"])
    # Both learn (chance is 0.1); SGD gets further per evaluation.
    assert result["es"]["final_test_accuracy"] > 0.25, result["es"]
    assert result["sgd"]["final_test_accuracy"] > 0.6, result["sgd"]
    assert result["es"]["curve"][-1]["evaluations"] == 40 * 20
    assert set(result["evaluations_to_reach"]) == {"0.9", "0.95", "0.98"}


@pytest.mark.slow
def test_real_tfds_path_with_mock_data(example, tmp_path):
    with tfds.testing.mock_data(num_examples=64):
        result = example.main(["--quick", "--dataset", "mnist", "--updates", "3",
                               "--sgd-steps", "3", "--widths", "4",
                               "--out", str(tmp_path / "m.json")])
    assert result["dataset"] == "mnist"
    assert result["weights"] == 784 * 16 + 16 + 16 * 10 + 10
    assert [row["hidden"] for row in result["scaling"]] == [4]
    assert (tmp_path / "m.png").exists()


@pytest.mark.parametrize("argv, match", [
    (["--particles", "3"], "--particles=3"),
    (["--updates", "0"], "--updates=0"),
    (["--widths", "16,x"], "'16,x' is invalid"),
])
def test_bad_arguments_exit_with_a_message(example, argv, match, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert match in capsys.readouterr().err
