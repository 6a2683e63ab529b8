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
        assert "final_sigma" not in run and "clipped_pairs" not in run
    # The primer's options, off, leave no trace: the output is what it always was.
    assert "fitness_shaping" not in result["settings"]
    assert "learn_sigma" not in result["settings"]


@pytest.mark.slow
@pytest.mark.parametrize("flags, methods, variant", [
    (["--fitness-shaping", "rank"], ("es_single", "pes"), "rank"),
    (["--learn-sigma", "--methods", "pes"], ("pes",), "learn_sigma"),
    (["--fitness-shaping", "rank", "--learn-sigma", "--methods", "pes"], ("pes",),
     "rank + learn_sigma"),
])
def test_quick_run_with_the_primer_options(example, tmp_path, flags, methods, variant):
    out = tmp_path / "uci.json"
    result = example.main(["--quick", *flags, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    settings = result["settings"]
    rank, learned = "rank" in variant, "learn_sigma" in variant
    assert settings.get("fitness_shaping") == ("rank" if rank else None)
    assert {(r["method"], r["initial_log_lam"]) for r in result["runs"]} == {
        (m, t) for m in methods for t in (-7.0, 2.0)}
    for run in result["runs"]:
        assert len(run["trajectory"]) == 400 and math.isfinite(run["tuned_log_lam"])
        if rank:  # ranks are bounded: the outlier clip has nothing to do
            assert run["clipped_pairs"] == 0
    if learned:
        bounds = settings["learn_sigma"]
        assert (bounds["min_sigma"], bounds["max_sigma"]) == pytest.approx((1e-3, 0.1))
        for run in result["runs"]:
            sigma = np.asarray(run["sigma_trajectory"])
            assert len(sigma) == 400 and np.all(np.isfinite(sigma))
            assert 0 < bounds["min_sigma"] <= run["final_sigma"] <= bounds["max_sigma"]
            assert run["final_sigma"] == sigma[-1] and np.ptp(sigma) > 0  # it moved
    else:
        assert "learn_sigma" not in settings
        assert all("final_sigma" not in run for run in result["runs"])
    # --compare reads the JSON back: one row per run, named by the variant, and a figure.
    rows = example.main(["--compare", str(out), "--plot", str(tmp_path / "cmp.png")])
    assert [r["variant"] for r in rows] == [variant] * len(result["runs"])
    assert all((r["final_sigma"] is not None) == learned for r in rows)
    assert (tmp_path / "cmp.png").stat().st_size > 10_000


@pytest.mark.slow
def test_rank_shaping_changes_the_trajectory(example, tmp_path):
    short = ["--quick", "--steps", "20", "--methods", "pes", "--initial", "2",
             "--plot", str(tmp_path / "uci.png")]
    default = example.main(short)["runs"][0]["trajectory"]
    ranked = example.main(short + ["--fitness-shaping", "rank"])["runs"][0]["trajectory"]
    # The same noise, so both move from 2 alike at first, but by different steps.
    assert len(default) == len(ranked) == 20 and default != ranked
    np.testing.assert_allclose(default[0], ranked[0], atol=0.01)


def test_the_primer_options_reach_the_estimators(example):
    args, _ = example.parse_args(["--fitness-shaping", "rank", "--learn-sigma",
                                  "--methods", "pes"])
    est = example.make_estimator("pes", args.fitness_shaping, args.learn_sigma)
    assert est.fitness_shaping == "rank" and est.learn_sigma is not None
    assert est.horizon is None and est.truncation_length == 1
    args, _ = example.parse_args([])
    assert args.fitness_shaping is None and not args.learn_sigma
    assert example.make_estimator("es_single") == example.keras_es.es_single(
        example.SIGMA, truncation_length=1)


@pytest.mark.parametrize("argv, match", [
    (["--steps", "5"], "--steps=5"),
    (["--learning-rate", "0"], "--learning-rate=0.0"),
    (["--degree", "4"], "--degree=4"),
    (["--fitness-shaping", "centered"], "--fitness-shaping: invalid choice"),
    # ES-Single's one draw is never redrawn without a horizon: a learned sigma could
    # never reach it, so the flag is refused, not ignored.
    (["--learn-sigma"], "--learn-sigma is not supported with --methods es_single"),
    (["--learn-sigma", "--fitness-shaping", "rank", "--methods", "es_single", "pes"],
     "--learn-sigma is not supported with --methods es_single"),
])
def test_bad_arguments_exit_with_a_message(example, argv, match, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert match in capsys.readouterr().err
