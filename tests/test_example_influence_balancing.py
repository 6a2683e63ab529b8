"""examples/influence_balancing.py runs end to end and writes its JSON and plot."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("influence_balancing")


@pytest.mark.slow
def test_small_run_schema_and_directions(example, tmp_path):
    out = tmp_path / "ib.json"
    result = example.main(["--steps", "400", "--num-particles", "200", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "ib.png").stat().st_size > 10_000
    assert result["theta_star"] == pytest.approx(-1.0 / 6.0)
    methods = result["methods"]
    assert set(methods) == {"pes", "es_single", "truncated_es", "truncated_backprop"}
    # 400 steps are enough for the unbiased estimators to get close and for the
    # truncated ones to have moved away from theta*.
    for name in ("pes", "es_single"):
        assert methods[name]["error"] < 0.05, methods[name]
    for name in ("truncated_es", "truncated_backprop"):
        assert methods[name]["theta_final"] > 0.5, methods[name]
