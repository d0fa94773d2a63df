"""python -m infer bench: placeholder replaced below."""
