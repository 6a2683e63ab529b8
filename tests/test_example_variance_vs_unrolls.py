"""examples/variance_vs_unrolls.py: ES-Single's variance does not depend on the number of
unrolls and equals (P + 1) ||g||^2; PES's equals its exact value and grows with the
number of unrolls when per-step gradients are independent. Tolerances are z-scores
from each measured variance's own standard error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from keras_es import testing

Z = 4.0  # |z| bound for a measured variance against its exact value


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("variance_vs_unrolls")


def test_exact_variances_match_the_closed_forms(example):
    """The quadratic-form variance of PES reduces to keras_es.testing's closed form when
    each window's loss depends on that window's noise only; ES-Single's is (P + 1)||g||^2
    whatever the unrolls."""
    _, _, grads, _ = example.make_system("independent", 16)
    window_grads = np.einsum("ttp->tp", grads)
    for k in (16, 4, 1):
        es, pes = example.exact_variances(grads, k)
        assert es == pytest.approx(testing.es_total_variance(grads.sum(axis=(0, 1))))
        closed = testing.pes_total_variance(window_grads.reshape(16 // k, k, -1).sum(1))
        assert pes == pytest.approx(closed, rel=1e-9)


@pytest.mark.slow
def test_quick_run_es_single_flat_pes_growing(example, tmp_path):
    out = tmp_path / "variance.json"
    result = example.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "variance.png").stat().st_size > 10_000
    r = result["systems"]["independent"]
    es, pes = r["es_single"], r["pes"]
    assert r["unrolls"] == [1, 4, 16]
    # Both estimators match their exact variances, and their means the exact gradient.
    for row in (es, pes):
        assert np.all(np.abs(row["z_vs_exact"]) < Z), row
        assert max(row["bias_z_max"]) < Z + 0.5, row
    # ES-Single: the same variance at every number of unrolls (its online estimates sum
    # to the full-unroll estimate on the same noise), the (P + 1) ||g||^2 of full ES.
    np.testing.assert_allclose(es["variance"], es["variance"][0], rtol=1e-4)
    assert es["exact"] == pytest.approx([r["es_reference"]] * 3)
    # PES: grows with the unrolls, beyond Z standard errors at each step.
    for i in range(1, 3):
        gap = pes["variance"][i] - pes["variance"][i - 1]
        assert gap > Z * np.hypot(pes["se"][i], pes["se"][i - 1]), pes
    gap = pes["variance"][-1] - es["variance"][-1]
    assert gap > Z * np.hypot(pes["se"][-1], es["se"][-1])


@pytest.mark.parametrize("argv, match", [
    (["--unrolls", "3"], "--unrolls=[3]"),
    (["--horizon", "1"], "--horizon=1"),
    (["--pairs", "1"], "--pairs=1"),
])
def test_bad_arguments_exit_with_a_message(example, argv, match, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert match in capsys.readouterr().err
