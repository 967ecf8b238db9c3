"""The statistic match's probability strings, as kube-proxy's TestComputeProbability expects."""

from __future__ import annotations

from itertools import pairwise

from iptsync.core.render import probability


def test_probability_strings_are_kube_proxys() -> None:
    """kube-proxy's expected strings, from 1 to 100001 remaining endpoints."""
    expected = {1: "1.0000000000", 2: "0.5000000000", 10: "0.1000000000", 100: "0.0100000000",
                1000: "0.0010000000", 10000: "0.0001000000", 100000: "0.0000100000",
                100001: "0.0000099999"}
    assert expected == {n: probability(n) for n in expected}


def test_probability_rises_as_fewer_endpoints_remain() -> None:
    """From 100000 endpoints down to 2, each string is strictly above the one before it."""
    values = [(n, float(probability(n))) for n in range(100000, 1, -1)]
    assert [] == [n for (_, before), (n, value) in pairwise(values) if value <= before]
