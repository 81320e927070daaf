"""Proxy initialisation: well-separated binary codes."""

import itertools

import numpy as np
import pytest

from fdh_jax.models.proxies import min_hamming_distance, separated_binary_codes, spread_codes


def _brute_min_distance(codes):
    return min(int(np.sum(a != b)) for a, b in itertools.combinations(codes, 2))


@pytest.mark.parametrize("num_classes,bits", [(10, 16), (30, 32), (5, 8)])
def test_hadamard_codes_are_half_apart(num_classes, bits):
    codes = separated_binary_codes(num_classes, bits)
    assert codes.shape == (num_classes, bits) and codes.dtype == np.int8
    assert set(np.unique(codes)) == {-1, 1}
    assert _brute_min_distance(codes) == min_hamming_distance(codes) == bits // 2
    assert not np.any(np.all(codes == 1, axis=1))  # the degenerate all-ones row is skipped


@pytest.mark.parametrize("num_classes,bits", [(16, 12), (40, 24), (200, 12)])
def test_search_beats_random_codes(num_classes, bits):
    codes = separated_binary_codes(num_classes, bits, seed=3)
    assert len(np.unique(codes, axis=0)) == num_classes
    rng = np.random.default_rng(3)
    random_best = max(
        min_hamming_distance(rng.choice([-1, 1], size=(num_classes, bits))) for _ in range(20)
    )
    assert min_hamming_distance(codes) > random_best
    np.testing.assert_array_equal(codes, separated_binary_codes(num_classes, bits, seed=3))


def test_spread_codes_separates_given_codes_and_keeps_separated_ones():
    rng = np.random.default_rng(0)
    start = rng.choice(np.array([-1, 1], np.int8), size=(12, 16))
    start[1] = start[0]  # two classes share a code (proxies placed by similar features)
    before = start.copy()
    spread = spread_codes(start, np.random.default_rng(1))
    np.testing.assert_array_equal(start, before)  # the input is not modified
    assert _brute_min_distance(spread) > _brute_min_distance(start) == 0
    assert np.mean(spread != start) < 0.5  # flips from the given codes, not new codes
    hadamard = separated_binary_codes(10, 16)  # half apart: flips may only thin the ties
    assert min_hamming_distance(spread_codes(hadamard, np.random.default_rng(2))) == 8
