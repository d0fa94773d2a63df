"""--compare and the benchmarks never time a first execution, and alternate the methods they compare."""

from infer.timing import alternate_medians, warm
from pass_jax import GenerationResult, GenerationStats


def _fake(name, calls, seconds):
    """A run that records its calls; the first compiles, later ones take seconds[i] in turn."""
    def run():
        n = sum(c == name for c in calls)
        calls.append(name)
        secs = 9.0 if n == 0 else seconds[n - 1]
        stats = GenerationStats(new_tokens=1, forward_passes=1, tokens_per_forward=1.0, seconds=secs,
                                compile_seconds=5.0 if n == 0 else 0.0, tokens_per_second=1 / secs,
                                acceptance_by_position=[], row_forward_passes=[1])
        return GenerationResult([[n]], None, stats)
    return run


def _times(res):
    return res.stats.seconds, res.stats.compile_seconds


def test_alternate_medians_warms_up_then_alternates_and_keeps_the_median_run():
    calls = []
    out = alternate_medians({"pass": _fake("pass", calls, [3.0, 1.0, 2.0]), "ar": _fake("ar", calls, [4.0, 6.0, 5.0])})
    assert calls == ["pass", "ar"] * 4  # one warm-up each, then turns
    assert _times(out["pass"]) == (2.0, 5.0) and out["pass"].token_ids == [[3]]
    assert _times(out["ar"]) == (5.0, 5.0)


def test_warm_runs_again_only_after_compiling():
    calls = []
    run = _fake("x", calls, [1.0, 1.5])
    assert _times(warm(run)) == (1.0, 5.0) and calls == ["x", "x"]
    assert _times(warm(run)) == (1.5, 0.0) and calls == ["x"] * 3
