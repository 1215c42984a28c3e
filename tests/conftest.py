"""Shared helpers: binomial bounds and dtype lists."""

from __future__ import annotations

import math

import fastdrop
import numpy as np
import pytest

FLOATS = [np.float16, np.float32, np.float64]

# Six standard deviations: a correct implementation fails one such check about once in 10^9.
SIGMAS = 6.0


def assert_binomial(count: int, n: int, q: float, what: str = "count") -> None:
    """`count` successes out of `n` trials is plausible for success probability `q`."""
    mean = n * q
    sd = math.sqrt(max(n * q * (1.0 - q), 1e-12))
    # For tiny expected counts a normal bound is too tight at the bottom; widen with a Poisson
    # style margin so the check stays a 1e-9-level test.
    margin = SIGMAS * sd + (SIGMAS**2 if mean < 100 else 0.0)
    assert abs(count - mean) <= margin, (
        f"{what}: {count} of {n} with q={q}: expected {mean:.1f} +- {margin:.1f}"
    )


def op_type(dtype) -> type:
    """The arithmetic type fastdrop computes a dtype in (float32 for float16)."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def expected_scaled(x: np.ndarray, scale: float) -> np.ndarray:
    """`x * scale` with the scale rounded once to the compute type, then rounded to x's dtype."""
    ot = op_type(x.dtype)
    return (x.astype(ot) * ot(scale)).astype(x.dtype)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = fastdrop.get_num_threads()
    yield
    fastdrop.set_num_threads(n)
