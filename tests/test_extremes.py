"""Extreme values compute a finite, correct result or raise a ValueError naming the argument (CPU; the
GPU suite runs the same rows from tests/extremes.py)."""

import pytest
from extremes import EXTREMES


@pytest.mark.parametrize("name", sorted(EXTREMES))
def test_extreme_values(name):
    EXTREMES[name](lambda array: array)
