"""The CPU kernels (kernels/) as XLA FFI calls, built on first use: few-row products, attention, RoPE, rows.

XLA's CPU dot streams a one-row product below memory speed, costs ~2x at two rows (its
matrix-matrix kernel), and takes a pathological path for a one-row bfloat16 product. Decoding is
made of exactly those products, so pass-jax ships its own: every weight tile is read once per
pass of up to 12 rows, bfloat16 weights at their stored width. A layer's decode attention, a dozen
small XLA ops whose per-op overhead dominated, is one call (kernels/attention_cpu.cc), a deep
look-ahead's prefix folded in. XLA gathers from and updates bfloat16 arrays by widening all of them,
so embedding rows (rows_cpu.cc) and bfloat16 KV cache writes (cache_cpu.cc) are calls too, and so
is RoPE (rope_cpu.cc), which XLA fused differently into passes of different sizes. All are
compiled once per machine
with the system C++ compiler (-march=native) into ~/.cache/pass-jax/kernels and registered as an
XLA FFI target. Where it cannot be built (no compiler, no AVX-512, not x86-64) or
PASS_JAX_CPU_KERNEL=0, `backends.default_ops` keeps XLA's ops, with one warning naming the reason.
This module only builds, registers and calls them; `backends.cpu.ops.CpuOps` decides when.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = Path(__file__).with_name("kernels")  # the C++ sources
SOURCES = ("dense_cpu.cc", "attention_cpu.cc", "block_attention_cpu.cc", "rows_cpu.cc", "cache_cpu.cc",
           "rope_cpu.cc")  # with common.h
TARGETS = {False: "pass_jax_dense", True: "pass_jax_dense_t"}  # w [K, N]; w [N, K] (tied head)
ATTENTION = "pass_jax_attention"
BLOCK_ATTENTION = ("pass_jax_block_attention", "pass_jax_block_attention_grad")
ROWS = "pass_jax_rows"
CACHE = ("pass_jax_cache_write", "pass_jax_cache_move")
ROPE = "pass_jax_rope"
MAX_PREFIX = 64  # deep look-ahead prefix entries the attention kernel folds in (init_deep allows up to 64)
MAX_ROWS = 64  # up to here the kernel is at least as fast as XLA's dot; past it (prefill, training) XLA's GEMM
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++20", "-shared", "-fPIC"]


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first CPU's /proc/cpuinfo fields (empty where there is none), read once."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info = {}
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if sep:
            info.setdefault(key.strip(), val.strip())
    return info


def _cpu_model() -> tuple[str, frozenset[str]]:
    """The CPU's model name and instruction flags (the build key and the AVX-512 check)."""
    info = cpu_info()
    return info.get("model name", "" if info else platform.processor()), frozenset(info.get("flags", "").split())


def cache_dir() -> Path:
    return Path(os.environ.get("PASS_JAX_KERNEL_CACHE", "~/.cache/pass-jax/kernels")).expanduser()


def _build() -> Path:
    """The compiled library, reused when the source, flags, CPU and JAX headers are unchanged."""
    compiler = os.environ.get("CXX", "g++")
    model, flags = _cpu_model()  # -march=native code is only valid where the same instructions are
    texts = [(KERNELS / name).read_text() for name in (*SOURCES, "common.h")]
    key = hashlib.sha256("\0".join([*texts, compiler, *FLAGS, model, *sorted(flags), jax.__version__]).encode())
    out = cache_dir() / key.hexdigest()[:16] / "libpass_jax_kernels.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"pass-jax: compiling the CPU kernels into {out.parent} (once per machine)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), *(str(KERNELS / name) for name in SOURCES), "-o", str(built)]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
        os.replace(built, out)  # atomic: concurrent processes each build, one copy wins
    return out


