"""The train stage on a tiny synthetic set: outputs, model folder, 2.5D, k folds, exact resume, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline import training_fingerprint
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.evaluate.metrics import dice_per_class
from pipeline.models import load_model_folder
from pipeline.models.folder import read_postprocessing
from pipeline.predict.inference import sliding_window_predict
from pipeline.predict.model import load_predictor
from pipeline.preprocess.cache import load_cached_case, read_index
from pipeline.train.postprocessing import decide_for_trained_model
from pipeline.train.stage import run_train

from helpers.predict import _options
from helpers.train import _experiment


def test_training_writes_checkpoints_curves_and_a_self_contained_model_folder(prepared, tmp_path):
    cfg = _experiment(prepared, tmp_path, "e")
    report = run_train(cfg)
    out = cfg.stage_dir("train")
    assert report["status"] == "ok" and report["complete"]
    splits = json.loads((out / "splits.json").read_text())["folds"]
    assert len(splits) == 1 and len(splits[0]["val"]) == 1 and len(splits[0]["train"]) == 4
    fold = out / "fold_0"
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "model_best.pt", "progress.png"):
        assert (fold / name).is_file(), name
    assert (fold / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(fold / "checkpoint_last.pt", weights_only=True)  # full state, still safe to load
    assert state["step"] == 12 and {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(state)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fold / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/mean_dice", "val/dice_liver"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/mean_dice")] == [6, 12]

    bundle = load_model_folder(out / "model")
    spec = bundle.spec
    assert spec["mode"] == "3d" and spec["patch_size"] == [32, 32, 16]
    assert spec["class_values"] == [0, 1, 2, 5] and [lbl["name"] for lbl in spec["labels"]] == ["liver", "spleen",
                                                                                             "kidney"]
    assert spec["plan"]["target_spacing"] == [5.0, 5.0, 5.0]
    assert set(spec["folds"][0]["val_dice"]) == {"liver", "spleen", "kidney"}
    assert sorted(p.name for p in (out / "model").rglob("*") if p.is_file()) == [
        "model.json", "model_best.pt", "postprocessing.json", "training_fingerprint.json"]
    # the clean-up decided on the single validation split, said so, with the figures of the training's validation
    decision = read_postprocessing(out / "model", spec)
    assert decision["cases"] == 1 and decision["folds"] == [0] and "single validation split" in decision["source"]
    for name in ("liver", "spleen", "kidney"):
        entry = decision["classes"][name]
        assert entry["cases"] == 1 and entry["dice_without"] == pytest.approx(
            report["cross_validation"]["mean_dice"][name], abs=1e-4)  # the same best network, the same window
        assert entry["dice_with"] >= entry["dice_without"] and entry["smallest_training_component_ml"] > 0
        assert (entry["rule"] is None) == (entry["dice_with"] == entry["dice_without"])
    assert report["postprocessing"]["classes"]["liver"]["dice_without"] == decision["classes"]["liver"]["dice_without"]
    # a model folder trained before the decision existed gets the same one afterwards
    (out / "model" / "postprocessing.json").unlink()
    again = decide_for_trained_model(cfg)
    assert again["classes"] == decision["classes"] and read_postprocessing(out / "model")["cases"] == 1
    # the model folder remembers its training data: every preprocessed case, per label and per input
    remembered = training_fingerprint.read(out / "model")
    assert remembered["cases"] == 5 and set(remembered["labels"]) == {"liver", "spleen", "kidney"}
    for name, entry in remembered["labels"].items():
        assert entry["present_in"] == 5 and len(entry["volume_ml"]["values"]) == 5, name
        assert 0 < entry["volume_ml"]["min"] <= entry["volume_ml"]["max"] and entry["components"]["min"] >= 1
    assert len(remembered["hu_histogram"]["cases"]) == 5 and len(remembered["spacing_mm"]["min"]) == 3
    weights = torch.load(out / "model" / "fold_0" / "model_best.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())  # a bare state_dict

    plan, entries = read_index(cfg.stage_dir("preprocess"))
    image, _, _ = load_cached_case(cfg.stage_dir("preprocess"), entries[0])
    probs = sliding_window_predict(image, load_predictor(out / "model", torch.device("cpu")), _options(),
                                   need_probabilities=True).probabilities
    assert probs.shape == (4, *image.shape)
    np.testing.assert_allclose(probs.sum(0), np.ones(image.shape), atol=1e-5)

    assert run_train(cfg)["status"] == "up_to_date"


def test_resume_continues_exactly(prepared, tmp_path):
    # pinned to the CPU: bit-exact repeats hold there (on CUDA some kernels have no deterministic version)
    deterministic = ["train.deterministic=true", "train.max_steps=8", "train.val_every=8",
                     "train.augment.affine_prob=0.5", "train.device=cpu"]
    whole = _experiment(prepared, tmp_path, "whole", *deterministic)
    run_train(whole)
    halves = _experiment(prepared, tmp_path, "halves", *deterministic, "train.steps_per_run=4")
    first = run_train(halves)
    assert not first["complete"] and first["folds"][0]["step"] == 4
    assert not (halves.stage_dir("train") / "model").exists() and not (halves.stage_dir("train") / "done.json").exists()
    second = run_train(halves, resume=True)
    assert second["complete"] and second["folds"][0]["steps_this_run"] == 4

    a = torch.load(whole.stage_dir("train") / "fold_0" / "checkpoint_last.pt", weights_only=True)
    b = torch.load(halves.stage_dir("train") / "fold_0" / "checkpoint_last.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-6, atol=1e-7)
    assert a["history"]["loss_values"] == pytest.approx(b["history"]["loss_values"], rel=1e-6)
    # on one CPU with deterministic algorithms the two are bit-identical
    assert second["folds"][0]["weights_sha256"] == whole_report_checksum(whole)


@pytest.mark.slow
def test_compiled_training_matches_eager_training_and_saves_plain_weights(prepared, tmp_path):
    """train.compile trains the same function: same losses (to float tolerance), plain state-dict keys."""
    settings = ["train.deterministic=true", "train.max_steps=4", "train.val_every=4", "train.augment.enabled=false",
                "train.device=cpu"]
    eager = _experiment(prepared, tmp_path, "eager", *settings)
    run_train(eager)
    compiled = _experiment(prepared, tmp_path, "compiled", *settings, "train.compile=true")
    run_train(compiled)
    a = torch.load(eager.stage_dir("train") / "fold_0" / "checkpoint_last.pt", weights_only=True)
    b = torch.load(compiled.stage_dir("train") / "fold_0" / "checkpoint_last.pt", weights_only=True)
    assert list(a["model"]) == list(b["model"])  # no "_orig_mod." prefixes: prediction loads them unchanged
    assert b["history"]["loss_values"] == pytest.approx(a["history"]["loss_values"], rel=1e-3, abs=1e-4)
    # (weights are not compared one by one: a bias in front of a batch norm has a zero gradient up to rounding,
    # and Adam turns that rounding noise into full-size steps that differ between the two runs)
    from pipeline.predict.model import load_predictor

    predictor = load_predictor(compiled.stage_dir("train") / "model", torch.device("cpu"))
    assert len(predictor.networks) == 1


def whole_report_checksum(cfg):
    report = json.loads((cfg.stage_dir("train") / "report.json").read_text())
    return report["folds"][0]["weights_sha256"]


def test_two_and_a_half_d_with_two_folds_and_a_deep_supervision_network(prepared, tmp_path):
    cfg = _experiment(prepared, tmp_path, "k2", "train.mode=2d", "train.context_slices=1",
                      "train.patch_size=[32,32]", "train.network=DynUNet", "train.folds=2", "train.batch_size=4",
                      "train.max_steps=6", "train.val_every=6")
    report = run_train(cfg)
    splits = json.loads((cfg.stage_dir("train") / "splits.json").read_text())["folds"]
    val = [c for s in splits for c in s["val"]]
    assert sorted(val) == sorted(set(val)) and len(val) == 5  # every case validated exactly once
    assert report["cross_validation"]["cases"] == 5
    bundle = load_model_folder(cfg.stage_dir("train") / "model")
    assert bundle.spec["mode"] == "2d" and bundle.spec["context_slices"] == 1
    assert bundle.spec["network"]["in_channels"] == 3 and len(bundle.networks) == 2
    assert bundle.spec["network"]["kwargs"]["deep_supervision"] is True
    image = np.random.default_rng(0).random((30, 20, 7), dtype=np.float32)
    probs = sliding_window_predict(image, load_predictor(cfg.stage_dir("train") / "model", torch.device("cpu")),
                                   _options(), need_probabilities=True).probabilities
    assert probs.shape == (4, 30, 20, 7)


def test_folds_can_be_trained_in_parts(prepared, tmp_path):
    cfg = _experiment(prepared, tmp_path, "parts", "train.folds=2", "train.max_steps=2", "train.val_every=2",
                      "train.train_folds=[1]")
    report = run_train(cfg)
    assert report["folds_done"] == [1] and not report["complete"]
    assert [f["fold"] for f in load_model_folder(cfg.stage_dir("train") / "model").spec["folds"]] == [1]
    # no decision while a fold is missing: the model folder predicts without one (and says so)
    assert read_postprocessing(cfg.stage_dir("train") / "model") is None
    assert report["postprocessing"]["decided"] is False and "1 of 2" in report["postprocessing"]["reason"]
    cfg = _experiment(prepared, tmp_path, "parts2", "train.folds=2", "train.max_steps=2", "train.val_every=2")
    shutil.rmtree(cfg.stage_dir("train"), ignore_errors=True)
    shutil.copytree(tmp_path / "parts" / "train", cfg.stage_dir("train"))
    report = run_train(cfg)
    assert report["complete"] and report["folds_done"] == [0, 1]
    assert report["counts"]["resumed"] == 1  # fold 1 was not trained again
    # decided when the last fold finished: on every case, each by the fold that held it out
    decision = read_postprocessing(cfg.stage_dir("train") / "model")
    assert decision["folds"] == [0, 1] and decision["cases"] == 5 and "2-fold cross-validation" in decision["source"]
    assert sorted(decision["case_dice"]) == sorted(report["cross_validation"]["case_dice"])
    for name, entry in decision["classes"].items():
        assert entry["cases"] == 5
        assert entry["dice_without"] == pytest.approx(report["cross_validation"]["mean_dice"][name], abs=1e-4)


def test_learning_reduces_the_loss_and_finds_the_organs(prepared, tmp_path):
    cfg = _experiment(prepared, tmp_path, "learn", "train.max_steps=60", "train.val_every=30",
                      "train.learning_rate=0.01", "train.threads=2")
    report = run_train(cfg)
    history = torch.load(cfg.stage_dir("train") / "fold_0" / "checkpoint_last.pt", weights_only=True)["history"]
    assert history["loss_values"][-1] < 0.7 * history["loss_values"][0]
    assert report["cross_validation"]["mean_dice"]["liver"] > 0.5


@pytest.mark.parametrize("overrides,match", [
    (["train.folds=6"], r"train.folds must be at most the number of labelled training cases \(5\), got 6"),
    (["train.patch_size=[128,128,128]"], r"must fit inside the largest preprocessed image along every axis, got 128 "
                                         r"voxels along axis 0, where the largest image \(case \w+\) has \d+"),
    (["train.patch_size=[30,30,16]"], "must be divisible by 4"),
    (["train.patch_size=[32,32]"], "must be 3 positive sizes in 3d mode"),
    (["train.context_slices=2"], "context_slices must be 0 in 3d mode"),
    (["train.train_folds=[3]"], "train_folds must hold fold numbers 0..0"),
    (["train.augment.flip_axes=[4]"], "flip_axes must hold axes 0, 1 or 2"),
])
def test_bad_settings_fail_before_training(prepared, tmp_path, overrides, match):
    cfg = _experiment(prepared, tmp_path, "bad", *overrides)
    with pytest.raises(ConfigError, match=match):
        run_train(cfg)
    assert not (cfg.stage_dir("train") / "fold_0" / "checkpoint_last.pt").exists()


def test_dice_per_class_counts_overlap_and_reports_absent_classes_as_nan():
    reference = np.zeros((4, 4, 4), dtype=np.uint8)
    reference[:2] = 1
    prediction = np.zeros_like(reference)
    prediction[:1] = 1
    scores = dice_per_class(prediction, reference, 3)
    assert scores[0] == pytest.approx(2 * 16 / (16 + 32))
    assert np.isnan(scores[1])


def test_planned_patch_is_capped_to_the_largest_cached_image(tmp_path):
    # the plan estimates shapes before resampling; a cached image may come out one voxel smaller than the
    # planned patch, which must then shrink to fit instead of refusing the user's default (null) patch
    from pipeline.preprocess import cache
    from pipeline.train.stage import resolve_setup

    entries = []
    for case, shape in (("a", [40, 30, 55]), ("b", [36, 28, 50])):
        paths = cache.case_paths(tmp_path, case)
        paths["meta"].parent.mkdir(parents=True, exist_ok=True)
        cache.write_meta(paths["meta"], {"id": case, "grid": {"shape": shape}})
        entries.append({"id": case, **{k: str(p.relative_to(tmp_path)) for k, p in paths.items()}})
    plan = {"class_values": [0, 1], "configurations": {"3d": {"patch_size": [32, 24, 56], "batch_size": 2}}}
    cfg = load_config([], ["train.channels=[8,16,32,64]"])
    sampling, _, _ = resolve_setup(cfg, plan, tmp_path, entries)
    assert sampling.patch_size == [32, 24, 48]  # 55 rounded down to the network's 8-voxel unit
    explicit = load_config([], ["train.channels=[8,16,32,64]", "train.patch_size=[32,24,56]"])
    with pytest.raises(ConfigError, match="must fit inside the largest"):
        resolve_setup(explicit, plan, tmp_path, entries)
