"""Expert parallelism on 8 CPU devices: the all-to-all dispatch gives the single-device model's forward, losses and
gradients, with routing skewed so that two experts take most tokens and others none; several meshes and experts per
device; the ragged transport (XLA:CPU lacks it) checked against an emulation of `ragged_all_to_all`; and 72 experts
with top-10 routing train."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from granite_jax import expert_parallel as ep
from granite_jax import sharding as sh
from granite_jax.config import preset
from granite_jax.model import GraniteModel
from granite_jax.moe import MoE, expert_load_metrics

pytestmark = pytest.mark.filterwarnings("ignore:'sharding_names' is deprecated:DeprecationWarning")

B, L = 8, 16


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _skew_direction(hidden):
    u = jax.random.normal(jax.random.key(7), (hidden,))
    return u / jnp.linalg.norm(u)


def skewed_model(num_experts, top_k, **overrides):
    """A 2-layer hybrid (Mamba + attention) whose routers send nearly all slots to experts 0..top_k-1 and none to most
    others: every token gets a common component u (added to all embeddings) that those routers' columns align with."""
    cfg = preset("debug-hybrid-moe", **{"num_hidden_layers": 2, "layer_types": ("mamba", "attention"),
                                        "mamba_chunk_size": 8, "num_local_experts": num_experts,
                                        "num_experts_per_tok": top_k, **overrides})
    model = GraniteModel(cfg, rngs=nnx.Rngs(0))
    u = _skew_direction(cfg.hidden_size)
    model.embed_tokens[...] += 0.05 * u
    for block in model.layers.blocks:
        router = block.moe.router[...]
        for e in range(top_k):
            router = router.at[..., e].add((3.0 - 0.6 * e) * u)
        block.moe.router[...] = router
    return model


