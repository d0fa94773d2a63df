"""The CPU kernels that read embedding rows and write bfloat16 KV caches in place
(backends/cpu/kernels/rows_cpu.cc, cache_cpu.cc), bit for bit against the XLA ops they replace, and the
RoPE kernel (rope_cpu.cc), to float32 rounding of them and bit for bit across pass sizes: CpuOps against
XlaOps, the two backends a plan can hold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pass_jax.backends.cpu import ffi as cpu_kernel
from pass_jax.backends.cpu.ops import CpuOps
from pass_jax.backends.xla import XLA
from pass_jax.models.cache import KVCache
from pass_jax.models.llama import ModelConfig, embed_tokens, rope_inv_freq

CPU = CpuOps() if cpu_kernel.available() else None  # the tests below skip where the kernels do not build

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="kernel not built here (see the warning)")


def _bits(x):
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16))


@needs_kernel
def test_rows_are_the_tables_rows():
    table = jax.random.normal(jax.random.key(0), (50, 24)).astype(jnp.bfloat16)
    tokens = jnp.array([[0, 49, 7], [-1, 60, 3]])  # from the end; past the end is clamped, as XLA's gather
    fn = jax.jit(embed_tokens, static_argnums=2)
    got = fn({"embed": table}, tokens, CPU)
    want = fn({"embed": table}, tokens, XLA)
    assert "pass_jax_rows" in fn.lower({"embed": table}, tokens, CPU).as_text()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.dtype == jnp.float32 and got.shape == (2, 3, 24)


@needs_kernel
def test_rows_gradient_scatters_back():
    table = jax.random.normal(jax.random.key(1), (10, 4)).astype(jnp.bfloat16)
    tokens = jnp.array([[2, 2, 5]])
    def loss(ops):
        return lambda t: jnp.sum(embed_tokens({"embed": t}, tokens, ops) * jnp.arange(1.0, 4.0)[None, :, None])
    got = jax.grad(loss(CPU))(table)
    want = jax.grad(loss(XLA))(table)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert float(got[2, 0]) == 3.0  # the two reads of row 2 add up


def _buffers(rng, b=2, s=12, kv=3, hd=4):
    return jnp.asarray(rng.standard_normal((b, s, kv, hd)), jnp.bfloat16)


@needs_kernel
@pytest.mark.parametrize("offsets", [[0, 5], [9, 11], [12, -3]])  # in range; clamped at the end; clamped both ways
def test_cache_write_is_xlas_dynamic_update_slice(offsets):
    rng = np.random.default_rng(0)
    buf = _buffers(rng)
    block = rng.standard_normal((2, 3, 3, 4)).astype(np.float32) * np.float32(1e3)
    block[0, 0, 0, :] = [np.nan, np.inf, 1 + 2 ** -8, 1 + 3 * 2 ** -8]  # NaN, inf and both ways of a tie
    block = jnp.asarray(block)
    offsets = jnp.array(offsets, jnp.int32)
    fn = jax.jit(CPU.cache_write)
    got = fn(buf, block, offsets)
    want = jax.jit(XLA.cache_write)(buf, block, offsets)
    assert "pass_jax_cache_write" in fn.lower(buf, block, offsets).as_text()
    np.testing.assert_array_equal(_bits(got), _bits(want))


@needs_kernel
def test_cache_move_is_gather_path():
    rng = np.random.default_rng(1)
    keys, values = _buffers(rng), _buffers(rng)
    cache = KVCache(keys=(keys,), values=(values,), lengths=jnp.array([2, 9], jnp.int32))
    path = jnp.array([[0, 2, 3, 5], [0, 1, 4, 6]], jnp.int32)  # row 1's last slot is past the buffer: NaN
    fn = jax.jit(KVCache.gather_path, static_argnums=2)
    got = fn(cache, path, CPU)
    want = fn(cache, path, XLA)
    assert "pass_jax_cache_move" in fn.lower(cache, path, CPU).as_text()
    for g, w in zip(got.keys + got.values, want.keys + want.values):
        np.testing.assert_array_equal(_bits(g), _bits(w))
    assert not np.array_equal(_bits(got.keys[0]), _bits(keys))  # it moved something


@needs_kernel
def test_decode_loop_writes_in_place():
    """The written buffer is the call's output: XLA copies nothing around the writes (a copy of every
    layer's buffer per pass is what the kernels remove)."""
    buf = jnp.zeros((1, 64, 3, 4), jnp.bfloat16)

    def loop(buf):
        def body(i, buf):
            return CPU.cache_write(buf, jnp.full((1, 2, 3, 4), i, jnp.float32), jnp.array([2 * i]))
        return jax.lax.fori_loop(0, 8, body, buf)

    text = jax.jit(loop, donate_argnums=0).lower(buf).compile().as_text()
    assert "pass_jax_cache_write" in text and "f32[1,64,3,4]" not in text  # never widened
    got = np.asarray(jax.jit(loop)(buf), np.float32)
    np.testing.assert_array_equal(got[0, :16:2, 0, 0], np.arange(8))


@needs_kernel
@pytest.mark.parametrize("hd", [64, 128])
def test_rope_kernel_is_xla_ropes_rotation_alike_for_every_pass_size(hd):
    cfg = ModelConfig(vocab_size=8, hidden_size=4 * hd, intermediate_size=8, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=hd, rope_theta=1e5)
    qkv = jax.random.normal(jax.random.key(0), (2, 5, 8 * hd))  # q | k | v: 4 + 2 + 2 heads
    positions = jnp.asarray([[0, 1, 2, 3, 4], [40, 41, 42, 900, 8191]])
    inv_freq = jnp.asarray(rope_inv_freq(cfg))

    def rotate(ops):  # q and k rotated, v copied, as a layer of the model rotates them
        return lambda x, p: ops.rope(x.reshape(*x.shape[:2], 8, hd), p, inv_freq, 6)

    split = jax.jit(rotate(CPU))
    got = split(qkv, positions)
    assert "pass_jax_rope" in split.lower(qkv, positions).as_text()
    want = jax.jit(rotate(XLA))(qkv, positions)
    _, xla_vjp = jax.vjp(lambda x: rotate(XLA)(x, positions), qkv)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)  # cos/sin: libm's, XLA's
    np.testing.assert_array_equal(np.asarray(got)[:, :, 6:], np.asarray(qkv).reshape(2, 5, 8, hd)[:, :, 6:])  # v
    for t in range(5):  # a token rotates bit for bit alike alone and within a pass of any size
        np.testing.assert_array_equal(np.asarray(split(qkv[:, t:t + 1], positions[:, t:t + 1]))[:, 0],
                                      np.asarray(got)[:, t])
    g = jax.random.normal(jax.random.key(1), got.shape)
    _, vjp = jax.vjp(lambda x: rotate(CPU)(x, positions), qkv)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(xla_vjp(g)[0]), rtol=1e-5, atol=1e-5)
    long = jnp.tile(qkv, (1, 20, 1))  # past the products' row limit (training's look-ahead passes): still the kernel
    long_positions = jnp.tile(positions, (1, 20))
    assert "pass_jax_rope" in split.lower(long, long_positions).as_text()
    np.testing.assert_array_equal(np.asarray(split(long, long_positions))[:, 95:], np.asarray(got))
