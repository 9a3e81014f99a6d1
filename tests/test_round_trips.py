"""Every output the API takes back somewhere is accepted there, with and without padding (CPU; the GPU
suite runs the same rows from tests/round_trips.py)."""

import pytest
from round_trips import ROUND_TRIPS, problem


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip(name, padded):
    ROUND_TRIPS[name](problem(padded), lambda array: array)
