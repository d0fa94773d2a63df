"""pass-jax's CPU kernels for a single x86-64 AVX-512 CPU device: `ffi` builds and calls them, `ops.CpuOps`
puts them behind the `pass_jax.backends.xla.XlaOps` boundary."""