def _unavailable_reason() -> str | None:
    if os.environ.get("PASS_JAX_CPU_KERNEL", "1") == "0":
        return "PASS_JAX_CPU_KERNEL=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 ({platform.machine()})"
    if "avx512f" not in _cpu_model()[1]:
        return "this CPU has no AVX-512"
    return None


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (once per process)."""
    reason = _unavailable_reason()
    if reason is None:
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build()))
            jax.ffi.register_ffi_target(TARGETS[False], jax.ffi.pycapsule(lib.PassJaxDense), platform="cpu")
            jax.ffi.register_ffi_target(TARGETS[True], jax.ffi.pycapsule(lib.PassJaxDenseT), platform="cpu")
            jax.ffi.register_ffi_target(ATTENTION, jax.ffi.pycapsule(lib.PassJaxAttention), platform="cpu")
            jax.ffi.register_ffi_target(ROWS, jax.ffi.pycapsule(lib.PassJaxRows), platform="cpu")
            jax.ffi.register_ffi_target(ROPE, jax.ffi.pycapsule(lib.PassJaxRope), platform="cpu")
            for name, fn in zip(CACHE, (lib.PassJaxCacheWrite, lib.PassJaxCacheMove)):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
            for name, fn in zip(BLOCK_ATTENTION, (lib.PassJaxBlockAttention, lib.PassJaxBlockAttentionGrad)):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
            return True
        except (OSError, RuntimeError) as err:
            reason = str(err)
    if reason != "PASS_JAX_CPU_KERNEL=0":
        warnings.warn(f"pass-jax: CPU kernels not used ({reason}); decoding uses XLA's ops", stacklevel=2)
    return False


def dense_applies(w: jax.Array) -> bool:
    """The product kernel takes this weight: a float32 or bfloat16 matrix (any row count; CpuOps limits it)."""
    return w.ndim == 2 and w.dtype in (jnp.float32, jnp.bfloat16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel(x2: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    out = jax.ShapeDtypeStruct((x2.shape[0], w.shape[0 if transposed else 1]), jnp.float32)
    return jax.ffi.ffi_call(TARGETS[transposed], out, vmap_method="sequential")(x2, w)


def _kernel_fwd(x2, w, transposed):
    return _kernel(x2, w, transposed), (x2, w)


def _kernel_bwd(transposed, res, g):  # XLA's products: gradients flow in training, where rows are many anyway
    x2, w = res
    wt = w if transposed else w.T  # [N, K]
    dx = jnp.dot(g.astype(w.dtype), wt, preferred_element_type=jnp.float32)
    dw = jnp.dot(x2.T.astype(w.dtype), g.astype(w.dtype), preferred_element_type=jnp.float32)  # [K, N]
    return dx, (dw.T if transposed else dw).astype(w.dtype)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def dense(x: jax.Array, w: jax.Array, transposed: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] (or w [N, K] transposed) -> float32 [..., N]; callers check `applies`.

    x is rounded to w's dtype first, as XLA's path does, then multiplied in float32."""
    x2 = x.astype(w.dtype).astype(jnp.float32).reshape(-1, x.shape[-1])
    n = w.shape[0 if transposed else 1]
    return _kernel(x2, w, transposed).reshape(x.shape[:-1] + (n,))


def rows_apply(table: jax.Array) -> bool:
    """Read embedding rows with the kernel: a bfloat16 table (XLA would widen the whole table to gather
    from it)."""
    return table.ndim == 2 and table.dtype == jnp.bfloat16


