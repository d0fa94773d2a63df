"""--compare and the benchmarks never time a first execution, and alternate the methods they compare."""

from infer.timing import alternate_medians, warm
from pass_jax import GenerationResult


def _fake(name, calls, seconds):
    """A run that records its calls; the first compiles, later ones take seconds[i] in turn."""
    def run():
        n = sum(c == name for c in calls)
        calls.append(name)
        stats = {"seconds": 9.0 if n == 0 else seconds[n - 1], "compile_seconds": 5.0 if n == 0 else 0.0}
        return GenerationResult([[n]], None, stats)
    return run


def test_alternate_medians_warms_up_then_alternates_and_keeps_the_median_run():
    calls = []
    out = alternate_medians({"pass": _fake("pass", calls, [3.0, 1.0, 2.0]), "ar": _fake("ar", calls, [4.0, 6.0, 5.0])})
    assert calls == ["pass", "ar"] * 4  # one warm-up each, then turns
    assert out["pass"].stats == {"seconds": 2.0, "compile_seconds": 5.0} and out["pass"].token_ids == [[3]]
    assert out["ar"].stats == {"seconds": 5.0, "compile_seconds": 5.0}


def test_warm_runs_again_only_after_compiling():
    calls = []
    run = _fake("x", calls, [1.0, 1.5])
    assert warm(run).stats == {"seconds": 1.0, "compile_seconds": 5.0} and calls == ["x", "x"]
    assert warm(run).stats == {"seconds": 1.5, "compile_seconds": 0.0} and calls == ["x"] * 3
