"""The CPU attention kernels (pass_jax/backends/cpu/kernels/) against the XLA ops they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pass_jax.backends.cpu import ffi as cpu_kernel
from pass_jax.backends.cpu.ops import CpuOps, _attend_folded_xla, _block_attention
from pass_jax.backends.cpu.ops import _attend as _attend_kernel
from pass_jax.backends.cpu.ops import _attend_folded as _attend_folded_kernel
from pass_jax.backends.xla import XLA
from pass_jax.backends.xla import attend as _attend

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="kernel not built here (see the warning)")


def _case(rng, b, kv, t, groups, s, hd, dtype, lengths):
    rows = jnp.asarray(rng.standard_normal((b, kv, t * groups, hd)), dtype)
    keys = jnp.asarray(rng.standard_normal((b, s, kv, hd)), dtype)
    values = jnp.asarray(rng.standard_normal((b, s, kv, hd)), dtype)
    seen = np.arange(s)[None, None, :] < (np.asarray(lengths)[:, None, None] + np.arange(t)[None, :, None] + 1)
    return rows, keys, values, jnp.asarray(seen)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 1, 3, 300, 64), (2, 3, 5, 3, 77, 64), (1, 2, 16, 4, 130, 128),
                                   (1, 1, 3, 2, 20, 32)])
def test_kernel_matches_xla_attention(dtype, shape):
    """Output, max score and softmax mass, for buffers off multiples of 16 and a row that sees nothing."""
    b, kv, t, groups, s, hd = shape
    rng = np.random.default_rng(0)
    rows, keys, values, mask = _case(rng, b, kv, t, groups, s, hd, dtype, rng.integers(1, s - t, b))
    mask = mask.at[0, -1].set(False)  # XLA's -1e30 fill makes such a row uniform over the whole buffer
    want, got = _attend(rows, keys, values, mask), cpu_kernel.attention(rows, keys, values, mask)
    for name, w, g in zip(("out", "top", "mass"), want, got):
        assert g.shape == w.shape, name
        scale = 1 + np.abs(np.asarray(w))
        err = np.max(np.abs(np.asarray(g) - np.asarray(w)) / scale)
        assert err < (5e-4 if name == "out" and dtype == jnp.bfloat16 else 1e-5), (name, err)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_token_attends_alike_in_any_pass(dtype):
    """Bit for bit: row t of a T-token pass equals the same token alone (cache one entry longer per
    step), whatever the buffer length: a greedy verify pass reproduces autoregressive decoding."""
    rng = np.random.default_rng(1)
    t, length = 9, 40
    rows, keys, values, mask = _case(rng, 1, 3, t, 3, 96, 64, dtype, [length])
    out = np.asarray(cpu_kernel.attention(rows, keys, values, mask)[0])
    for i in (0, 4, 8):
        alone = rows[:, :, 3 * i: 3 * i + 3]
        for s in (length + i + 1, 64, 96):  # the buffer an AR run or another method would allocate
            got = cpu_kernel.attention(alone, keys[:, :s], values[:, :s], mask[:, i: i + 1, :s])[0]
            np.testing.assert_array_equal(np.asarray(got), out[:, :, 3 * i: 3 * i + 3])


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_tree_node_attends_as_its_path_side_by_side_does(dtype):
    """A node sees its ancestors across the slots its siblings hold; the same entries side by side
    (the accepted path, as a 1-token step sees it) must give the same output and softmax sums, bit
    for bit (summed by slot lane, a bfloat16 case below differed in the last bit of the sum)."""
    rng = np.random.default_rng(0)
    for length in (5, 16, 37, 60):
        keys, values = (rng.standard_normal((1, 80, 3, 64)).astype(np.float32) for _ in range(2))
        rows = jnp.asarray(rng.standard_normal((1, 3, 3, 64)), jnp.float32)
        holed_k, holed_v = keys.copy(), values.copy()
        holed_k[:, length + 3], holed_v[:, length + 3] = keys[:, length], values[:, length]  # 3 siblings between
        side_by_side = np.arange(80)[None, None] <= length
        holed = (np.arange(80)[None, None] < length) | (np.arange(80)[None, None] == length + 3)
        attend = jax.jit(cpu_kernel.attention)
        want = attend(rows, jnp.asarray(keys, dtype), jnp.asarray(values, dtype), jnp.asarray(side_by_side))
        got = attend(rows, jnp.asarray(holed_k, dtype), jnp.asarray(holed_v, dtype), jnp.asarray(holed))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@needs_kernel
def test_gradients_are_xlas():
    rng = np.random.default_rng(2)
    rows, keys, values, mask = _case(rng, 1, 2, 4, 2, 40, 32, jnp.float32, [20])

    def loss(f):
        return lambda r, k, v: jnp.sum(f(r, k, v, mask)[0] ** 2)

    got = jax.grad(loss(_attend_kernel), argnums=(0, 1, 2))(rows, keys, values)
    want = jax.grad(loss(_attend), argnums=(0, 1, 2))(rows, keys, values)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@needs_kernel
def test_the_model_attends_with_the_kernel():
    """Every layer of a decode pass calls the kernel (CpuOps; counted in the compiled program, where XLA
    has inlined the one traced layer into each); with XLA's ops none does, and they agree."""
    from pass_jax.models import llama as M
    from pass_jax.models.cache import KVCache
    from pass_jax.models.contract import causal_block_mask
    from pass_jax.models.llama import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                      max_position_embeddings=128)
    params = M.init_params(cfg, jax.random.key(0))
    cache = KVCache.create(cfg, 1, 48, jnp.float32).commit(jnp.asarray([10]))
    tokens = jnp.arange(3)[None]

    def run(ops):
        fn = jax.jit(lambda p, c: M.forward(p, cfg, M.embed_tokens(p, tokens, ops), 10 + tokens,
                                            causal_block_mask(tokens >= 0), c, ops=ops)[0])
        calls = fn.lower(params, cache).compile().as_text().count('custom_call_target="pass_jax_attention"')
        return np.asarray(fn(params, cache)), calls

    with_kernel, calls = run(CpuOps())
    assert calls == cfg.num_layers
    without, calls = run(XLA)
    assert calls == 0
    np.testing.assert_allclose(without, with_kernel, rtol=1e-5, atol=1e-5)


