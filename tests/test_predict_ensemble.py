"""Fold ensembles at predict: predict.folds null ensembles every fold of the model folder, and provenance says which."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.predict.stage import run_predict

from helpers.predict import write_phantom_nifti, write_small_model


def _probabilities(cfg: Config, model: Path, inputs: Path, out: Path) -> tuple[np.ndarray, dict, dict]:
    result = run_predict(cfg, model, inputs, out)
    assert result.exit_code == 0
    entry = result.report["cases"][0]
    provenance = json.loads((out / entry["outputs"]["provenance"]).read_text())
    stored = np.load(out / entry["outputs"]["probabilities"])
    return stored["probabilities"].astype(np.float64), provenance, result.report


def test_by_default_predict_ensembles_every_fold_and_records_them(tmp_path: Path):
    model = write_small_model(tmp_path / "model", folds=2)  # two different random networks
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_phantom_nifti(inputs / "case0_0000.nii.gz", seed=1)
    cfg = Config()
    assert cfg.predict.folds is None  # the default
    cfg.predict.precision = "fp32"
    cfg.predict.outputs.thumbnails = cfg.predict.outputs.seg_nrrd = False
    cfg.predict.outputs.probabilities = "npz"  # model grid, float16
    both, provenance, report = _probabilities(cfg, model, inputs, tmp_path / "both")
    assert provenance["model"]["folds"] == [0, 1] and report["model"]["folds"] == [0, 1]
    assert provenance["inference"]["folds"] == 2
    assert provenance["trust"]["members"] == 2  # the agreement term compares the two folds
    singles = []
    for fold in (0, 1):
        cfg.predict.folds = [fold]
        probabilities, provenance, _ = _probabilities(cfg, model, inputs, tmp_path / f"fold{fold}")
        assert provenance["model"]["folds"] == [fold] and provenance["inference"]["folds"] == 1
        singles.append(probabilities)
    assert np.abs(singles[0] - singles[1]).max() > 0.05  # the folds disagree, so the test can tell
    # the ensemble is the mean of the folds' probabilities (window blending is linear), to float16 rounding
    np.testing.assert_allclose(both, (singles[0] + singles[1]) / 2, atol=2e-3)
