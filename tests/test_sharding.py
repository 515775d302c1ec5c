"""Mesh construction, the logical-axis rules, sharded creation and batch sharding on 8 CPU devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from granite_jax import sharding as sh

pytestmark = pytest.mark.filterwarnings("ignore:'sharding_names' is deprecated:DeprecationWarning")


class Toy(nnx.Module):
    """Parameters shaped like the model's, each with logical axis names."""

    def __init__(self, rngs, hidden=16, vocab=64, experts=4, kv_heads=2):
        init = jax.nn.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (vocab, hidden)), out_sharding=("vocab", "embed"))
        self.up = nnx.Param(init(rngs.params(), (hidden, 32)), out_sharding=("embed", "mlp"))
        self.experts = nnx.Param(init(rngs.params(), (2, experts, hidden, 32)),
                                 out_sharding=("layers", "experts", "embed", "mlp"))
        self.router = nnx.Param(init(rngs.params(), (hidden, experts)), out_sharding=("embed", "experts"))
        self.k_proj = nnx.Param(init(rngs.params(), (hidden, kv_heads, 8)),
                                out_sharding=("embed", "kv_heads", "head_dim"))
        self.in_proj = nnx.Param(init(rngs.params(), (hidden, 40)), out_sharding=("embed", "ssm_inner"))
        self.A_log = nnx.Param(jnp.zeros((6,)), out_sharding=("ssm_heads",))
        self.norm = nnx.Param(jnp.ones((hidden,)), sharding_names=("norm",))  # the older metadata spelling


def specs_of(tree):
    return {"/".join(map(str, k)): v.get_value().spec for k, v in nnx.to_flat_state(tree)}


def abstract_toy(**kw):
    with nnx.use_eager_sharding(False):
        return nnx.state(nnx.eval_shape(lambda: Toy(nnx.Rngs(0), **kw)))


# Mesh ------------------------------------------------------------------------------------------------------------

def test_make_mesh_fills_minus_one():
    mesh = sh.make_mesh({"data": 1, "fsdp": -1, "tensor": 2, "expert": 1, "context": 1})
    assert mesh.axis_names == sh.MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1, "context": 1}
    cfg = ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 1, "expert": -1, "context": 1})
    assert sh.make_mesh(cfg).shape["expert"] == 4
    assert sh.make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4]).size == 4  # missing axes are 1


@pytest.mark.parametrize("cfg, message", [
    ({"data": 1, "fsdp": 3, "tensor": 2}, "fsdp=3 x tensor=2 x expert=1 x context=1 needs 6 devices, found 8"),
    ({"fsdp": -1, "tensor": 3}, "multiple of 3 devices, found 8"),
    ({"fsdp": -1, "data": -1}, "only one axis may be -1"),
    ({"fsdp": 0}, r"mesh.fsdp=0: must be a positive integer"),
    ({"pipeline": 2}, "unknown axis 'pipeline'"),
])
def test_make_mesh_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        sh.make_mesh(cfg)


def test_make_mesh_dcn():
    assert sh.make_mesh({"fsdp": -1}, dcn={"data": 1}).shape["fsdp"] == 8  # one slice: a plain mesh
    with pytest.raises(ValueError, match="spans 2 processes, found 1"):
        sh.make_mesh({"data": 2, "fsdp": -1}, dcn={"data": 2})
    with pytest.raises(ValueError, match=r"dcn.fsdp=3: must be a positive integer dividing mesh.fsdp=8"):
        sh.make_mesh({"fsdp": -1}, dcn={"fsdp": 3})


# Rules -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh_cfg, expected", [
    ({"fsdp": 8}, {"embed": P(None, "fsdp"), "up": P("fsdp"), "experts": P(None, None, "fsdp"),
                   "router": P("fsdp"), "k_proj": P("fsdp"), "in_proj": P("fsdp"), "A_log": P(), "norm": P()}),
    ({"fsdp": 2, "tensor": 2, "expert": 2},
     {"embed": P("tensor", ("fsdp", "expert")), "up": P(("fsdp", "expert"), "tensor"),
      "experts": P(None, "expert", "fsdp", "tensor"),  # `experts` claims the expert axis before `embed`
      "router": P("fsdp", "expert"), "k_proj": P(("fsdp", "expert"), "tensor"),
      "in_proj": P(("fsdp", "expert"), "tensor"), "A_log": P("tensor"), "norm": P()}),
    ({"data": 2, "tensor": 4},  # 2 kv heads and 6 ssm heads on tensor=4: replicated, not an error
     {"embed": P("tensor"), "up": P(None, "tensor"), "experts": P(None, None, None, "tensor"), "router": P(),
      "k_proj": P(), "in_proj": P(None, "tensor"), "A_log": P(), "norm": P()}),
    ({"expert": 4, "context": 2},
     {"embed": P(None, ("expert", "context")), "up": P(("expert", "context")),
      "experts": P(None, "expert", "context"), "router": P("context", "expert"),
      "k_proj": P(("expert", "context")), "in_proj": P(("expert", "context")), "A_log": P(), "norm": P()}),
])
def test_param_shardings(mesh_cfg, expected):
    mesh = sh.make_mesh(mesh_cfg)
    shardings = sh.param_shardings(abstract_toy(), mesh)
    assert specs_of(shardings) == expected
    assert all(s.get_value().mesh is mesh for _, s in nnx.to_flat_state(shardings))


