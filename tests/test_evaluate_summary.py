"""pipeline.evaluate.summary: per-class statistics with bootstrap intervals and the paired run comparison."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate.metrics import METRIC_KEYS
from pipeline.evaluate.summary import SummaryOptions, compare_runs, describe, summarise


def make_row(case_id, dice, hd95=2.0, class_value=1, class_name="liver", flags="", rel_error=0.1):
    row = {key: 0.0 for key in METRIC_KEYS}
    row.update(case_id=case_id, class_value=class_value, class_name=class_name, dice=dice, hd95_mm=hd95,
               surface_dice=dice, volume_rel_error=rel_error, fp_components=0, fn_components=0, flags=flags)
    return row


def test_summary_statistics_per_class():
    rows = [make_row(f"c{i}", d) for i, d in enumerate([0.5, 0.7, 0.9])]
    rows += [make_row(f"c{i}", 0.4, class_value=2, class_name="kidney") for i in range(3)]
    summary = summarise(rows)
    assert summary["n_cases"] == 3
    liver = summary["classes"]["liver"]["metrics"]["dice"]
    assert liver["mean"] == pytest.approx(0.7)
    assert liver["median"] == pytest.approx(0.7)
    assert liver["std"] == pytest.approx(0.2)  # sample standard deviation of 0.5, 0.7, 0.9
    assert liver["ci_low"] <= liver["mean"] <= liver["ci_high"]
    assert 0.5 <= liver["ci_low"] < liver["ci_high"] <= 0.9
    assert (liver["n"], liver["n_missing"]) == (3, 0)
    kidney = summary["classes"]["kidney"]
    assert kidney["class_value"] == 2 and kidney["metrics"]["dice"]["std"] == pytest.approx(0.0)


def test_bootstrap_ci_contains_the_mean_and_is_reproducible():
    rng = np.random.default_rng(11)
    values = list(rng.beta(8, 2, size=40))
    first, second = describe(values), describe(values)
    assert first == second  # seeded
    assert first["ci_low"] < first["mean"] < first["ci_high"]
    # the interval of a mean of 40 values is about ±2 standard errors wide
    standard_error = np.std(values, ddof=1) / math.sqrt(len(values))
    assert first["ci_high"] - first["ci_low"] == pytest.approx(2 * 1.96 * standard_error, rel=0.25)
    other_seed = describe(values, SummaryOptions(seed=5))
    assert other_seed["ci_low"] != first["ci_low"]


def test_nan_values_are_counted_as_missing_not_dropped_silently():
    rows = [make_row("a", 0.8), make_row("b", 0.0, flags="ref_empty", rel_error=math.nan), make_row("c", 0.6)]
    summary = summarise(rows)
    entry = summary["classes"]["liver"]
    assert entry["metrics"]["volume_rel_error"]["n"] == 2
    assert entry["metrics"]["volume_rel_error"]["n_missing"] == 1
    assert entry["metrics"]["dice"]["mean"] == pytest.approx(1.4 / 3)  # the empty case counts in Dice
    assert entry["flags"] == {"both_empty": 0, "pred_empty": 0, "ref_empty": 1}


def test_single_value_has_no_spread_and_all_nan_has_no_mean():
    one = describe([0.9])
    assert one["mean"] == 0.9 and one["std"] is None and one["ci_low"] is None
    none = describe([math.nan, math.nan])
    assert none["mean"] is None and none["n_missing"] == 2


def find(comparison, metric, class_name="liver"):
    return next(r for r in comparison if r["metric"] == metric and r["class_name"] == class_name)


def test_run_b_better_on_every_case_gives_positive_difference_and_small_p():
    rows_a = [make_row(f"case{i:02d}", 0.6 + 0.01 * i, hd95=5.0 + i) for i in range(10)]
    rows_b = [make_row(f"case{i:02d}", 0.65 + 0.015 * i, hd95=4.0 + 0.5 * i) for i in range(10)]
    comparison = compare_runs(rows_a, rows_b)
    dice = find(comparison, "dice")
    assert dice["n_cases"] == 10
    assert dice["mean_difference"] == pytest.approx(np.mean([0.05 + 0.005 * i for i in range(10)]))
    assert dice["p_value"] == pytest.approx(2 / 2 ** 10)  # exact two-sided test, all 10 signs positive
    assert dice["b_is_better"] is True and dice["higher_is_better"] is True
    hd95 = find(comparison, "hd95_mm")
    assert hd95["mean_difference"] < 0 and hd95["b_is_better"] is True and hd95["p_value"] < 0.01
    assert dice["cases_only_in_a"] == [] and dice["cases_only_in_b"] == []


def test_identical_runs_give_p_value_one():
    rows = [make_row(f"case{i}", 0.7 + 0.02 * i) for i in range(6)]
    comparison = compare_runs(rows, [dict(r) for r in rows])
    dice = find(comparison, "dice")
    assert dice["p_value"] == 1.0 and dice["mean_difference"] == 0.0
    assert "all paired differences are zero" in dice["test_note"]
    assert dice["b_is_better"] is None


def test_fewer_than_two_common_cases_and_cases_in_one_run_only():
    rows_a = [make_row("shared", 0.7), make_row("only-a", 0.5)]
    rows_b = [make_row("shared", 0.8), make_row("only-b1", 0.9), make_row("only-b2", 0.9)]
    dice = find(compare_runs(rows_a, rows_b), "dice")
    assert dice["n_cases"] == 1 and dice["p_value"] is None
    assert "at least 2 are needed" in dice["test_note"]
    assert dice["mean_difference"] == pytest.approx(0.1)
    assert dice["cases_only_in_a"] == ["only-a"] and dice["cases_only_in_b"] == ["only-b1", "only-b2"]


def test_class_missing_from_one_run_and_nan_pairs():
    rows_a = [make_row("x", 0.7, rel_error=math.nan), make_row("y", 0.6), make_row("z", 0.5),
              make_row("x", 0.3, class_value=2, class_name="kidney")]
    rows_b = [make_row("x", 0.8), make_row("y", 0.7), make_row("z", 0.6)]
    comparison = compare_runs(rows_a, rows_b)
    relative = find(comparison, "volume_rel_error")
    assert relative["n_cases"] == 2 and relative["n_missing"] == 1
    kidney = find(comparison, "dice", "kidney")
    assert kidney["n_cases"] == 0 and kidney["mean_difference"] is None and kidney["cases_only_in_a"] == ["x"]
    dice = find(comparison, "dice")
    assert dice["p_value"] == pytest.approx(0.25)  # 3 positive differences: exact two-sided p = 2/8
