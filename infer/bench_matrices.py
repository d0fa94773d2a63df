"""bench --suite matrices: where a forward pass's time goes, by rows per product (T tokens per pass).

For each T: the model's layer matrices run as the dependent chain a pass runs them (each product's
input is the last one's output), the same products independent of each other (all from one input:
the backend may run them side by side), the LM head alone, and the whole pass (attention, norms,
cache writes included) with a warm cache of 256. The floor is the layer matrices' bytes at the
stream rate of one large matrix-vector product. The gap between "chain" and "independent" is what a
single product leaves of the machine's cores; the gap between the whole pass and chain + head is
everything outside the matrices.
"""

from __future__ import annotations

import numpy as np

from .bench_common import log_row, median_time, model_loaders, pass_ms, stream_rate

MATRIX_TOKENS = (1, 2, 4, 8, 16)


def _layer_products(cfg, params, rows: int, chained: bool):
    """A jitted function of x [rows, D] running every layer's qkv, o, gate_up and down products."""
    import jax
    import jax.numpy as jnp

    from pass_jax.backends import default_ops

    dense = default_ops().dense  # the products a decode pass runs on this machine
    nq = cfg.num_heads * cfg.head_dim
    f = cfg.intermediate_size

    def chain(layers, x):
        for layer in layers:
            q = dense(x, layer["qkv"])[:, :nq]
            x = x + dense(q, layer["o"])
            gate, up = jnp.split(dense(x, layer["gate_up"]), 2, axis=-1)
            x = x + dense(jax.nn.silu(gate) * up, layer["down"])
        return x

    def independent(layers, x):
        wide = jnp.tile(x, (1, -(-max(nq, f) // x.shape[1])))
        return [(dense(x, layer["qkv"]), dense(wide[:, :nq], layer["o"]), dense(x, layer["gate_up"]),
                 dense(wide[:, :f], layer["down"])) for layer in layers]

    fn = jax.jit(chain if chained else independent)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, cfg.hidden_size)), jnp.float32)
    jax.block_until_ready(fn(params["layers"], x))
    return lambda: jax.block_until_ready(fn(params["layers"], x))


def _head(params, rows: int, d: int):
    import jax
    import jax.numpy as jnp

    from pass_jax.models.llama import logits_from_hidden

    fn = jax.jit(logits_from_hidden)
    h = jnp.ones((1, rows, d), jnp.float32)
    fn(params, h).block_until_ready()
    return lambda: fn(params, h).block_until_ready()


def suite_matrices(args, names):
    rate, rows = stream_rate(), []
    repeats = max(args.repeats, 5)
    for name, load in model_loaders(args, names):
        model = load(args.dtype)
        cfg, params = model.config, model.params
        layer_bytes = sum(w.nbytes for layer in params["layers"] for w in layer.values() if w.ndim == 2)
        for t in MATRIX_TOKENS:
            row = {"model": name, "dtype": args.dtype, "tokens": t,
                   "chain_ms": median_time(_layer_products(cfg, params, t, True), repeats) * 1e3,
                   "independent_ms": median_time(_layer_products(cfg, params, t, False), repeats) * 1e3,
                   "head_ms": median_time(_head(params, t, cfg.hidden_size), repeats) * 1e3,
                   "pass_ms": pass_ms(model, t, args.repeats),
                   "layer_floor_ms": layer_bytes / rate * 1e3}
            row["outside_matrices_ms"] = row["pass_ms"] - row["chain_ms"] - row["head_ms"]
            rows.append(row)
            log_row(row)
    return {"stream_rate_gb_s": rate / 1e9, "context": 256, "batch": 1, "rows": rows}