def test_indivisible_matrix_raises_naming_everything():
    mesh = sh.make_mesh({"fsdp": 8})
    with pytest.raises(ValueError, match=r"embed of shape \(64, 12\): dimension 1 \('embed', size 12\) is "
                                         r"not divisible by mesh fsdp=8"):
        sh.param_shardings(abstract_toy(hidden=12), mesh)


def test_unknown_logical_name_raises():
    with pytest.raises(ValueError, match="'heads' .* has no rule"):
        sh.logical_to_spec(("embed", "heads"), sh.make_mesh({"fsdp": 8}))


def test_logical_to_sharding_tree():
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tree = {"tokens": ("batch", "length"), "logits": P("batch", "length", "act_vocab"), "x": (None, "act_embed")}
    out = sh.logical_to_sharding(tree, mesh)
    assert out["tokens"].spec == P(("data", "fsdp"))
    assert out["logits"].spec == P(("data", "fsdp"), None, "tensor")
    assert out["x"].spec == P()
    with pytest.raises(ValueError, match="dimension 0 \\('batch', size 6\\) is not divisible by mesh data=2 x fsdp=2"):
        sh.logical_to_sharding(tree, mesh, shapes={"tokens": (6, 8), "logits": (8, 8, 4), "x": (2, 4)})


# Sharded creation and batches -------------------------------------------------------------------------------------

def test_create_sharded_model_and_optimizer():
    mesh = sh.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})

    def build():
        model = Toy(nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    model, opt = sh.create_sharded(build, mesh)
    expected = specs_of(sh.param_shardings(abstract_toy(), mesh))
    assert {"/".join(k): v.get_value().sharding.spec for k, v in nnx.to_flat_state(nnx.state(model))} == expected
    mu = nnx.to_flat_state(opt.opt_state[0].mu)
    assert {"/".join(map(str, k)): v.get_value().sharding.spec for k, v in mu} == expected
    assert opt.step.get_value().sharding.spec == P()
    with nnx.use_eager_sharding(False):
        reference = Toy(nnx.Rngs(0))  # same values as the unsharded, un-jitted build (up to fusion rounding)
    np.testing.assert_allclose(np.asarray(model.experts.get_value()), np.asarray(reference.experts.get_value()),
                               rtol=1e-6, atol=1e-9)
    shard_shapes = {s.data.shape for s in model.experts.get_value().addressable_shards}
    assert shard_shapes == {(2, 2, 8, 16)}  # each device holds 1/8 of the expert weights


def test_shard_batch():
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids = np.arange(8 * 6, dtype=np.int32).reshape(8, 6)
    out = sh.shard_batch({"input_ids": ids, "weights": np.ones((8,), np.float32)}, mesh)
    assert out["input_ids"].shape == (8, 6) and out["input_ids"].sharding.spec == P(("data", "fsdp"))
    assert out["weights"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out["input_ids"]), ids)
    with pytest.raises(ValueError, match="batch of 6 rows does not split over its 4 batch shards"):
        sh.shard_batch({"input_ids": ids[:6]}, mesh)
    ctx = sh.make_mesh({"fsdp": 4, "context": 2})
    assert sh.shard_batch({"input_ids": ids}, ctx)["input_ids"].sharding.spec == P("fsdp", "context")
    with pytest.raises(ValueError, match="dimension 1 of size 5 is not divisible by mesh context=2"):
        sh.shard_batch({"input_ids": ids[:, :5]}, ctx)


def test_constrain_activation():
    x = jnp.ones((8, 4, 16))
    assert sh.constrain(x, ("batch", "length", "act_embed")) is x  # no mesh: no-op
    mesh = sh.make_mesh({"fsdp": 4, "context": 2})
    f = jax.jit(lambda x: sh.constrain(x * 2, ("batch", "length", "act_embed")))
    with jax.set_mesh(mesh):
        y = f(x)
    assert y.sharding.spec == P("fsdp", "context")
