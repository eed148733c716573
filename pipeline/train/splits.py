"""Seeded train/validation splits: one hold-out split, or k folds (``splits.json``)."""
from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError, InputError
from pipeline.train.data import derived_seed


def make_splits(case_ids: list[str], folds: int, validation_fraction: float, seed: int) -> list[dict]:
    """``[{"fold", "train", "val"}]``: k disjoint validation folds, or one split when ``folds == 1``."""
    ids = sorted(case_ids)
    n = len(ids)
    if n < 2:
        raise InputError(f"training needs at least 2 labelled training cases (one is held out for validation), "
                         f"got {n}. Add labelled cases to the dataset.")
    if folds < 1:
        raise ConfigError(f"train.folds must be 1 or more, got {folds}.")
    if folds > n:
        raise ConfigError(f"train.folds must be at most the number of labelled training cases ({n}), got {folds}. "
                          f"Lower train.folds or add cases.")
    order = np.random.default_rng(derived_seed(seed, "splits")).permutation(n)
    if folds == 1:
        if not 0.0 < validation_fraction < 1.0:
            raise ConfigError(f"train.validation_fraction must be between 0 and 1 (exclusive), got "
                              f"{validation_fraction}.")
        n_val = min(n - 1, max(1, int(round(validation_fraction * n))))
        chunks = [order[:n_val]]
    else:
        chunks = np.array_split(order, folds)
    splits = []
    for fold, chunk in enumerate(chunks):
        val = sorted(ids[i] for i in chunk)
        splits.append({"fold": fold, "train": [i for i in ids if i not in set(val)], "val": val})
    return splits
