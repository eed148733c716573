"""Training never silently restarts: --resume without a checkpoint is refused; checkpoints are also saved on a timer."""
from __future__ import annotations

import pytest

from pipeline.cli import main as cli_main
from pipeline.errors import ConfigError
from pipeline.train import loop
from pipeline.train.stage import run_train

from helpers.train import TINY, _experiment


def test_resume_without_a_checkpoint_says_so_and_asks_for_a_plain_train(prepared, tmp_path, capsys):
    cfg = _experiment(prepared, tmp_path, "r")
    with pytest.raises(ConfigError, match=r"--resume must continue a checkpoint, got none .* plain 'ctseg train'"):
        run_train(cfg, resume=True)
    assert not (cfg.stage_dir("train") / "fold_0" / "checkpoint_last.pt").exists()  # nothing was trained
    code = cli_main(["train", "--resume", "--set", f"output_root={tmp_path}", "--set", "experiment=r",
                     *[item for override in TINY for item in ("--set", override)]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "plain 'ctseg train'" in err


def _checkpoint_steps(monkeypatch) -> list[int]:
    """Steps at which checkpoint_last.pt is written (the real save runs; this only watches it)."""
    steps: list[int] = []
    real = loop._save

    def watched(path, data):
        if path.name == "checkpoint_last.pt":
            steps.append(int(data["step"]))
        real(path, data)

    monkeypatch.setattr(loop, "_save", watched)
    return steps


def test_checkpoints_are_saved_on_a_time_interval_as_well_as_at_validation(prepared, tmp_path, monkeypatch):
    steps = _checkpoint_steps(monkeypatch)
    cfg = _experiment(prepared, tmp_path, "t", "train.max_steps=4", "train.val_every=4",
                      "train.checkpoint_minutes=0.000001")  # a tiny interval: due after every step
    assert run_train(cfg)["complete"]
    assert steps == [1, 2, 3, 4]  # 1-3 by the timer, 4 at the validation
    steps.clear()
    cfg = _experiment(prepared, tmp_path, "v", "train.max_steps=4", "train.val_every=4", "train.checkpoint_minutes=0")
    assert run_train(cfg)["complete"]
    assert steps == [4]  # 0 = only at validations
    # a checkpoint written by the timer resumes: the run is continued, not restarted
    steps.clear()
    cfg = _experiment(prepared, tmp_path, "k", "train.max_steps=4", "train.val_every=4",
                      "train.checkpoint_minutes=0.000001", "train.steps_per_run=2")
    first = run_train(cfg)
    assert not first["complete"] and steps[-1] == 2
    resumed = run_train(cfg, resume=True)
    assert resumed["complete"] and resumed["folds"][0]["steps_this_run"] == 2
    assert loop.TrainConfig().checkpoint_minutes == 10.0  # the default interval


def test_a_cached_training_image_with_nan_voxels_is_refused_naming_the_case():
    import numpy as np

    from pipeline.errors import InputError
    from pipeline.train.stage import check_finite

    image = np.zeros((1, 8, 8, 8), dtype=np.float32)
    check_finite("ok", image)
    image[0, 1, 2, 3] = np.inf
    with pytest.raises(InputError, match="preprocessed case c7 must hold finite intensities, got 1 NaN"):
        check_finite("c7", image)
