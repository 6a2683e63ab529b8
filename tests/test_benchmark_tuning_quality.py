"""benchmarks/tuning_quality.py's summary: intervals, paired verdicts and the table.

A claim ("ES-Single lower") is printed only where the paired interval excludes zero.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import tuning_quality  # noqa: E402


def _run(loss, steps=100):
    return {"6": {"test_loss": loss, "test_accuracy": 0.9, "wall_s": 1.0, "steps": steps}}


def test_interval_is_the_t_interval():
    got = tuning_quality.interval([1.0, 2.0, 3.0, None, float("nan")])
    assert got["n"] == 3 and got["mean"] == pytest.approx(2.0)
    # t(0.975, 2) = 4.303; std 1; sqrt(3)
    assert got["high"] - got["mean"] == pytest.approx(4.3027 / np.sqrt(3), rel=1e-4)
    assert tuning_quality.interval([1.0])["low"] is None


def test_paired_verdicts_need_an_interval_that_excludes_zero():
    seeds = range(5)
    runs = {}
    for s in seeds:
        runs[f"t/es_single/{s}"] = _run(0.10 + 0.001 * s)
        runs[f"t/random/{s}"] = _run(0.20 + 0.001 * s)         # always 0.1 higher
        runs[f"t/bayesian/{s}"] = _run(0.10 + 0.05 * (-1) ** s)  # noisy around ES
    table = tuning_quality.summarize(runs, ["t"], [6], seeds)
    cell = table["t/6"]
    assert cell["es_single_minus_random"]["es_single_better"]
    assert not cell["es_single_minus_bayesian"]["es_single_better"]
    assert not cell["es_single_minus_bayesian"]["es_single_worse"]
    text = tuning_quality.markdown(table, ["t"], [6])
    assert "| t | 6x | random | " in text and "ES-Single lower" in text
    assert "| t | 6x | bayesian | " in text and "no difference shown" in text
