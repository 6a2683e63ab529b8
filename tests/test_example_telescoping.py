"""examples/telescoping.py runs end to end (a small configuration of --quick) and
reports, for the sum and the final-loss meta-objectives, the schedules ES-Single
learned and their scores on fresh seeds beside each objective's grid best."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("telescoping")


@pytest.mark.slow
def test_small_run_schema_and_scores(example, tmp_path):
    out = tmp_path / "telescoping.json"
    methods = ["sum", "final_episode_end"]
    result = example.main(["--quick", "--horizon", "20", "--particles", "4", "--windows", "4",
                           "--grid", "2", "--grid-seeds", "1", "--eval-seeds", "2",
                           "--no-stagger", "--methods", *methods, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "telescoping.png").stat().st_size > 10_000
    assert result["dataset"] == "digits" and result["settings"]["meta_batch_size"] == 1000
    assert list(result["methods"]) == methods
    for name, run in result["methods"].items():
        assert (run["meta_objective"], run["telescope"]) == example.METHODS[name]
        trajectory = np.asarray(run["trajectory"])
        assert trajectory.shape == (4 + 2, 2) and np.all(np.isfinite(trajectory))
        values = example.task.SPACE.decode(np.asarray(run["theta_final"], np.float32))
        assert values == pytest.approx(run["values_final"])
    schedules = result["schedules"]
    assert set(schedules) == {"initial", *methods, "grid_best_sum", "grid_best_final"}
    for row in schedules.values():
        for key in ("final_train_loss", "mean_train_loss"):
            assert 0.0 < row[key] <= example.LOSS_CAP and math.isfinite(row[f"{key}_se"])
    assert schedules["initial"]["lr0"] == pytest.approx(example.task.INITIAL["lr0"])
    paired = result["paired"]["final_episode_end_minus_sum/final_train_loss"]
    assert math.isfinite(paired["mean"]) and paired["se"] >= 0.0
    for key in ("mean_train_loss", "final_train_loss"):
        assert np.asarray(result["grid"][key]).shape == (2, 2)


@pytest.mark.parametrize("argv, match", [
    (["--particles", "3"], "--particles=3"),
    (["--horizon", "25"], "--horizon=25"),
    (["--windows", "0"], "--windows=0"),
    (["--jit", "2"], "--jit=2"),
])
def test_bad_arguments_exit_with_a_message(example, argv, match, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert match in capsys.readouterr().err
