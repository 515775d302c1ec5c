"""The measuring helpers of the benchmark scripts count what they claim to count."""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "benchmarks")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_step_matmuls_counts_scan_steps_and_leaves_out_conditional_products():
    model_bench = _script("model_bench")

    def f(x_TD, w_DF, v_FD):
        h_TD, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ w_DF) @ v_FD, None), x_TD, None, length=3)
        return jax.lax.cond(h_TD.sum() > 0, lambda h: h @ w_DF @ v_FD, lambda h: h, h_TD)

    x, w, v = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((16, 8))
    counts, under_cond = model_bench.step_matmuls(jax.make_jaxpr(f)(x, w, v))
    assert under_cond == 1
    assert sorted((mm.lhs.shape, mm.rhs.shape, n) for mm, n in counts.items()) == [((4, 8), (8, 16), 3),
                                                                                   ((4, 16), (16, 8), 3)]
    assert {mm.rhs.shape: mm.flops for mm in counts} == {(8, 16): 2 * 4 * 8 * 16, (16, 8): 2 * 4 * 16 * 8}


def test_device_suite_fits_its_8_minutes_and_reports_each_stage(tmp_path, monkeypatch):
    """The stages' time limits add up to under 8 minutes, and a failing or hanging stage costs only its own row."""
    suite = _script("device_suite")
    real = suite.stages(smoke=False, workdir=str(tmp_path))
    assert [name for name, _, _ in real] == ["kernels", "ssd_bench", "mfu_bench", "moe_flops", "train_50"]
    assert sum(limit for _, _, limit in real) <= 8 * 60
    fake = [("passes", [sys.executable, "-c", "print('figure 1')"], 30),
            ("fails", [sys.executable, "-c", "import sys; print('why', file=sys.stderr); sys.exit(3)"], 30),
            ("hangs", [sys.executable, "-c", "import time; time.sleep(30)"], 1)]
    monkeypatch.setattr(suite, "stages", lambda smoke, workdir: fake)
    monkeypatch.setattr(suite, "device_line", lambda: "test device")
    out = tmp_path / "suite"
    assert suite.main(["--out", str(out)]) == 1
    rows = {r["stage"]: r for r in json.loads((tmp_path / "suite.json").read_text())["stages"]}
    assert rows["passes"]["status"] == "ok" and rows["passes"]["output_tail"] == ["figure 1"]
    assert rows["fails"]["status"] == "exit 3" and "why" in rows["fails"]["output_tail"]
    assert rows["hangs"]["status"] == "timed out after 1 s"
    assert "| fails | exit 3 |" in (tmp_path / "suite.md").read_text()