def batch(vocab):
    ids = jax.random.randint(jax.random.key(1), (B, L), 0, vocab)
    segment_ids = jnp.ones((B, L), jnp.int32).at[:, L - 3:].set(0).at[:, : L // 2].set(2)  # padding + 2 documents
    return ids, segment_ids


def loss_fn(model, ids, segment_ids):
    logits, aux = model(ids, segment_ids=segment_ids, return_aux=True)
    target_logits = jnp.take_along_axis(logits, jnp.roll(ids, -1, 1)[..., None], -1)[..., 0]
    ce = jnp.mean(jax.nn.logsumexp(logits, -1) - target_logits)
    return ce + 0.1 * aux["load_balancing_loss"] + 0.01 * aux["router_z_loss"], (logits, aux)


def run_sharded(model, mesh, *args, fn=loss_fn):
    """value_and_grad of `fn` under jit on `mesh`, parameters and batch sharded by the rules; also returns the HLO."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sh.param_shardings(state, mesh))
    args = [jax.device_put(a, NamedSharding(mesh, sh.logical_to_spec(sh.batch_names(a.ndim), mesh))) for a in args]

    @jax.jit
    def step(state, *args):
        return nnx.value_and_grad(fn, has_aux=True)(nnx.merge(graphdef, state), *args)

    with jax.set_mesh(mesh):
        lowered = step.lower(state, *args)
        return lowered.compile()(state, *args), lowered.as_text()


def assert_matches_single_device(model, mesh, args, fn=loss_fn, all_to_all=True):
    (loss, (logits, aux)), grads = nnx.jit(nnx.value_and_grad(fn, has_aux=True))(model, *args)
    ((ep_loss, (ep_logits, ep_aux)), ep_grads), hlo = run_sharded(model, mesh, *args, fn=fn)
    assert ("all_to_all" in hlo) == all_to_all, "the expected path was not taken"
    assert _rel_err(ep_logits, logits) <= 1e-4
    assert _rel_err(ep_loss, loss) <= 1e-5
    for key in ("load_balancing_loss", "router_z_loss", "expert_load"):
        assert _rel_err(ep_aux[key], aux[key]) <= 1e-5, key
    ref = dict(nnx.to_flat_state(grads))
    flat = nnx.to_flat_state(ep_grads)
    assert len(flat) == len(ref)
    for path, g in flat:
        assert _rel_err(g[...], ref[path][...]) <= 1e-4, path
    return aux


ATTENTION_ONLY = {"num_hidden_layers": 1, "layer_types": ("attention",)}  # compiles in half the time


@pytest.mark.parametrize("mesh_cfg, num_experts, top_k, overrides", [
    pytest.param({"expert": 8}, 16, 2, {}, marks=pytest.mark.slow),  # Mamba + attention; 2 experts per device
    ({"expert": 4, "fsdp": 2}, 12, 3, ATTENTION_ONLY),           # 3 per device, weights' hidden dim FSDP-sharded
    ({"expert": 2, "tensor": 2, "data": 2}, 6, 2, ATTENTION_ONLY),  # 3 per device, FFN width tensor-sharded
])
def test_model_matches_single_device_with_skewed_routing(mesh_cfg, num_experts, top_k, overrides):
    model = skewed_model(num_experts, top_k, **overrides)
    aux = assert_matches_single_device(model, sh.make_mesh(mesh_cfg), batch(model.config.vocab_size))
    load = np.asarray(aux["expert_load"])
    assert np.all(load[:, :2].sum(-1) >= 0.6), load  # the skew the test is about
    assert np.all(np.any(load == 0, axis=-1)), load


def _moe_layer(num_experts, top_k, dispatch="auto", hidden=32, ffn=16):
    moe = MoE(hidden, ffn, num_experts, top_k, init_std=0.2, impl="auto", param_dtype=jnp.float32,
              dtype=jnp.float32, rngs=nnx.Rngs(0), dispatch=dispatch)
    u = _skew_direction(hidden)
    moe.router[...] = moe.router[...].at[:, 0].add(3 * u).at[:, 1].add(2.7 * u)
    x = jax.random.normal(jax.random.key(1), (B, L, hidden)) + 4.0 * u  # every token picks experts 0 and 1
    return moe, x


def _moe_loss(moe, x):
    y, stats = moe(x, jnp.ones(x.shape[:2], bool))
    return jnp.sum(jnp.sin(y)), (y, {"load_balancing_loss": jnp.sum(stats["probs"]), "router_z_loss": stats["z_sq"],
                                     "expert_load": stats["counts"]})


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, **_):
    """`jax.lax.ragged_all_to_all`'s documented semantics from all_gathers (differentiable), for XLA:CPU."""
    n = send_sizes.shape[0]
    me = jax.lax.axis_index(axis_name)
    all_x = jax.lax.all_gather(operand, axis_name)
    in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name)[:, me] for a in (input_offsets, send_sizes,
                                                                              output_offsets))
    r = jnp.arange(output.shape[0])
    for i in range(n):  # sender i's slice lands at out_off[i]
        inside = (r >= out_off[i]) & (r < out_off[i] + sizes[i])
        rows = jnp.clip(in_off[i] + r - out_off[i], 0, operand.shape[0] - 1)
        output = jnp.where(inside[:, None], all_x[i][rows], output)
    return output


@pytest.mark.parametrize("transport", ["all_to_all", "ragged_all_to_all"])
@pytest.mark.parametrize("mesh_cfg, num_experts, top_k", [
    ({"expert": 8}, 16, 4),               # K > experts per device: a peer can be sent up to T*2 rows
    ({"expert": 4, "fsdp": 2}, 8, 2),
])
def test_all_tokens_on_one_device(monkeypatch, transport, mesh_cfg, num_experts, top_k):
    """The worst case the buffers are sized for: every slot of every device goes to experts 0 and 1 (device 0)."""
    if transport == "ragged_all_to_all":
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    moe, x = _moe_layer(num_experts, top_k, dispatch=transport)
    _, (_, stats) = _moe_loss(moe, x)
    assert float(stats["expert_load"][:, :2].sum()) == B * L * 2
    assert_matches_single_device(moe, sh.make_mesh(mesh_cfg), (x,), fn=_moe_loss)


