"""benchmarks/bench_peers.py: the tuning rule that freezes each method's setting, and the report it writes."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers", os.path.join(ROOT, "benchmarks", "bench_peers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method, setting, digit, ua, drop, cond, kind="tune"):
    return {"method": method, "setting": setting, "digit": digit, "kind": kind, "unlearning_accuracy": ua,
            "retained_drop": drop, "retained_accuracy": 0.99 - drop, "conditioning": {"asr": cond},
            "wall_seconds": 1.0, "cpu_seconds": 1.0}


def test_choose_prefers_the_qualifying_setting_with_the_lowest_attack_success(bench):
    a, b, c = {"lr": 1}, {"lr": 2}, {"lr": 3}
    rows = []
    for d in (1, 4, 7):
        rows.append(_row("m", a, d, 1.0, 0.01, 0.30))   # qualifies, attack 30%
        rows.append(_row("m", b, d, 1.0, 0.02, 0.10))   # qualifies, attack 10%: the pick
        rows.append(_row("m", c, d, 1.0, 0.01 if d != 4 else 0.05, 0.0))  # best attack, but 5 points on digit 4
    chosen = bench.choose(rows)["m"]
    assert chosen["setting"] == b and chosen["digits"] == [1, 4, 7]
    assert chosen["why"].startswith("qualifies")


def test_choose_falls_back_to_unlearning_then_damage(bench):
    weak, strong = {"lr": 1}, {"lr": 2}
    rows = [_row("m", weak, d, 0.80, 0.01, 0.5) for d in (1, 4)] + [_row("m", strong, d, 0.90, 0.02, 0.5) for d in (1, 4)]
    assert bench.choose(rows)["m"]["setting"] == strong      # no setting reaches 95%: highest UA at drop <= 3
    rows = [_row("m", weak, d, 1.0, 0.10, 0.5) for d in (1, 4)] + [_row("m", strong, d, 1.0, 0.05, 0.5) for d in (1, 4)]
    assert bench.choose(rows)["m"]["setting"] == strong      # every setting damages: the smallest mean drop


def test_summary_counts_digits_meeting_both_targets(bench):
    rows = [_row("uce", {}, d, ua, drop, cond, kind="report")
            for d, ua, drop, cond in [(0, 1.0, 0.01, 0.9), (1, 0.94, 0.0, 0.8), (2, 1.0, 0.031, 0.7)]]
    (s,) = bench.summarize(rows)
    assert s["both_targets"] == 1 and s["ua_min"] == pytest.approx(0.94) and s["drop_max"] == pytest.approx(0.031)
    assert s["cond_mean"] == pytest.approx(0.8)
    text = bench.markdown({"threads": 1, "jobs": 1, "n_per_digit": 50, "kind": "report", "digits": [0, 1, 2],
                           "rows": rows, "summary": [s]})
    assert "| uce | 3 | 98.0% / 94% | 1.4 / 3.1 | 80% / 90% | — / — | — / — | — / — | 1 of 3 | 1 / 1 |" in text
