"""Slot routing (granite_jax.routing) against NumPy's stable sort and plain indexing, gradients against autodiff of
plain indexing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from granite_jax.routing import combine_slots, move_rows, route_slots, slot_rows


@pytest.mark.parametrize("tokens, experts, top_k, padding", [(37, 8, 2, 0), (64, 72, 10, 0), (50, 6, 3, 11)])
def test_route_slots_is_the_stable_sort_by_expert(tokens, experts, top_k, padding):
    rng = np.random.default_rng(tokens)
    idx = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]).astype(np.int32)
    idx[:3] = np.arange(top_k)  # skew: a few tokens on the same experts
    idx.reshape(-1)[rng.choice(idx.size, padding, replace=False)] = experts  # "no expert" ids go last
    sizes, order, position = map(np.asarray, route_slots(jnp.asarray(idx), experts))
    want = np.argsort(idx.reshape(-1), kind="stable")
    np.testing.assert_array_equal(order, want)
    np.testing.assert_array_equal(position[order], np.arange(idx.size))
    np.testing.assert_array_equal(sizes, np.bincount(idx.reshape(-1), minlength=experts + 1)[:experts])


def test_move_rows_and_its_gradient_match_plain_indexing():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    src = jnp.asarray([4, 9, 0, 2, 9, 6, 1, 5, 3], jnp.int32)  # 9: out of range, an empty row; a's row 7 goes nowhere
    dst = jnp.full((8,), 9, jnp.int32).at[src].set(jnp.arange(9, dtype=jnp.int32), mode="drop")
    g = jnp.asarray(rng.normal(size=(9, 3)), jnp.float32)

    def plain(a):
        return jnp.where((src < 8)[:, None], a[jnp.minimum(src, 7)], 0)

    np.testing.assert_array_equal(move_rows(a, src, dst), plain(a))
    got = jax.grad(lambda a: jnp.sum(move_rows(a, src, dst) * g))(a)
    want = jax.grad(lambda a: jnp.sum(plain(a) * g))(a)
    np.testing.assert_allclose(got, want, rtol=0, atol=0)


def test_sorted_rows_and_combine_undo_each_other():
    rng = np.random.default_rng(1)
    T, K, E, D = 20, 3, 5, 4
    idx = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]), jnp.int32)
    w = jnp.asarray(rng.random((T, K)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    _, order, position = route_slots(idx, E)
    x_sorted = slot_rows(x, K, order, position)
    np.testing.assert_array_equal(x_sorted, np.asarray(x)[np.asarray(order) // K])
    y = combine_slots(move_rows(x_sorted, position, order), w)
    np.testing.assert_allclose(y, np.asarray(x) * np.asarray(w).sum(1, keepdims=True), rtol=1e-6)
