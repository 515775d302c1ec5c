"""The `ssd` op with impl="xla" against the float64 token-by-token recurrence: outputs, final state and gradients,
with document boundaries on, next to and away from chunk edges; plus dispatch and input validation."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ssd_reference import ssd_recurrence

import pallas_kernels.ssd as ssd_module
from pallas_kernels.ssd import ssd

CHUNK = 16
LENGTH = 53  # not a multiple of CHUNK
DT_LIMIT = (0.05, 1.0)  # clamps some of the softplus'd dt on both sides

# Boundary positions (index of the first token of a new segment) for batch row 0; row 1 gets them shifted by 3.
SEGMENT_LAYOUTS = {
    "chunk_edges": [16, 32, 48],
    "next_to_edges": [15, 17, 31, 33],
    "away_from_edges": [7, 41],
    "several_per_chunk": [3, 5, 9, 12, 20],
    "at_t1": [1, 30],
}


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.abs(actual - expected).max() / np.abs(expected).max()


def segment_ids_for(boundaries, length=LENGTH, batch=2):
    """[batch, length] int32 ids that change exactly at `boundaries` (row b: boundaries shifted by 3*b)."""
    ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        for t in boundaries:
            if 0 < t + 3 * row < length:
                ids[row, t + 3 * row :] += 1
    return ids


def make_inputs(seed, *, batch=2, length=LENGTH, heads=4, head_dim=8, groups=2, d_state=16):
    """float64 numpy inputs with Mamba-like magnitudes; `dt` is raw (before bias and softplus)."""
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=(batch, length, heads, head_dim)),
        dt=rng.normal(size=(batch, length, heads)),
        A=-rng.uniform(0.5, 4.0, size=heads),
        B=rng.normal(size=(batch, length, groups, d_state)),
        C=rng.normal(size=(batch, length, groups, d_state)),
        D=rng.normal(size=heads),
        dt_bias=rng.normal(size=heads) - 1.0,
        initial_state=rng.normal(size=(batch, heads, head_dim, d_state)),
    )


def transformed_dt(dt, dt_bias, dt_limit=DT_LIMIT):
    """The op's dt transform in float64 numpy: clip(softplus(dt + dt_bias), *dt_limit)."""
    return np.clip(np.logaddexp(0.0, dt + dt_bias), *dt_limit)


def run_op(inputs, *, segment_ids=None, chunk_size=CHUNK, use_initial_state=True, dtype=jnp.float32, **kwargs):
    args = {k: jnp.asarray(v, dtype) for k, v in inputs.items()}
    return ssd(
        args["x"],
        args["dt"],
        args["A"],
        args["B"],
        args["C"],
        chunk_size=chunk_size,
        D=args["D"],
        dt_bias=args["dt_bias"],
        dt_softplus=True,
        dt_limit=DT_LIMIT,
        initial_state=args["initial_state"] if use_initial_state else None,
        segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
        return_final_state=True,
        impl="xla",
        **kwargs,
    )


def reference(inputs, segment_ids=None, use_initial_state=True):
    i = inputs
    dt = transformed_dt(i["dt"], i["dt_bias"])
    s0 = i["initial_state"] if use_initial_state else None
    return ssd_recurrence(i["x"], dt, i["A"], i["B"], i["C"], i["D"], s0, segment_ids)


@pytest.mark.parametrize("use_initial_state", [True, False])
@pytest.mark.parametrize("layout", [None, *SEGMENT_LAYOUTS])
def test_matches_recurrence(layout, use_initial_state):
    inputs = make_inputs(0, groups=2 if use_initial_state else 1)
    segment_ids = None if layout is None else segment_ids_for(SEGMENT_LAYOUTS[layout])
    y, final = run_op(inputs, segment_ids=segment_ids, use_initial_state=use_initial_state)
    y_ref, final_ref = reference(inputs, segment_ids, use_initial_state)
    assert y.dtype == jnp.float32 and y.shape == y_ref.shape
    assert final.dtype == jnp.float32 and final.shape == final_ref.shape
    assert rel_err(y, y_ref) < 2e-4
    assert rel_err(final, final_ref) < 2e-4


def test_initial_state_dropped_after_first_boundary():
    inputs = make_inputs(1)
    segment_ids = segment_ids_for([10])
    y_with, final_with = run_op(inputs, segment_ids=segment_ids)
    y_without, final_without = run_op(inputs, segment_ids=segment_ids, use_initial_state=False)
    # Row 0 starts a new document at t=10, row 1 at t=13: from there on the initial state must not matter.
    np.testing.assert_array_equal(y_with[0, 10:], y_without[0, 10:])
    np.testing.assert_array_equal(y_with[1, 13:], y_without[1, 13:])
    np.testing.assert_array_equal(final_with, final_without)
    assert rel_err(y_with[:, :10], y_without[:, :10]) > 1e-2  # ...but before it, it does


