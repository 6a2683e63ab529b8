"""Shared fixtures for keras_es tests."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from keras_es import testing  # noqa: E402


def require_stacked_kernels(model) -> None:
    """Skips the calling test where this device has no gradient kernels for the
    grouped convolutions of ``model``'s stacked form (CPUs without oneDNN). What such
    a device does instead (fall back, or refuse ``execution="stacked"``) is tested in
    tests/engine/test_stacked.py; CI runs the stacked tests again with oneDNN on."""
    from keras_es.engine import stacked

    reason = stacked.missing_kernel(model)
    if reason:
        pytest.skip(f"stacked execution needs kernels this device lacks: {reason}")


@pytest.fixture(scope="session")
def oracle_system():
    """Linear dynamics with quadratic losses: exact gradients for every estimator."""
    return testing.oracle_system()


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def load_example():
    """``load_example(name)`` imports ``examples/<name>.py`` as a module."""
    loaded = []

    def load(name):
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        # dataclasses resolve a module's string annotations through sys.modules.
        sys.modules[name] = module
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