@jax.custom_vjp
def rows(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """float32(table[tokens]) for int32 tokens of any shape -> [..., D]; callers check `rows_apply`."""
    out = jax.ShapeDtypeStruct((*tokens.shape, table.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(ROWS, out, vmap_method="sequential")(table, tokens.astype(jnp.int32))


def _rows_fwd(table, tokens):
    return rows(table, tokens), (table, tokens)


def _rows_bwd(res, g):  # a full model's training differentiates the table: scatter the rows' gradients back
    table, tokens = res
    return jnp.zeros_like(table).at[tokens].add(g.astype(table.dtype)), None


rows.defvjp(_rows_fwd, _rows_bwd)


def cache_applies(buf: jax.Array) -> bool:
    """Write into this KV cache buffer with the kernels: bfloat16 [B, S, KV, hd] (XLA would widen the
    whole buffer for every write)."""
    return buf.ndim == 4 and buf.dtype == jnp.bfloat16


def cache_write(buf: jax.Array, block: jax.Array, offsets: jax.Array) -> jax.Array:
    """buf[b, offsets[b] : offsets[b] + T] = block[b] in place (kernels/cache_cpu.cc); check `cache_applies`."""
    call = jax.ffi.ffi_call(CACHE[0], jax.ShapeDtypeStruct(buf.shape, buf.dtype), input_output_aliases={0: 0},
                            vmap_method="sequential")
    return call(buf, block.astype(jnp.float32), offsets.astype(jnp.int32))


def cache_move(buf: jax.Array, lengths: jax.Array, path: jax.Array) -> jax.Array:
    """KVCache.gather_path for one buffer, in place: entry lengths[b] + path[b, d] to lengths[b] + d."""
    call = jax.ffi.ffi_call(CACHE[1], jax.ShapeDtypeStruct(buf.shape, buf.dtype), input_output_aliases={0: 0},
                            vmap_method="sequential")
    return call(buf, lengths.astype(jnp.int32), path.astype(jnp.int32))


def rope_applies(x: jax.Array) -> bool:
    """Rotate q / k [B, T, heads, hd] with the kernel: float32, a pass of any size.

    Unlike the products it has no row limit: it is a pass over the elements either way, and XLA's
    RoPE ops and their gradient cost a SmolLM2 training step (704 look-ahead rows) ~80 ms more."""
    return x.ndim == 4 and x.dtype == jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, rotated: int) -> jax.Array:
    """RoPE of the first `rotated` heads of x [B, T, heads, hd] at positions [B, T], the others copied
    (kernels/rope_cpu.cc); callers check `rope_applies`."""
    b, t, h, hd = x.shape
    call = jax.ffi.ffi_call(ROPE, jax.ShapeDtypeStruct((b * t, h, hd), jnp.float32), vmap_method="sequential")
    return call(x.reshape(b * t, h, hd), positions.reshape(-1).astype(jnp.int32), inv_freq,
                rotated=np.int64(rotated)).reshape(x.shape)


def _rope_fwd(x, positions, inv_freq, rotated):
    return rope(x, positions, inv_freq, rotated), (positions, inv_freq)


def _rope_bwd(rotated, res, g):  # a rotation's transpose is the rotation back
    positions, inv_freq = res
    return rope(g, -positions, inv_freq, rotated), None, None


rope.defvjp(_rope_fwd, _rope_bwd)


def attention_applies(rows: jax.Array, keys: jax.Array) -> bool:
    """The attention kernel takes these rows and cache: float32 or bfloat16, head size 32, 64 or 128."""
    return keys.dtype in (jnp.float32, jnp.bfloat16) and rows.shape[-1] in (32, 64, 128)


def attention(rows: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, prefix=None, prefix_rows=None):
    """Softmax attention of rows [B, KV, R, hd] over keys/values [B, S, KV, hd] where mask [B, T, S];
    prefix [2, P, KV, hd] (deep look-ahead keys/values) joins the softmax of the rows of the tokens
    where prefix_rows [B, T].

    Returns out [B, KV, R, hd] and, per row, the max score and the sum of exp(score - max) (float32)."""
    b, kv, r, hd = rows.shape
    if prefix is None:
        prefix, prefix_rows = jnp.zeros((2, 0, kv, hd), keys.dtype), jnp.zeros(mask.shape[:2], bool)
    prefix = prefix.astype(keys.dtype)
    out = (jax.ShapeDtypeStruct((b, kv, r, hd), jnp.float32), jax.ShapeDtypeStruct((b, kv, r, 2), jnp.float32))
    o, stats = jax.ffi.ffi_call(ATTENTION, out, vmap_method="sequential")(
        rows.astype(jnp.float32), keys, values, mask, prefix[0], prefix[1], prefix_rows.astype(bool))
    return o, stats[..., 0], stats[..., 1]


def block_attention_applies(q: jax.Array, keys: jax.Array) -> bool:
    """The block-attention kernels (training's look-ahead blocks) take these: float32, head size 32, 64 or 128."""
    return keys.dtype == jnp.float32 and q.shape[-1] in (32, 64, 128)


def block_attention(n: int, q, keys, values, visible, local_k, local_v, prefix, prefix_rows):
    """Training's look-ahead attention (kernels/block_attention_cpu.cc): q [B, T, H, hd] over the cache
    keys/values [B, S, KV, hd] where visible [B, T, S], their block of n of local_k/local_v [B, T, KV, hd]
    up to themselves, and prefix [2, P, KV, hd] where prefix_rows [B, T]. Returns out [B, T, H, hd] and
    each row's log-sum-exp [B, T, H] (float32)."""
    f32 = jnp.float32
    results = (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct(q.shape[:3], f32))
    return jax.ffi.ffi_call(BLOCK_ATTENTION[0], results, vmap_method="sequential")(
        q.astype(f32), keys, values, visible, local_k.astype(f32), local_v.astype(f32), prefix.astype(f32),
        prefix_rows, block=np.int64(n))


def block_attention_grad(n: int, q, keys, values, visible, local_k, local_v, prefix, prefix_rows, out, lse, g):
    """The gradient of `block_attention`'s out (cotangent g) with respect to q, local_k, local_v and prefix."""
    f32 = jnp.float32
    chunks = q.shape[0] * q.shape[1] // n  # one prefix gradient per (row, block), summed here
    results = tuple(jax.ShapeDtypeStruct(s, f32) for s in (q.shape, local_k.shape, local_v.shape, (chunks, *prefix.shape)))
    dq, d_local_k, d_local_v, d_prefix = jax.ffi.ffi_call(BLOCK_ATTENTION[1], results, vmap_method="sequential")(
        q.astype(f32), keys, values, visible, local_k.astype(f32), local_v.astype(f32), prefix.astype(f32), prefix_rows,
        out, lse, g.astype(f32), block=np.int64(n))
    return dq, d_local_k, d_local_v, d_prefix.sum(0)