def _block_case(seed, b, t, n, kv, groups, s, hd, p):
    """Training's look-ahead attention: blocks of n rows placed at random points (some before the first
    cache entry: they see only their block), a prefix seen by a random half of the rows."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q, keys, values, local_k, local_v = (normal(*shape) for shape in
                                         [(b, t, kv * groups, hd)] + [(b, s, kv, hd)] * 2 + [(b, t, kv, hd)] * 2)
    points = rng.integers(-1, s, (b, t // n)).repeat(n, 1)
    visible = jnp.asarray(np.arange(s)[None, None] <= points[..., None])
    prefix = normal(2, p, kv, hd) if p else None
    return q, keys, values, visible, local_k, local_v, prefix, jnp.asarray(rng.random((b, t)) < 0.5)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 8, 4, 3, 3, 40, 64, 4), (1, 12, 3, 2, 2, 70, 32, 0), (2, 8, 2, 1, 4, 17, 128, 3)])
def test_block_kernel_matches_xla_with_gradients(shape):
    """The kernel's output and its gradients for queries, block entries and prefix equal XLA's ops'."""
    b, t, n, kv, groups, _, hd, _ = shape
    q, keys, values, visible, local_k, local_v, prefix, prefix_rows = _block_case(0, *shape)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((b, t, kv * groups * hd)), jnp.float32)

    def loss(kernel):
        def f(q, local_k, local_v, prefix):
            if kernel:
                out = _block_attention(n, q, keys, values, visible, local_k, local_v, prefix, prefix_rows)
            else:
                out = XLA.attention(q, keys, values, visible, prefix, prefix_rows, (local_k, local_v, n))
            return jnp.sum(out * cotangent), out
        return jax.value_and_grad(f, argnums=(0, 1, 2) if prefix is None else (0, 1, 2, 3), has_aux=True)

    (_, want), want_grads = loss(False)(q, local_k, local_v, prefix)
    (_, got), got_grads = loss(True)(q, local_k, local_v, prefix)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("q", "local keys", "local values", "prefix"), got_grads, want_grads):
        assert float(jnp.max(jnp.abs(w))) > 0, name
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err < 1e-5, (name, err)


