"""Wilson score interval (the proportions of benchmarks/validity.md)."""

import math

import pytest

from medfocus.evaluation import wilson_interval


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(5, 20), (0, 10), (10, 10), (157, 840), (1, 3)])
def test_wilson_matches_the_formula(k, n):
    lo, hi = wilson_interval(k, n)
    elo, ehi = _wilson_by_hand(k, n)
    assert lo == pytest.approx(max(0.0, elo), abs=1e-9) and hi == pytest.approx(min(1.0, ehi), abs=1e-9)


def test_wilson_known_values_and_errors():
    lo, hi = wilson_interval(5, 20)
    assert (round(lo, 4), round(hi, 4)) == (0.1119, 0.4687)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="k=3, n=2"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
