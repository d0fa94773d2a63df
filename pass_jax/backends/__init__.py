"""Which implementation of `pass_jax.backends.xla.XlaOps` a plan runs: XLA's ops, or XLA's with the CPU kernels.

`default_ops()` is this process's choice, made once: the CPU kernels (`backends.cpu`) on a single CPU
device where they build, XLA's ops with XLA CPU's one workaround on other CPUs (several devices, no
AVX-512, no compiler), XLA's ops alone on TPUs and GPUs. A plan
holds its ops as a static field (`DecodePlan.ops`), so a program traced with one never serves the other.
"""

from __future__ import annotations

import functools

from .xla import XLA, XlaOps

BACKENDS = ("auto", "xla", "cpu")


@functools.cache
def default_ops() -> XlaOps:
    """The CPU kernels where they serve (one CPU device, built for this machine), else XLA's ops."""
    import jax

    if jax.default_backend() != "cpu":
        return XLA
    from .cpu import ffi
    from .cpu.ops import CpuOps, XlaCpuOps

    return CpuOps() if jax.device_count() == 1 and ffi.available() else XlaCpuOps()


def resolve(ops: XlaOps | str | None) -> XlaOps:
    """ops as given; None or "auto" = `default_ops()`; "xla" = XLA's ops alone; "cpu" = the CPU kernels
    (an error where they cannot run)."""
    if ops is None or ops == "auto":
        return default_ops()
    if isinstance(ops, XlaOps):
        return ops
    if ops == "xla":
        return XLA
    if ops == "cpu":
        from .cpu.ops import CpuOps

        if not isinstance(default_ops(), CpuOps):
            raise ValueError("backend 'cpu' needs the CPU kernels on a single x86-64 AVX-512 CPU device; "
                             "they are not available in this process (see the warning above)")
        return CpuOps()
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {ops!r}")