def test_reused_segment_id_still_resets():
    """Ids 0,1,0: the change back to 0 is a new document, not a continuation of the first one."""
    inputs = make_inputs(2)
    segment_ids = np.zeros((2, LENGTH), np.int32)
    segment_ids[:, 20:30] = 1
    y, final = run_op(inputs, segment_ids=segment_ids)
    y_ref, final_ref = reference(inputs, segment_ids)
    assert rel_err(y, y_ref) < 2e-4
    assert rel_err(final, final_ref) < 2e-4


def test_independent_of_chunk_size():
    inputs = make_inputs(3)
    segment_ids = segment_ids_for([5, 16, 17, 40])
    y16, final16 = run_op(inputs, segment_ids=segment_ids, chunk_size=16)
    for chunk_size in (8, 64):  # 64 > LENGTH: a single, padded chunk
        y, final = run_op(inputs, segment_ids=segment_ids, chunk_size=chunk_size)
        assert rel_err(y, y16) < 1e-5, chunk_size
        assert rel_err(final, final16) < 1e-5, chunk_size


def test_bfloat16_inputs():
    inputs = make_inputs(4)
    as_bf16 = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) for k, v in inputs.items()}
    segment_ids = segment_ids_for([16, 23])
    y, final = run_op(inputs, segment_ids=segment_ids, dtype=jnp.bfloat16)
    y_ref, final_ref = reference(as_bf16, segment_ids)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert rel_err(y, y_ref) < 2e-2
    assert rel_err(final, final_ref) < 2e-2


# ---- gradients -------------------------------------------------------------------------------------------------------

GRAD_ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def scan_reference_loss(args, segment_ids, y_weights, state_weights):
    """An independent token-by-token recurrence in JAX (lax.scan over time), for float64 reference gradients."""
    x, B, C = args["x"], args["B"], args["C"]
    heads, groups = x.shape[2], B.shape[2]
    B_h = jnp.repeat(B, heads // groups, axis=2)
    C_h = jnp.repeat(C, heads // groups, axis=2)
    dt = jnp.clip(jax.nn.softplus(args["dt"] + args["dt_bias"]), *DT_LIMIT)
    reset = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)

    def step(S, t):
        x_t, dt_t, B_t, C_t, reset_t = t
        S = jnp.where(reset_t[:, None, None, None], 0.0, S)
        S = jnp.exp(dt_t * args["A"])[..., None, None] * S + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
        return S, jnp.einsum("bhpn,bhn->bhp", S, C_t) + args["D"][:, None] * x_t

    time_major = [jnp.moveaxis(a, 1, 0) for a in (x, dt, B_h, C_h, reset)]
    final, y = jax.lax.scan(step, args["initial_state"], time_major)
    return jnp.sum(jnp.moveaxis(y, 0, 1) * y_weights) + jnp.sum(final * state_weights)


def op_loss(args, segment_ids, y_weights, state_weights):
    y, final = ssd(
        args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=CHUNK, D=args["D"],
        dt_bias=args["dt_bias"], dt_softplus=True, dt_limit=DT_LIMIT, initial_state=args["initial_state"],
        segment_ids=segment_ids, return_final_state=True, impl="xla",
    )  # fmt: skip
    return jnp.sum(y * y_weights) + jnp.sum(final * state_weights)


@pytest.mark.parametrize("groups,boundaries", [(2, [1, 15, 16, 17, 20, 22, 33, 48]), (1, [])])
def test_gradients_match_float64_recurrence(groups, boundaries):
    inputs = make_inputs(5, groups=groups)
    segment_ids = segment_ids_for(boundaries)
    rng = np.random.default_rng(6)
    y_weights = rng.normal(size=inputs["x"].shape)
    state_weights = rng.normal(size=inputs["initial_state"].shape)

    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    grads = jax.jit(jax.grad(op_loss))(
        f32, jnp.asarray(segment_ids), jnp.asarray(y_weights, jnp.float32), jnp.asarray(state_weights, jnp.float32)
    )
    with jax.enable_x64(True):
        f64 = {k: jnp.asarray(v, jnp.float64) for k, v in inputs.items()}
        ref_grads = jax.grad(scan_reference_loss)(
            f64, jnp.asarray(segment_ids), jnp.asarray(y_weights), jnp.asarray(state_weights)
        )
        ref_grads = {k: np.asarray(v) for k, v in ref_grads.items()}
        # The JAX recurrence must itself agree with the numpy one, or its gradients prove nothing.
        y_ref, final_ref = reference(inputs, segment_ids)
        ref_loss = np.sum(y_ref * y_weights) + np.sum(final_ref * state_weights)
        np.testing.assert_allclose(scan_reference_loss(f64, segment_ids, y_weights, state_weights), ref_loss, 1e-10)

    for name in GRAD_ARGS:
        assert grads[name].dtype == jnp.float32
        assert rel_err(grads[name], ref_grads[name]) < 1e-3, name
    clamped = transformed_dt(inputs["dt"], inputs["dt_bias"])
    assert np.any(clamped == DT_LIMIT[0]) and np.any(clamped == DT_LIMIT[1])  # dt_limit was exercised


def test_no_nans_with_huge_decay_and_boundaries():
    """dt*A of -1e3 per token: within a chunk the masked exponents reach +1e4, which must never reach an exp."""
    inputs = make_inputs(7)
    inputs["dt"] = np.abs(inputs["dt"]) + 50.0
    inputs["A"] = -np.linspace(10.0, 20.0, 4)
    segment_ids = jnp.asarray(segment_ids_for([1, 16, 20, 21]))
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    ones_y, ones_state = jnp.ones(inputs["x"].shape), jnp.ones(inputs["initial_state"].shape)

    def loss(args):
        y, final = ssd(
            args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=CHUNK, D=args["D"],
            dt_bias=args["dt_bias"], dt_softplus=True, initial_state=args["initial_state"], segment_ids=segment_ids,
            return_final_state=True, impl="xla",
        )  # fmt: skip
        return jnp.sum(y * ones_y) + jnp.sum(final * ones_state)

    value, grads = jax.jit(jax.value_and_grad(loss))(f32)
    assert np.isfinite(value)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name


# ---- dispatch and validation -----------------------------------------------------------------------------------------


def small_args(**overrides):
    args = dict(
        x=jnp.zeros((2, 64, 4, 8)), dt=jnp.zeros((2, 64, 4)), A=jnp.zeros((4,)),
        B=jnp.zeros((2, 64, 2, 16)), C=jnp.zeros((2, 64, 2, 16)),
    )  # fmt: skip
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(x=jnp.zeros((2, 64, 32))), r"x has shape \(2, 64, 32\)"),
        (dict(dt=jnp.zeros((2, 64, 3))), r"dt has shape \(2, 64, 3\) but expected \(2, 64, 4\)"),
        (dict(A=jnp.zeros((2,))), r"A has shape \(2,\) but expected \(4,\)"),
        (dict(B=jnp.zeros((2, 64, 3, 16)), C=jnp.zeros((2, 64, 3, 16))), "x has 4 heads: n_groups=3 must divide"),
        (dict(B=jnp.zeros((2, 63, 2, 16))), r"B has shape \(2, 63, 2, 16\)"),
        (dict(C=jnp.zeros((2, 64, 2, 8))), r"C has shape \(2, 64, 2, 8\) but expected \(2, 64, 2, 16\)"),
        (dict(D=jnp.zeros((3,))), r"D has shape \(3,\)"),
        (dict(dt_bias=jnp.zeros((4, 1))), r"dt_bias has shape \(4, 1\)"),
        (dict(initial_state=jnp.zeros((2, 4, 16, 8))), r"initial_state has shape \(2, 4, 16, 8\)"),
        (dict(segment_ids=jnp.zeros((2, 32), jnp.int32)), r"segment_ids has shape \(2, 32\)"),
        (dict(segment_ids=jnp.zeros((2, 64))), "segment_ids has dtype float32"),
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(dt_limit=(1.0, 0.1)), "dt_limit"),
        (dict(impl="cuda"), "impl='cuda'"),
    ],
)
def test_bad_inputs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        ssd(**small_args(**overrides))


