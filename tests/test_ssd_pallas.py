"""The Pallas SSD kernels (impl="pallas_tpu", "pallas_gpu") in interpret mode against the float64 token-by-token
recurrence and impl="xla": outputs, final state and every gradient, with document boundaries on, next to and away from
the kernels' chunk edges, an initial state, Granite's shapes and odd ones; the shard_map wrapper; and how far each
kernel lowers for its real backend on a CPU-only machine (TPU AOT compilation is in test_ssd_tpu_aot.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ssd_reference import ssd_recurrence
from test_ssd_xla import DT_LIMIT, make_inputs, rel_err, scan_reference_loss, transformed_dt

from pallas_kernels.ssd import _kernel_common, pallas_gpu, pallas_tpu, ssd

KERNELS = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}
ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def boundaries_around_chunks(chunk, length, extra=()):
    """Segment starts on, one before and one after each kernel chunk edge, plus `extra`."""
    edges = range(chunk, length, chunk)
    return sorted({t for e in edges for t in (e - 1, e, e + 1)} | set(extra))


def segment_ids_at(boundaries, batch, length, seed):
    """Row 0 changes document exactly at `boundaries`; other rows at random places (reusing ids, which must reset)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    for t in boundaries:
        ids[0, t:] += 1
    for row in range(1, batch):
        ids[row] = rng.integers(0, 3, size=length)[np.cumsum(rng.random(length) < 0.02)] % 3
    return ids


def op_outputs(impl, args, segment_ids, chunk_size, interpret=True, with_state=True):
    return ssd(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=chunk_size, D=args.get("D"),
               dt_bias=args.get("dt_bias"), dt_softplus=True, dt_limit=DT_LIMIT,
               initial_state=args.get("initial_state") if with_state else None,
               segment_ids=None if segment_ids is None else jnp.asarray(segment_ids), return_final_state=True,
               impl=impl, interpret=interpret)


def weighted_loss(impl, chunk_size):
    def loss(args, segment_ids, y_weights, state_weights):
        y, final = op_outputs(impl, args, segment_ids, chunk_size, interpret=impl != "xla")
        return jnp.sum(y.astype(jnp.float32) * y_weights) + jnp.sum(final * state_weights)

    return loss


def reference_outputs(inputs, segment_ids):
    dt = transformed_dt(inputs["dt"], inputs["dt_bias"])
    return ssd_recurrence(inputs["x"], dt, inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                          inputs["initial_state"], segment_ids)


def reference_grads(inputs, segment_ids, y_weights, state_weights):
    with jax.enable_x64(True):
        f64 = {k: jnp.asarray(v, jnp.float64) for k, v in inputs.items()}
        grads = jax.grad(scan_reference_loss)(f64, jnp.asarray(segment_ids), jnp.asarray(y_weights),
                                              jnp.asarray(state_weights))
        return {k: np.asarray(v) for k, v in grads.items()}


def check_against_references(impl, inputs, segment_ids, chunk_size, dtype, fwd_tol, grad_tol, compare_xla=True):
    rng = np.random.default_rng(11)
    y_weights = rng.normal(size=inputs["x"].shape)
    state_weights = rng.normal(size=inputs["initial_state"].shape)
    args = {k: jnp.asarray(v, dtype if k in ("x", "B", "C") else jnp.float32) for k, v in inputs.items()}
    # The references see exactly the (possibly bfloat16-rounded) values the kernel sees.
    seen = {k: np.asarray(v, np.float64) for k, v in args.items()}
    y_w, s_w = jnp.asarray(y_weights, jnp.float32), jnp.asarray(state_weights, jnp.float32)

    y, final = jax.jit(lambda a, s: op_outputs(impl, a, s, chunk_size))(args, jnp.asarray(segment_ids))
    assert y.dtype == dtype and y.shape == inputs["x"].shape
    assert final.dtype == jnp.float32 and final.shape == inputs["initial_state"].shape
    y_ref, final_ref = reference_outputs(seen, segment_ids)
    assert rel_err(y, y_ref) < fwd_tol
    assert rel_err(final, final_ref) < fwd_tol

    grads = jax.jit(jax.grad(weighted_loss(impl, chunk_size)))(args, jnp.asarray(segment_ids), y_w, s_w)
    ref = reference_grads(seen, segment_ids, y_weights, state_weights)
    for name in ARG_NAMES:
        assert grads[name].dtype == args[name].dtype, name
        assert rel_err(grads[name], ref[name]) < grad_tol, name

    if compare_xla:
        y_xla, final_xla = op_outputs("xla", args, jnp.asarray(segment_ids), chunk_size)
        assert rel_err(y, y_xla) < fwd_tol and rel_err(final, final_xla) < fwd_tol
        grads_xla = jax.jit(jax.grad(weighted_loss("xla", chunk_size)))(args, jnp.asarray(segment_ids), y_w, s_w)
        for name in ARG_NAMES:
            assert rel_err(grads[name], grads_xla[name]) < grad_tol, name


