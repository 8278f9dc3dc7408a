"""The paired bootstrap against DELIA: no difference is no difference, a clear one is found, a one-row
one is noise, and the rows of the two arms stay paired."""

import random

from delia.report.bootstrap import accuracy_difference, kl_difference


def test_identical_arms_differ_by_exactly_nothing():
    rows = [[random.Random(s).random() < 0.5 for _ in range(24)] for s in range(3)]
    same = accuracy_difference(rows, rows, resamples=500)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "beyond_noise": False}
    kl = [[(random.Random(s).random(), 10) for _ in range(16)] for s in range(3)]
    assert kl_difference(kl, kl, resamples=500)["beyond_noise"] is False


def test_a_clear_gain_is_beyond_noise_and_one_row_is_not():
    always, never = [[True] * 24] * 3, [[False] * 24] * 3
    gain = accuracy_difference(always, never, resamples=500)
    assert gain["diff"] == 1.0 and gain["low"] == 1.0 and gain["beyond_noise"]
    one_row = [[True] + [False] * 23] + [[False] * 24] * 2
    small = accuracy_difference(one_row, never, resamples=2000)
    assert small["diff"] > 0 and small["low"] == 0.0 and not small["beyond_noise"]
    low = [[(0.1 * n, 10) for n in range(16)]] * 3
    high = [[(0.1 * n + 1.0, 10) for n in range(16)]] * 3
    drift = kl_difference(high, low, resamples=500)
    assert abs(drift["diff"] - 0.1) < 1e-9 and drift["low"] > 0 and drift["beyond_noise"]


def test_pairing_removes_the_spread_the_rows_share():
    # hard rows fail for both arms, easy rows pass for both; the arm adds exactly one row per seed of 8:
    # paired, the difference is always positive; the unpaired spread of either arm is far larger
    base = [[i % 2 == 0 for i in range(8)] for _ in range(3)]
    better = [[x or i == 1 for i, x in enumerate(seed)] for seed in base]
    d = accuracy_difference(better, base, resamples=2000)
    assert d["diff"] == 1 / 8 and d["low"] >= 0 and d["high"] <= 0.5