def test_missing_pallas_module_names_the_impl(monkeypatch):
    monkeypatch.delitem(ssd_module._CORES, "pallas_gpu", raising=False)
    monkeypatch.setitem(sys.modules, "pallas_kernels.ssd.pallas_gpu", None)  # makes the import fail
    with pytest.raises(ImportError, match="impl='pallas_gpu'"):
        ssd(**small_args(impl="pallas_gpu"))


def test_dispatch_passes_transformed_dt_to_registered_core(monkeypatch):
    seen = {}

    def fake_core(x, dt, A, B, C, D, initial_state, segment_ids, *, chunk_size, interpret):
        seen.update(dt=dt, chunk_size=chunk_size, interpret=interpret, D=D, initial_state=initial_state)
        b, _, h, p = x.shape
        return x, jnp.zeros((b, h, p, B.shape[-1]), jnp.float32)

    monkeypatch.setitem(ssd_module._CORES, "fake", fake_core)
    args = small_args(dt=jnp.full((2, 64, 4), -4.0, jnp.bfloat16), dt_bias=jnp.full((4,), 1.0))
    y = ssd(**args, dt_softplus=True, dt_limit=(0.0, 0.1), chunk_size=32, impl="fake", interpret=True)
    assert y is args["x"]
    assert seen["dt"].dtype == jnp.float32
    np.testing.assert_allclose(seen["dt"], np.log1p(np.exp(-3.0)), rtol=1e-6)  # softplus(-4 + 1), under the limit
    assert seen["chunk_size"] == 32 and seen["interpret"] is True
    assert seen["D"] is None and seen["initial_state"] is None


def test_auto_is_xla_on_cpu():
    assert ssd_module._resolve_auto() == "xla"
    args = small_args(x=jnp.ones((2, 64, 4, 8)), dt=jnp.full((2, 64, 4), 0.1), A=-jnp.ones((4,)))
    np.testing.assert_array_equal(ssd(**args, impl="auto"), ssd(**args, impl="xla"))
