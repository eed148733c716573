"""Statistics over evaluated cases: per-class summaries with bootstrap intervals, and paired run comparison.

Rows are those of :func:`pipeline.evaluate.metrics.case_metrics` (one per case and class; ``case_id``
identifies the case). Values that are NaN (an undefined metric such as the relative volume error
against an empty reference, or hd95 under the ``nan_flagged`` policy) are never averaged silently:
each statistic reports ``n`` (values used) and ``n_missing`` (NaN values left out).

Summary statistics per class and metric: mean, median, sample standard deviation (``ddof=1``; null
for fewer than 2 values) and a percentile bootstrap confidence interval of the mean (seeded, so the
same rows always give the same interval; null for fewer than 2 values).

Comparison (:func:`compare_runs`): per class and metric, the paired differences B − A over the cases
both runs have, their mean and median, and the two-sided Wilcoxon signed-rank p-value
(``scipy.stats.wilcoxon``, zero differences dropped as in Wilcoxon's original method). Special cases:
fewer than 2 paired cases → no test (``p_value`` null, ``test_note`` says why); all differences zero
→ ``p_value`` 1.0 (no evidence of a difference). With few cases the exact test cannot reach small
p-values (5 cases all in one direction give p = 0.0625).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate.metrics import HIGHER_IS_BETTER, METRIC_KEYS

FLAGS = ("both_empty", "pred_empty", "ref_empty")


@dataclass
class SummaryOptions:
    """How the evaluation summary computes its confidence intervals."""

    bootstrap_resamples: int = field(default=2000, metadata={
        "help": "Bootstrap resamples for the confidence interval of each mean."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the bootstrap interval."})
    seed: int = field(default=0, metadata={"help": "Random seed of the bootstrap, so summaries are reproducible."})


def summarise(rows: list[dict], options: SummaryOptions | None = None) -> dict:
    """Per class and metric: mean, median, std, bootstrap CI, n and n_missing.

    Returns ``{"n_cases": int, "classes": {class_name: {"class_value", "n_cases", "flags": {flag: count},
    "metrics": {metric: {"mean", "median", "std", "ci_low", "ci_high", "n", "n_missing"}}}},
    "statistics": {...how they were computed}}``. Two classes sharing a name are keyed "name (value)".
    """
    options = options or SummaryOptions()
    classes: dict[str, dict] = {}
    groups = _group_by_class(rows)
    names = [name for _, name in groups]
    for (value, name), class_rows in groups.items():
        if names.count(name) > 1:
            name = f"{name} ({value})"
        flags = {flag: sum(flag in str(row.get("flags", "")).split(";") for row in class_rows) for flag in FLAGS}
        classes[name] = {
            "class_value": value,
            "n_cases": len(class_rows),
            "flags": flags,
            "metrics": {metric: describe([row[metric] for row in class_rows], options) for metric in METRIC_KEYS
                        if all(metric in row for row in class_rows)},
        }
    return {
        "n_cases": len({row["case_id"] for row in rows}),
        "classes": classes,
        "statistics": {"std": "sample standard deviation (ddof=1)",
                       "ci": f"{options.confidence:.0%} percentile bootstrap interval of the mean, "
                             f"{options.bootstrap_resamples} resamples, seed {options.seed}",
                       "n_missing": "NaN values (undefined metrics, see flags) left out of the statistics"},
    }


def describe(values: list[float], options: SummaryOptions | None = None) -> dict:
    """mean, median, std, ci_low, ci_high over the finite values, plus n and n_missing (NaN values)."""
    options = options or SummaryOptions()
    array = np.asarray(values, dtype=np.float64)
    finite = array[~np.isnan(array)]
    result = {"mean": None, "median": None, "std": None, "ci_low": None, "ci_high": None,
              "n": int(finite.size), "n_missing": int(array.size - finite.size)}
    if finite.size == 0:
        return result
    result.update(mean=float(finite.mean()), median=float(np.median(finite)))
    if finite.size >= 2:
        result["std"] = float(finite.std(ddof=1))
        result["ci_low"], result["ci_high"] = bootstrap_ci(finite, options)
    return result


def bootstrap_ci(values: np.ndarray, options: SummaryOptions) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded)."""
    rng = np.random.default_rng(options.seed)
    resampled = values[rng.integers(0, values.size, size=(options.bootstrap_resamples, values.size))]
    means = resampled.mean(axis=1)
    tail = (1.0 - options.confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def compare_runs(rows_a: list[dict], rows_b: list[dict], metrics: tuple[str, ...] = METRIC_KEYS) -> list[dict]:
    """Paired comparison of run B against run A: one row per class and metric (differences are B − A)."""
    by_class_a, by_class_b = _group_by_class(rows_a), _group_by_class(rows_b)
    result = []
    for key in sorted(set(by_class_a) | set(by_class_b)):
        cases_a = {row["case_id"]: row for row in by_class_a.get(key, [])}
        cases_b = {row["case_id"]: row for row in by_class_b.get(key, [])}
        common = sorted(set(cases_a) & set(cases_b))
        only_a, only_b = sorted(set(cases_a) - set(cases_b)), sorted(set(cases_b) - set(cases_a))
        for metric in metrics:
            pairs = np.array([(float(cases_a[c][metric]), float(cases_b[c][metric])) for c in common],
                             dtype=np.float64).reshape(-1, 2)
            usable = pairs[~np.isnan(pairs).any(axis=1)]
            differences = usable[:, 1] - usable[:, 0]
            p_value, note = paired_test(differences)
            mean_difference = float(differences.mean()) if differences.size else None
            higher_is_better = HIGHER_IS_BETTER.get(metric)
            result.append({
                "class_value": key[0], "class_name": key[1], "metric": metric,
                "n_cases": int(differences.size), "n_missing": int(len(pairs) - len(usable)),
                "mean_a": float(usable[:, 0].mean()) if usable.size else None,
                "mean_b": float(usable[:, 1].mean()) if usable.size else None,
                "mean_difference": mean_difference,
                "median_difference": float(np.median(differences)) if differences.size else None,
                "p_value": p_value, "test_note": note,
                "higher_is_better": higher_is_better,
                "b_is_better": (None if higher_is_better is None or not mean_difference
                                else (mean_difference > 0) == higher_is_better),
                "cases_only_in_a": only_a, "cases_only_in_b": only_b,
            })
    return result


def paired_test(differences: np.ndarray) -> tuple[float | None, str]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences, and a note on how it was obtained."""
    from scipy.stats import wilcoxon

    if differences.size < 2:
        return None, f"no test: {differences.size} paired case(s), at least 2 are needed"
    if not np.any(differences):
        return 1.0, "all paired differences are zero"
    with warnings.catch_warnings():  # scipy warns about ties/zeros; the note below records the method
        warnings.simplefilter("ignore")
        result = wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
    p_value = float(result.pvalue)
    if math.isnan(p_value):
        return None, "no test: the Wilcoxon statistic is undefined for these differences"
    zeros = int(np.count_nonzero(differences == 0))
    return p_value, "Wilcoxon signed-rank, two-sided" + (f", {zeros} zero difference(s) dropped" if zeros else "")


def _group_by_class(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    groups: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((int(row["class_value"]), str(row["class_name"])), []).append(row)
    return groups
