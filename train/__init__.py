"""Training entry points: `python -m train lookahead --help`."""
