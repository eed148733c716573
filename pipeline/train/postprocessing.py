"""The train stage's postprocessing decision: every fold's best network on its own held-out cases, then the rules.

Called by the train stage once every fold is finished (a cross-validation trained in parts with
``train.train_folds`` is decided when its last fold finishes, and decided again whenever a rerun finishes
folds). Each fold's ``model_best.pt`` (the weights the model folder ships) segments that fold's validation
cases on the model grid, with the training validation's sliding window (``train.val_overlap``); the argmax is
compared with the cached reference labels and :func:`pipeline.postprocessing.decide` keeps, per class, the rule
that raises the class's mean Dice over all those cases. With ``train.folds = 1`` the cases are the single
validation split, and the decision says so. Candidate thresholds come from the smallest connected component of
each class in the cached training labels (all cases: the same labels the final model folder is trained from).
"""
from __future__ import annotations

import datetime as _dt
import logging
import time

import numpy as np
import torch

from pipeline import postprocessing
from pipeline.config import Config
from pipeline.models import build_network
from pipeline.preprocess.cache import load_cached_case, read_index
from pipeline.train.data import SamplingSpec
from pipeline.train.loop import FoldJob, ValidationWindow
from pipeline.train.runtime import Runtime

log = logging.getLogger("ctseg")


def cv_postprocessing(cfg: Config, runtime: Runtime, splits: list[dict], sampling: SamplingSpec, batch_size: int,
                      spec: dict) -> dict:
    """The decision document for ``postprocessing.json`` (see module docstring); ``spec``: the network spec."""
    began = time.perf_counter()
    out, pre_dir = cfg.stage_dir("train"), cfg.stage_dir("preprocess")
    plan, entries = read_index(pre_dir)
    by_id = {entry["id"]: entry for entry in entries}
    names = {channel: label["name"] for channel, label in enumerate(plan["labels"], start=1)}
    voxel_ml = float(np.prod(plan["target_spacing"])) / 1000.0
    cases: dict[str, dict[int, postprocessing.ClassComponents]] = {}
    channels_last = runtime.memory_format(sampling.spatial_dims) != torch.contiguous_format
    for split in splits:
        fold = int(split["fold"])
        network = build_network(spec)
        network.load_state_dict(torch.load(out / f"fold_{fold}" / "model_best.pt", map_location="cpu",
                                           weights_only=True))
        memory_format = torch.channels_last_3d if sampling.spatial_dims == 3 else torch.channels_last
        network = network.to(runtime.device, memory_format=memory_format if channels_last else
                             torch.contiguous_format).eval()
        # the validation's own sliding window (the predict stage's), in training's precision and layout
        job = FoldJob(fold=fold, folder=out / f"fold_{fold}", options=cfg.train, seed=cfg.seed, stage_hash="cv",
                      network_spec=spec, sampling=sampling, batch_size=batch_size, class_names=list(names.values()),
                      train_cases=[], val_cases=[], resume=False, intensity=plan.get("intensity"))
        window = ValidationWindow.for_job(network, job, runtime, channels_last)
        for case_id in split["val"]:
            image, label, _ = load_cached_case(pre_dir, by_id[case_id])
            prediction = window.labels(image)
            cases[case_id] = postprocessing.class_components(prediction, label, list(names))
        del network
    training_labels = (load_cached_case(pre_dir, entry)[1] for entry in entries)  # one at a time
    smallest = postprocessing.smallest_component_ml(training_labels, list(names), voxel_ml)
    decision = postprocessing.decide(cases, names, voxel_ml, smallest)
    folds = len(splits)
    decision.update({
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "source": (f"{folds}-fold cross-validation: each fold's best network (model_best.pt) on the cases it held out"
                   if folds > 1 else "a single validation split (train.folds = 1): the best network on the "
                   f"{len(cases)} validation case(s), not a cross-validation"),
        "folds": [int(split["fold"]) for split in splits],
        "grid": {"name": "model grid", "target_spacing_mm": [float(s) for s in plan["target_spacing"]]},
        "sliding_window_overlap": float(cfg.train.val_overlap),
        "precision": runtime.precision,
        "rule": "nnU-Net's: per class, the candidate rule with the highest mean Dice is kept only if it raises the "
                "class's mean Dice over these cases; removing a class's components changes no other class's Dice. "
                "Candidates: keep the largest component; remove components under "
                f"{', '.join(f'{f:g}' for f in postprocessing.THRESHOLD_FRACTIONS)} x the class's smallest training "
                "component. Dice is 1 where a class is absent from both reference and prediction.",
        "seconds": round(time.perf_counter() - began, 2),
    })
    for name, entry in decision["classes"].items():
        log.info("train: postprocessing for %s: %s", name, entry["reason"])
    return decision


def summary(decision: dict | None) -> dict | None:
    """What the train report keeps of the decision (the figures, without the per-case table)."""
    if decision is None:
        return None
    return {"decided": True, "source": decision["source"], "cases": decision["cases"],
            "seconds": decision.get("seconds"),
            "mean_foreground_dice_without": decision["mean_foreground_dice_without"],
            "mean_foreground_dice_with": decision["mean_foreground_dice_with"],
            "classes": {name: {k: entry[k] for k in ("rule", "dice_without", "dice_with", "cases", "reason")}
                        for name, entry in decision["classes"].items()}}


def decide_for_trained_model(cfg: Config) -> dict:
    """Decide and write ``postprocessing.json`` for a finished training of ``cfg`` whose model folder has none
    (trained before ctseg decided postprocessing); the train stage itself does this when its last fold finishes."""
    import json

    from pipeline.errors import ConfigError
    from pipeline.models.folder import read_model_spec, write_postprocessing
    from pipeline.train.runtime import setup_runtime, teardown_runtime

    out = cfg.stage_dir("train")
    report = json.loads((out / "report.json").read_text(encoding="utf-8")) if (out / "report.json").is_file() else {}
    if not report.get("complete"):
        raise ConfigError(f"postprocessing is decided on a finished training, got {out} with folds still to train "
                          f"(or no report.json). Finish it with 'ctseg train' first.")
    spec = read_model_spec(out / "model")
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))["folds"]
    sampling = SamplingSpec(spec["mode"], [int(p) for p in spec["patch_size"]], int(spec.get("context_slices", 0)))
    runtime = setup_runtime(cfg.train)
    try:
        decision = cv_postprocessing(cfg, runtime, splits, sampling, int(report["sampling"]["batch_size"]),
                                     spec["network"])
    finally:
        teardown_runtime(runtime)
    write_postprocessing(out / "model", decision)
    return decision
