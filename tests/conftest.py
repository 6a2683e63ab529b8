"""Shared fixtures for keras_es tests."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from keras_es import testing  # noqa: E402


@pytest.fixture(scope="session")
def oracle_system():
    """Linear dynamics with quadratic losses: exact gradients for every estimator."""
    return testing.oracle_system()
