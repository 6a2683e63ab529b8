"""examples/uci_l2.py: ES-Single tunes the L2 coefficient of a regression on the
diabetes data to the validation optimum a grid of converged fits finds, from below and
from above."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("uci_l2")


@pytest.fixture(scope="module")
def data(example):
    return example.load_data()


def test_data_and_the_converged_reference(example, data):
    assert data["x_train"].shape == (221, 65) and data["x_val"].shape == (221, 65)
    assert abs(data["y_train"].mean()) < 1e-12 and data["y_train"].std() == pytest.approx(1.0)
    # The inner gradient descent ends at the closed-form minimizer the grid scores.
    np.testing.assert_allclose(example.descend(data, -1.0, 3000),
                               example.converged_weights(data, -1.0), atol=1e-8)
    grid = example.grid_search(data)
    assert grid["refined_val_loss"] <= grid["best_val_loss"]
    assert abs(grid["refined_log_lam"] - grid["best_log_lam"]) <= 0.05
    # L2 matters here: the best coefficient is interior and far better than none.
    assert -3.0 < grid["refined_log_lam"] < 1.0
    assert grid["refined_val_loss"] < 0.5 * grid["unregularized_val_loss"]


@pytest.mark.slow
def test_quick_run_es_single_finds_the_grid_optimum(example, tmp_path):
    out = tmp_path / "uci.json"
    result = example.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "uci.png").stat().st_size > 10_000
    grid = result["grid"]
    runs = {(r["method"], r["initial_log_lam"]): r for r in result["runs"]}
    assert set(runs) == {(m, t) for m in ("es_single", "pes") for t in (-7.0, 2.0)}
    for theta0 in (-7.0, 2.0):
        run = runs["es_single", theta0]
        # Within the Adam jitter of theta at the end (its tail spread, at least 0.05)...
        tolerance = max(0.05, 5 * run["tail_std_log_lam"])
        assert abs(run["tuned_log_lam"] - grid["refined_log_lam"]) < tolerance, run
        # ... which costs nothing measurable in validation loss.
        assert run["val_loss_at_tuned"] <= 1.001 * grid["refined_val_loss"], run
    for run in result["runs"]:
        assert len(run["trajectory"]) == 400 and math.isfinite(run["tuned_log_lam"])


@pytest.mark.parametrize("argv, match", [
    (["--steps", "5"], "--steps=5"),
    (["--learning-rate", "0"], "--learning-rate=0.0"),
    (["--degree", "4"], "--degree=4"),
])
def test_bad_arguments_exit_with_a_message(example, argv, match, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert match in capsys.readouterr().err
