"""Invariants of the shuffle baselines (method.md 3.1)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from torch_modularity import SHUFFLE_METHODS, shuffle_weights


def _half_zero_matrix(seed=0, shape=(20, 30)):
    """Exactly half zeros, the other half distinct non-zero values (so multisets are exact)."""
    rng = np.random.default_rng(seed)
    n = shape[0] * shape[1]
    flat = np.zeros(n)
    positions = rng.permutation(n)[: n // 2]
    flat[positions] = rng.uniform(0.1, 1.0, n // 2) * rng.choice([-1.0, 1.0], n // 2)
    return flat.reshape(shape)


def test_methods_of_the_contract_are_offered():
    assert set(SHUFFLE_METHODS) == {"layer", "layer_nonzero"}


def test_layer_keeps_multiset_and_shape_and_moves_the_mask():
    w = _half_zero_matrix(0)
    out = shuffle_weights([w], "layer", np.random.default_rng(1))[0]
    assert out.shape == w.shape
    np.testing.assert_array_equal(np.sort(out.ravel()), np.sort(w.ravel()))
    assert np.count_nonzero(out) == np.count_nonzero(w) == 300
    # 600 entries, 300 zeros: the chance that a uniform shuffle keeps the mask is 1 / C(600, 300)
    assert not np.array_equal(out != 0, w != 0)


def test_layer_shuffles_across_rows_and_columns():
    # a value must be able to land anywhere, not only within its row or column
    w = np.arange(1.0, 13.0).reshape(3, 4)
    rng = np.random.default_rng(2)
    seen_at_origin = {shuffle_weights([w], "layer", rng)[0][0, 0] for _ in range(300)}
    assert seen_at_origin == set(w.ravel())


def test_layer_permutations_are_uniform():
    # 2x2 matrix with distinct entries: 24 possible arrangements, each should appear about
    # 2400 / 24 = 100 times (binomial sd ~ 9.8); 60..140 is a > 4 sd band
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    rng = np.random.default_rng(3)
    counts = {p: 0 for p in itertools.permutations([1.0, 2.0, 3.0, 4.0])}
    for _ in range(2400):
        counts[tuple(shuffle_weights([w], "layer", rng)[0].ravel())] += 1
    assert min(counts.values()) >= 60 and max(counts.values()) <= 140, counts


def test_layer_nonzero_keeps_multiset_and_exact_mask():
    w = _half_zero_matrix(4)
    out = shuffle_weights([w], "layer_nonzero", np.random.default_rng(5))[0]
    assert out.shape == w.shape
    np.testing.assert_array_equal(out != 0, w != 0)
    np.testing.assert_array_equal(np.sort(out.ravel()), np.sort(w.ravel()))
    # the 300 non-zero values were permuted (identity has probability 1 / 300!)
    assert not np.array_equal(out, w)


def test_each_matrix_is_shuffled_on_its_own():
    # values never travel between matrices: disjoint value ranges per matrix
    rng = np.random.default_rng(6)
    ws = [rng.uniform(1, 2, (5, 4)), rng.uniform(10, 20, (3, 5)), rng.uniform(100, 200, (2, 3))]
    ws[1][0, :] = 0
    for method in SHUFFLE_METHODS:
        out = shuffle_weights(ws, method, np.random.default_rng(7))
        assert len(out) == 3
        for a, b in zip(ws, out):
            assert a.shape == b.shape
            np.testing.assert_array_equal(np.sort(a.ravel()), np.sort(b.ravel()))


@pytest.mark.parametrize("method", SHUFFLE_METHODS)
def test_inputs_are_not_modified(method):
    ws = [_half_zero_matrix(8), _half_zero_matrix(9, (30, 10))]
    copies = [w.copy() for w in ws]
    out = shuffle_weights(ws, method, np.random.default_rng(10))
    for w, c, o in zip(ws, copies, out):
        np.testing.assert_array_equal(w, c)
        assert not np.shares_memory(w, o)


@pytest.mark.parametrize("method", SHUFFLE_METHODS)
def test_deterministic_given_the_rng(method):
    ws = [_half_zero_matrix(11), _half_zero_matrix(12, (30, 10))]
    a = shuffle_weights(ws, method, np.random.default_rng(13))
    b = shuffle_weights(ws, method, np.random.default_rng(13))
    c = shuffle_weights(ws, method, np.random.default_rng(14))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_layer_nonzero_of_all_zero_matrix_stays_zero():
    out = shuffle_weights([np.zeros((3, 4))], "layer_nonzero", np.random.default_rng(0))[0]
    np.testing.assert_array_equal(out, np.zeros((3, 4)))


@pytest.mark.parametrize("bad", ["Layer", "layer_nonzero_distribution", "", "random"])
def test_unknown_method_raises(bad):
    with pytest.raises(ValueError, match="unknown shuffle method") as info:
        shuffle_weights([np.ones((2, 2))], bad, np.random.default_rng(0))
    assert "layer_nonzero" in str(info.value)  # names the valid choices