# Odd shapes (head_dim 32, d_state 64, n_groups 2), float32, boundaries everywhere; the kernel chunk is 128 on TPU
# (lane width) and 16 on GPU; the length is not a multiple of it.
ODD_CASES = {"pallas_tpu": dict(chunk_size=128, length=2 * 128 + 37),
             "pallas_gpu": dict(chunk_size=16, length=3 * 16 + 9)}


@pytest.mark.parametrize("impl", KERNELS)
def test_odd_shapes_float32_match_recurrence_and_xla(impl):
    case = ODD_CASES[impl]
    chunk = KERNELS[impl].kernel_chunk(case["chunk_size"])
    assert chunk == case["chunk_size"]
    length = case["length"]
    inputs = make_inputs(0, batch=2, length=length, heads=4, head_dim=32, groups=2, d_state=64)
    segment_ids = segment_ids_at(boundaries_around_chunks(chunk, length, extra=(1, 5, chunk // 2)), 2, length, 1)
    check_against_references(impl, inputs, segment_ids, case["chunk_size"], jnp.float32, 2e-4, 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_granite_shapes_bfloat16(impl):
    """head_dim 64, d_state 128, chunk 256, n_groups 1 (fewer heads/tokens than the model, for interpret speed)."""
    length = 256 + 200
    inputs = make_inputs(2, batch=1, length=length, heads=2, head_dim=64, groups=1, d_state=128)
    segment_ids = segment_ids_at([130, 255, 256, 300], 1, length, 3)
    check_against_references(impl, inputs, segment_ids, 256, jnp.bfloat16, 2e-2, 2e-2, compare_xla=False)


@pytest.mark.parametrize("impl", KERNELS)
def test_without_optional_inputs(impl, x64):
    """No D, no initial state, no segment ids: one document starting from a zero state."""
    length = 150
    inputs = make_inputs(3, batch=1, length=length, heads=2, head_dim=16, groups=1, d_state=32)
    args = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items() if k not in ("D", "dt_bias", "initial_state")}

    def run(a):
        return ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=64, dt_softplus=True, return_final_state=True,
                   impl=impl, interpret=True)

    y, final = jax.jit(run)(args)
    dt = np.logaddexp(0.0, inputs["dt"])
    y_ref, final_ref = ssd_recurrence(inputs["x"], dt, inputs["A"], inputs["B"], inputs["C"])
    assert rel_err(y, y_ref) < 2e-4 and rel_err(final, final_ref) < 2e-4
    grads = jax.jit(jax.grad(lambda a: jnp.sum(run(a)[0] ** 2)))(args)
    grads_xla = jax.grad(lambda a: jnp.sum(ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=64,
                                                dt_softplus=True, impl="xla") ** 2))(args)
    for name in args:
        assert rel_err(grads[name], grads_xla[name]) < 1e-3, name


@pytest.mark.parametrize("impl", KERNELS)
def test_no_nans_with_huge_decay(impl, x64):
    """dt*A of about -1e3 per token: every exponent the kernels take must be a clamped, non-positive difference."""
    length = 140
    inputs = make_inputs(7, batch=1, length=length, heads=2, head_dim=16, groups=1, d_state=32)
    inputs["dt"] = np.abs(inputs["dt"]) + 50.0
    inputs["A"] = -np.linspace(10.0, 20.0, 2)
    args = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    segment_ids = jnp.asarray(segment_ids_at([1, 64, 70], 1, length, 0))
    loss = weighted_loss(impl, 64)
    value, grads = jax.jit(jax.value_and_grad(loss))(args, segment_ids, jnp.ones(inputs["x"].shape),
                                                     jnp.ones(inputs["initial_state"].shape))
    assert np.isfinite(value)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name


# ---- shard_map -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl,groups", [("pallas_gpu", 2), ("pallas_tpu", 1)])
def test_sharded_matches_unsharded(impl, groups, x64):
    """Batch over data (2), heads over tensor (2) on 4 of the 8 host devices; value and gradients as unsharded."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    core = KERNELS[impl].ssd_core
    sharded = _kernel_common.shard_ssd_core(core, mesh)
    length = 100
    inputs = make_inputs(4, batch=2, length=length, heads=4, head_dim=16, groups=groups, d_state=32)
    dt = jnp.asarray(transformed_dt(inputs["dt"], inputs["dt_bias"]), jnp.float32)
    names = ("x", "A", "B", "C", "D", "initial_state")
    args = {k: jnp.asarray(inputs[k], jnp.float32) for k in names} | {"dt": dt}
    segment_ids = jnp.asarray(segment_ids_at([33, 64], 2, length, 5))
    bc = P("data", None, "tensor" if groups > 1 else None)
    specs = dict(x=P("data", None, "tensor"), dt=P("data", None, "tensor"), A=P("tensor"), B=bc, C=bc, D=P("tensor"),
                 initial_state=P("data", "tensor"))
    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in args.items()}

    def loss(fn, a):
        y, final = fn(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["initial_state"], segment_ids,
                      chunk_size=64, interpret=True)
        return jnp.sum(jnp.sin(y)) + jnp.sum(final**2), (y, final)

    (_, (y_s, f_s)), g_s = jax.jit(jax.value_and_grad(lambda a: loss(sharded, a), has_aux=True))(placed)
    (_, (y_u, f_u)), g_u = jax.jit(jax.value_and_grad(lambda a: loss(core, a), has_aux=True))(args)
    assert y_s.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "tensor")), y_s.ndim)
    assert rel_err(y_s, y_u) < 1e-5 and rel_err(f_s, f_u) < 1e-5
    for name in args:
        assert rel_err(g_s[name], g_u[name]) < 1e-5, name


def test_sharding_groups_that_cannot_follow_heads_raises():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("data", "tensor"))
    sharded = _kernel_common.shard_ssd_core(pallas_gpu.ssd_core, mesh)
    x, dt, A = jnp.zeros((1, 16, 8, 16)), jnp.zeros((1, 16, 8)), jnp.zeros((8,))
    B = jnp.zeros((1, 16, 2, 16))
    with pytest.raises(ValueError, match="n_groups=2 cannot follow heads split 4 ways"):
        sharded(x, dt, A, B, B, None, None, None, chunk_size=16)


# ---- lowering for the real backends (no accelerator needed) ---------------------------------------------------------


def granite_shaped_args(dtype=jnp.bfloat16, batch=1, length=1024, heads=4):
    sds = jax.ShapeDtypeStruct
    return (sds((batch, length, heads, 64), dtype), sds((batch, length, heads), jnp.float32),
            sds((heads,), jnp.float32),
            sds((batch, length, 1, 128), dtype), sds((batch, length, 1, 128), dtype), sds((heads,), jnp.float32),
            sds((batch, heads, 64, 128), jnp.float32), sds((batch, length), jnp.int32))


def forward_and_backward(core):
    def forward(*args):
        return core(*args, chunk_size=256)

    def loss(*args):
        y, final = core(*args, chunk_size=256)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(final)

    return {"forward": forward, "backward": jax.grad(loss, argnums=tuple(range(7)))}


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_gpu_kernels_lower_to_triton(which):
    """Cross-platform lowering runs the Pallas -> Triton IR lowering (and its power-of-two checks) on CPU; only the
    Triton -> PTX compile, done by XLA's GPU backend, needs a GPU. The Triton custom call has no export stability
    guarantee, hence the disabled check (this module is inspected, never serialized)."""
    check = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    fn = forward_and_backward(pallas_gpu.ssd_core)[which]
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=check)(*granite_shaped_args())
    calls = exported.mlir_module().count("__gpu$xla.gpu.triton")
    assert calls == (1 if which == "forward" else 3)  # backward: forward (y feeds the loss), states, reverse pass


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_tpu_kernels_lower_to_mosaic(which):
    """Mosaic lowering to a tpu_custom_call, without libtpu (its compilation: test_ssd_tpu_aot.py)."""
    fn = forward_and_backward(pallas_tpu.ssd_core)[which]
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*granite_shaped_args())
    assert exported.mlir_module().count("tpu_custom_call") == (1 if which == "forward" else 3)
