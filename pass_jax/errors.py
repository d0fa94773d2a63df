"""The errors pass-jax raises on purpose: each carries its reason in one line."""


class ConfigError(ValueError):
    """A model directory or config that pass-jax cannot run, with the reason in the message."""


class CacheOverflowError(ValueError):
    """A request needs more cache slots than the fixed buffer holds."""