@needs_kernel
def test_training_takes_the_block_kernel():
    """The look-ahead loss's layers call the block kernel once each, forward and gradient (counted in the
    compiled program); XLA's ops (a step's other backend) give the same loss and gradient."""
    from pass_jax.lookahead.leaf import init_deep, init_lookahead
    from pass_jax.lookahead.training import TrainLayout, lookahead_loss
    from pass_jax.models import llama as M
    from pass_jax.models.llama import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=32, max_position_embeddings=64)
    params = M.init_params(cfg, jax.random.key(0))
    leaf = init_deep(init_lookahead(params, 3, "mean", key=jax.random.key(1)), cfg, 2, jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, cfg.vocab_size)
    def grad(ops):
        fn = jax.jit(jax.value_and_grad(lambda leaf: lookahead_loss(leaf, params, cfg, tokens, TrainLayout(24, 3, 2),
                                                                    "ce", 0.8, ops=ops)))
        text = fn.lower(leaf).compile().as_text()
        return fn(leaf), [text.count(f'custom_call_target="{name}"') for name in cpu_kernel.BLOCK_ATTENTION]

    got, calls = grad(CpuOps())
    assert calls == [cfg.num_layers, cfg.num_layers]  # forward, gradient
    want, calls = grad(XLA)
    assert calls == [0, 0]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 6, 3, 130, 64, 4), (2, 2, 5, 2, 40, 32, 3), (1, 1, 3, 4, 20, 128, 17)])
def test_prefix_folds_into_the_kernel(dtype, shape):
    """A deep look-ahead's prefix inside the kernel's softmax: XLA's attention-then-fold for the rows
    that see it (to bfloat16 rounding of the weights in bfloat16), and bit for bit the kernel without a
    prefix for the rows that do not (the real tokens of a PaSS pass)."""
    b, kv, t, groups, s, hd, p = shape
    rng = np.random.default_rng(3)
    rows, keys, values, mask = _case(rng, b, kv, t, groups, s, hd, dtype, rng.integers(1, s - t, b))
    rows = rows.astype(jnp.float32)
    prefix = jnp.asarray(rng.standard_normal((2, p, kv, hd)) * 3, dtype)
    prefix_rows = jnp.broadcast_to(jnp.arange(t) >= t // 2, (b, t))
    got = np.asarray(_attend_folded_kernel(rows, keys, values, mask, prefix, prefix_rows))
    want = np.asarray(_attend_folded_xla(rows.astype(dtype), keys, values, mask, prefix, prefix_rows))
    np.testing.assert_allclose(got, want, atol=3e-2 if dtype == jnp.bfloat16 else 1e-5, rtol=0)
    plain = np.asarray(cpu_kernel.attention(rows, keys, values, mask)[0])
    real = np.repeat(~np.asarray(prefix_rows), groups, 1)[:, None, :, None]
    np.testing.assert_array_equal(np.where(real, got, 0), np.where(real, plain, 0))
    assert np.max(np.abs(got - plain)) > 1.0  # the prefix rows did change


@needs_kernel
def test_prefix_fold_gradients_are_xlas():
    rng = np.random.default_rng(4)
    rows, keys, values, mask = _case(rng, 1, 2, 4, 2, 40, 32, jnp.float32, [20])
    prefix = jnp.asarray(rng.standard_normal((2, 3, 2, 32)), jnp.float32)
    prefix_rows = jnp.asarray([[False, True, True, False]])
    weights = jnp.asarray(rng.standard_normal(rows.shape), jnp.float32)

    def loss(fn):
        return lambda r, k, v, p: jnp.sum(fn(r, k, v, mask, p, prefix_rows) * weights)

    for got, want in zip(jax.grad(loss(_attend_folded_kernel), (0, 1, 2, 3))(rows, keys, values, prefix),
                         jax.grad(loss(_attend_folded_xla), (0, 1, 2, 3))(rows, keys, values, prefix)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
