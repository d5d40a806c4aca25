"""The benchmarks' timing: round-robin order, spread with its count, paired ratios; bench.switch end to end."""

from __future__ import annotations

import json
import sys

import pytest

from bench import common


def test_round_robin_interleaves_the_calls_after_one_warm_up_each():
    calls: list[str] = []
    times = common.round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeat=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed ones in turn
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_spread_reports_min_median_max_and_how_many():
    assert common.spread([3.0, 1.0, 2.0, 10.0]) == {"min": 1.0, "median": 2.5, "max": 10.0, "n": 4}
    assert common.spread([0.001, 0.003], scale=1e3, digits=1, p95=True) == {
        "min": 1.0,
        "median": 2.0,
        "p95": 3.0,
        "max": 3.0,
        "n": 2,
    }
    assert common.spread([]) == {}


def test_ratio_is_of_medians_with_the_extremes_of_the_paired_rounds():
    times = {"slow": [2.0, 4.0, 9.0], "fast": [1.0, 2.0, 3.0]}
    assert common.ratio(times, "slow", "fast", "x") == {"x": 2.0, "x_min": 2.0, "x_max": 3.0}


@pytest.mark.slow
def test_bench_switch_prints_spread_for_a_switch_with_its_forward(monkeypatch, capsys):
    from bench import switch

    argv = ["switch", "--config", "tiny", "--repeat", "2", "--sets", "2,3", "--ks", "1,2"]
    monkeypatch.setattr(sys, "argv", argv)
    switch.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    figures = out["figures"]
    assert out["benchmark"] == "switch" and figures["rounds"] == 2 == out["rounds"]
    for key in ("k1_2_sets", "k1_3_sets", "k2_2_sets", "k2_3_sets"):
        for name in ("diffusers_over_ours", "fresh_load_over_ours", "ours_switch_forward_over_warm"):
            lo, mid, hi = (figures[f"{key}_{name}{q}"] for q in ("_min", "", "_max"))
            assert 0 < lo <= hi and mid > 0
    assert set(out["goals"]) <= set(figures)
