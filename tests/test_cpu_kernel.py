"""The CPU product kernel (pass_jax/backends/cpu/kernels/dense_cpu.cc) against float64 products, its fallback,
and the choice of backend: made once, by default_ops or a plan's field."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pass_jax.backends.cpu import ffi as cpu_kernel
from pass_jax.backends.cpu.ops import CpuOps
from pass_jax.backends.xla import XLA
from pass_jax.models.llama import logits_from_hidden

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="kernel not built here (see the warning)")


def _reference(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_matches_float64_products(dtype, transposed):
    """Every row-tile and column-tile path: M = 1..14 and past a tile of 24, N and K off multiples of 16."""
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 6, 7, 8, 9, 12, 13, 14, 30, 64):
        for k, n in ((576, 960), (40, 37), (33, 200), (16, 16)):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            w = jnp.asarray(rng.standard_normal((k, n)), dtype)
            got = np.asarray(cpu_kernel.dense(x, w.T if transposed else w, transposed=transposed))
            want = _reference(x.astype(dtype), w)
            assert got.shape == (m, n)
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err < 1e-5, (m, k, n, err)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_row_does_not_depend_on_the_rows_beside_it(transposed, dtype):
    """Bit for bit: a token's logits in a 1-token step equal its logits inside a T-token verify pass,
    whichever register tile each row count takes (bfloat16: 4 x 96, 7 x 64 columns, 32-column strips)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((17, 576)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((576, 1000)) * 0.05, dtype)
    w = w.T if transposed else w
    full = np.asarray(cpu_kernel.dense(x, w, transposed=transposed))
    for t in (1, 2, 4, 5, 7, 9, 13):
        part = np.asarray(cpu_kernel.dense(x[:t], w, transposed=transposed))
        np.testing.assert_array_equal(part, full[:t])
    alone = np.asarray(cpu_kernel.dense(x[5:6], w, transposed=transposed))
    np.testing.assert_array_equal(alone[0], full[5])


@needs_kernel
def test_model_products_take_the_kernel_and_keep_xla_gradients(monkeypatch):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48)) * 0.1, jnp.float32)
    params = {"embed": jnp.asarray(rng.standard_normal((100, 64)) * 0.1, jnp.float32)}
    assert "pass_jax_dense" in str(jax.jit(CpuOps().dense).lower(x, w).as_text())

    def loss(ops):
        return lambda x, w: (jnp.sum(jnp.sin(ops.dense(x, w)))
                             + jnp.sum(jnp.cos(logits_from_hidden({**params, "embed": w.T}, x, ops))))

    got = jax.grad(loss(CpuOps()), argnums=(0, 1))(x, w)
    assert "pass_jax_dense" not in str(jax.jit(XLA.dense).lower(x, w).as_text())
    want = jax.grad(loss(XLA), argnums=(0, 1))(x, w)
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-5)
    batched = jax.vmap(lambda xi: cpu_kernel.dense(xi, w))(x)  # vmap runs the call row block by row block
    np.testing.assert_allclose(np.asarray(batched), _reference(x, w), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_many_rows_use_xla_except_in_the_rounds_ops():
    """Past MAX_ROWS rows a product is XLA's (prefill, training); the decode rounds' ops take the kernel at
    any size. Each variant is a distinct hashable value: a plan traced with one never serves another."""
    x, w = jnp.ones((cpu_kernel.MAX_ROWS + 1, 8)), jnp.ones((8, 8))
    ops = CpuOps()
    assert "pass_jax_dense" not in jax.jit(ops.dense).lower(x, w).as_text()
    assert "pass_jax_dense" not in jax.jit(ops.for_prefill().dense).lower(x, w).as_text()
    assert "pass_jax_dense" in jax.jit(ops.for_rounds().dense).lower(x, w).as_text()
    assert "pass_jax_dense" in jax.jit(ops.dense).lower(x[:cpu_kernel.MAX_ROWS], w).as_text()
    assert len({ops, ops.for_prefill(), ops.for_rounds(), XLA, CpuOps()}) == 4 and ops == CpuOps()


def _available_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = ("from pass_jax.backends import default_ops; from pass_jax.backends.cpu import ffi; "
            "print('AVAILABLE', ffi.available(), default_ops().name)")
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env={**os.environ, **env},
                          timeout=300)


def test_switched_off_quietly():
    done = _available_in_subprocess({"PASS_JAX_CPU_KERNEL": "0"})
    assert "AVAILABLE False xla-cpu" in done.stdout  # XLA's ops, with XLA CPU's lone-row workaround
    assert "kernel not used" not in done.stderr


@pytest.mark.skipif(cpu_kernel._unavailable_reason() is not None, reason="kernel not buildable on this CPU")
def test_a_failed_build_falls_back_with_one_warning(tmp_path):
    done = _available_in_subprocess({"CXX": "false", "PASS_JAX_KERNEL_CACHE": str(tmp_path)})
    assert "AVAILABLE False xla-cpu" in done.stdout, done.stderr
    assert done.stderr.count("CPU kernels not used") == 1, done.stderr


@needs_kernel
def test_the_backend_is_a_plan_field_and_changes_the_compiled_program():
    """make_plan's backend is part of the plan (its jit key): the same request with "xla" compiles a
    program without a kernel call, "auto" (here: the CPU kernels) one with them, and both decode alike.
    (The context switch it replaced, read at trace time and in no cache key, let a kernel-compiled
    program serve a call traced to be XLA's: the cache-write test compared the kernel with itself.)"""
    import pass_jax as pj

    from .conftest import tiny_model

    m = tiny_model(vocab=40, hidden=64, layers=2, heads=2, kv_heads=1, seed=3)
    prompts = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], jnp.int32)
    args = (prompts, jnp.asarray([16], jnp.int32), jax.random.key(0))
    texts, tokens = {}, {}
    for backend in ("auto", "xla"):
        plan, la = pj.make_plan(m, prompt_len=16, max_new_tokens=8, method="pass", k=2, backend=backend)
        texts[backend] = jax.jit(plan).lower(m.params, la, *args).as_text()
        tokens[backend] = pj.generate(m, prompts[0].tolist(), max_new_tokens=8, method="pass", k=2,
                                      backend=backend).token_ids
    assert pj.make_plan(m, prompt_len=16, backend="auto")[0] != pj.make_plan(m, prompt_len=16, backend="xla")[0]
    assert "pass_jax_dense" in texts["auto"] and "pass_jax_" not in texts["xla"]
    assert tokens["auto"] == tokens["xla"]
    with pytest.raises(ValueError, match="backend must be one of auto, xla, cpu"):
        pj.make_plan(m, prompt_len=16, backend="tpu")