def test_local_dispatch_one_device_and_no_mesh_take_the_global_path():
    moe, x = _moe_layer(8, 2, dispatch="local")
    *_, hlo = run_sharded(moe, sh.make_mesh({"expert": 8}), x, fn=_moe_loss)
    assert "all_to_all" not in hlo
    w_in, w_out = (8, 32, 2, 16), (8, 16, 32)
    with jax.set_mesh(sh.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])):
        assert ep.make_plan("auto", (B, L, 32), MoE.W_IN_AXES, w_in, MoE.W_OUT_AXES, w_out) is None
    assert ep.make_plan("auto", (B, L, 32), MoE.W_IN_AXES, w_in, MoE.W_OUT_AXES, w_out) is None  # no mesh


def test_no_expert_axis_runs_every_expert_per_device():
    """Experts not sharded: each device routes its own tokens through all experts (one shard_map, no exchange)."""
    w_in, w_out = (8, 32, 2, 16), (8, 16, 32)
    mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
    plan = ep.make_plan("auto", (B, L, 32), MoE.W_IN_AXES, w_in, MoE.W_OUT_AXES, w_out, mesh=mesh.abstract_mesh)
    assert (plan.ep, plan.token_axes, plan.gather_in, plan.reduce_axes) == (1, ("fsdp",), ("fsdp",), ("tensor",))
    context = sh.make_mesh({"fsdp": 4, "context": 2}).abstract_mesh  # the sequence sharded: the global path
    assert ep.make_plan("auto", (B, L, 32), MoE.W_IN_AXES, w_in, MoE.W_OUT_AXES, w_out, mesh=context) is None
    model = skewed_model(8, 2, **ATTENTION_ONLY)
    assert_matches_single_device(model, mesh, batch(model.config.vocab_size), all_to_all=False)


def test_plan_axes_and_errors():
    w_in, w_out = (16, 32, 2, 16), (16, 16, 32)
    mesh = sh.make_mesh({"expert": 2, "tensor": 2, "fsdp": 2})
    plan = ep.make_plan("auto", (B, L, 32), MoE.W_IN_AXES, w_in, MoE.W_OUT_AXES, w_out, mesh=mesh.abstract_mesh)
    assert (plan.ep_axes, plan.ep, plan.token_axes) == (("expert",), 2, ("fsdp", "expert"))
    assert (plan.gather_in, plan.gather_out, plan.reduce_axes, plan.transport) == (("fsdp",), ("fsdp",),
                                                                                   ("tensor",), "all_to_all")
    with pytest.raises(ValueError, match=r"6 tokens \(batch 2 x length 3\) do not split over mesh fsdp=2 x expert=2"):
        ep.make_plan("auto", (2, 3, 32), MoE.W_IN_AXES, w_in, MoE.W_OUT_AXES, w_out, mesh=mesh.abstract_mesh)
    with pytest.raises(ValueError, match="moe dispatch 'nccl'"):
        ep.make_plan("nccl", (B, L, 32), MoE.W_IN_AXES, w_in, MoE.W_OUT_AXES, w_out)
    with pytest.raises(ValueError, match=r"moe_dispatch='nccl': must be one of"):
        preset("debug-hybrid-moe", moe_dispatch="nccl")
    assert "moe_dispatch" not in preset("debug-hybrid-moe").to_hf()


def test_local_expert_ids_of_a_receive_buffer():
    counts = jnp.array([[2, 0, 1], [0, 0, 0], [0, 3, 1]])  # rows from 3 peers for 3 local experts
    ids = ep.local_expert_ids(counts, jnp.array([0, 4, 8]), 12)  # padded blocks of 4 rows
    np.testing.assert_array_equal(ids, [0, 0, 2, 3, 3, 3, 3, 3, 1, 1, 1, 2])
    ids = ep.local_expert_ids(counts, jnp.array([0, 3, 3]), 9)  # ragged: back to back, then unused rows
    np.testing.assert_array_equal(ids, [0, 0, 2, 1, 1, 1, 2, 3, 3])


