"""Command-line generation and benchmarks: `python -m infer generate|bench --help`."""
