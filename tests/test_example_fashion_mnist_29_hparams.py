"""examples/fashion_mnist_29_hparams.py runs end to end with --quick on embedded data."""

from __future__ import annotations

import math

import pytest


@pytest.mark.slow
def test_quick_run_tunes_29_hyperparameters(load_example, tmp_path, capsys):
    example = load_example("fashion_mnist_29_hparams")
    val_loss = example.main(["--quick", "--directory", str(tmp_path)])
    out = capsys.readouterr().out
    assert math.isfinite(val_loss) and val_loss < math.log(10.0)  # better than chance
    # Every round is an outer step, the staggered start's included.
    assert "3 outer steps over 3 rounds" in out
    mean = out.split("Mean theta")[1].split("Trajectory")[0]
    names = [line.split(":")[0].strip() for line in mean.strip().splitlines()[1:]]
    assert len(names) == 29 and sum(n.startswith("units_") for n in names) == 5