def test_expert_load_metrics():
    load = jnp.array([[0.25, 0.25, 0.25, 0.25], [0.7, 0.3, 0.0, 0.0]])
    m = expert_load_metrics(load)
    np.testing.assert_allclose(m["max_over_mean"], [1.0, 2.8])
    np.testing.assert_allclose(m["min_over_mean"], [1.0, 0.0])
    np.testing.assert_allclose(m["unused_fraction"], [0.0, 0.5])
    assert float(m["max_over_mean_worst"]) == pytest.approx(2.8) and float(m["unused_fraction_worst"]) == 0.5


def test_all_to_all_bytes_granite_small():
    cfg = preset("granite-4.0-h-small", dtype="bfloat16")
    v = ep.all_to_all_bytes(cfg, {"fsdp": 32, "expert": 8}, tokens_per_device=4096)
    row = 4096 * 2
    assert v["padded_all_to_all"] == 2 * 7 * 4096 * 9 * row  # cap = T * min(10, 9)
    assert v["ragged_all_to_all_balanced"] == 2 * 40960 * 7 / 8 * row
    assert v["receive_buffer"] == 8 * 4096 * 9 * row
    assert v["weight_all_gather"] == 9 * 3 * 4096 * 768 * 2 * 31 / 32
    with pytest.raises(ValueError, match="72 experts do not split over mesh expert=16"):
        ep.all_to_all_bytes(cfg, {"expert": 16}, tokens_per_device=4096)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (pip install -e "
                    "'.[tpu]'); it is what compiles for real TPU targets")
def test_ragged_transport_compiles_for_tpu():
    """XLA:CPU cannot run `ragged_all_to_all`; libtpu's AOT compiler shows the ragged path (fwd+bwd) builds for TPU,
    and that `auto` picks it on a TPU mesh."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    mesh = sh.make_mesh({"expert": 4, "fsdp": 2}, devices=devices)
    with nnx.use_eager_sharding(False):
        moe = nnx.eval_shape(lambda: MoE(256, 128, 16, 2, init_std=0.02, impl="ragged_dot", param_dtype=jnp.float32,
                                         dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(moe)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                         sh.param_shardings(state, mesh))
    x = jax.ShapeDtypeStruct((8, 256, 256), jnp.bfloat16,
                             sharding=NamedSharding(mesh, sh.logical_to_spec(("batch", "length", None), mesh)))

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x, jnp.ones(x.shape[:2], bool))[0].astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
    assert "ragged-all-to-all" in compiled.as_text()


@pytest.mark.slow
def test_72_experts_top10_over_8_devices_train():
    cfg = preset("debug-hybrid-moe", num_local_experts=72, num_experts_per_tok=10, intermediate_size=16,
                 **ATTENTION_ONLY)
    mesh = sh.make_mesh({"expert": 8})  # 9 experts per device
    ids, segment_ids = batch(cfg.vocab_size)
    model = GraniteModel(cfg, rngs=nnx.Rngs(0))
    tx = optax.adamw(3e-3)
    graphdef, params = nnx.split(model)
    shardings = sh.param_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    opt_state = tx.init(params)
    ids, segment_ids = (jax.device_put(a, NamedSharding(mesh, sh.logical_to_spec(("batch", "length"), mesh)))
                        for a in (ids, segment_ids))

    @jax.jit
    def step(params, opt_state):
        (loss, (_, aux)), grads = jax.value_and_grad(
            lambda p: loss_fn(nnx.merge(graphdef, p), ids, segment_ids), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux, grads

    losses = []
    with jax.set_mesh(mesh):
        lowered = step.lower(params, opt_state)
        assert "all_to_all" in lowered.as_text()
        step = lowered.compile()
        for _ in range(6):
            params, opt_state, loss, aux, grads = step(params, opt_state)
            losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
    assert aux["expert_load"].shape == (1, 72)
    w_in_grad = np.asarray(grads["layers"]["blocks"][0]["moe"]["input_linear"][...])  # [layers, E, H, 2, F]
    used = np.asarray(aux["expert_load"])[0] > 0
    assert np.all(np.abs(w_in_grad[0]).sum(axis=(1, 2, 3))[used] > 0)  # every used expert learns
