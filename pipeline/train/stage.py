"""The train stage: splits, one training per fold, and the self-contained model folder.

Output folder (``<experiment>/train``)::

    splits.json                  the seeded train/validation case lists of every fold
    fold_<k>/checkpoint_last.pt  full training state (resume); checkpoint_best.pt at the best validation
    fold_<k>/model_best.pt       the best weights alone (state_dict)
    fold_<k>/tensorboard/        TensorBoard scalars; fold_<k>/progress.png: loss and Dice curves
    model/                       model.json + fold_<k>/model_best.pt: everything prediction needs,
                                 training_fingerprint.json: what the training data looked like, and
                                 postprocessing.json: the clean-up decided on the cross-validation
                                 (pipeline.train.postprocessing; once every fold is finished)

Under ``torchrun`` every rank trains (DDP, rank-sharded patches) and only rank 0 writes files; the
ranks must see the same preprocess and train folders (one machine, or a shared file system).
"""
from __future__ import annotations

import datetime as _dt
import logging
import shutil
from pathlib import Path

import numpy as np

from pipeline import atomic, training_fingerprint
from pipeline.config import Config, section_hash, to_dict
from pipeline.errors import ConfigError, InputError
from pipeline.labels.codes import codes_json
from pipeline.models import network_spec
from pipeline.models.folder import write_model_json, write_postprocessing
from pipeline.preprocess.cache import cached_shape, load_cached_case, read_index
from pipeline.stage import StageRun, reset_folder, upstream_hash
from pipeline.train.budget import (
    UNTIMED_STEPS,
    WARMUP_MAX_STEPS,
    check_budget_options,
    measure_rate,
    plan_steps,
    read_step_plan,
    resolved_options,
    warmup_seconds,
    write_step_plan,
)
from pipeline.train.data import SamplingSpec, build_augmentation, check_patch_fits, derived_seed, prepare_case
from pipeline.train.loop import FoldJob, FoldTrainer
from pipeline.train.options import TrainConfig
from pipeline.train.postprocessing import cv_postprocessing
from pipeline.train.postprocessing import summary as cv_summary
from pipeline.train.runtime import Runtime, barrier, broadcast_object, setup_runtime, teardown_runtime
from pipeline.train.splits import make_splits

log = logging.getLogger("ctseg")

# how or when, not what, is trained (the memory layout changes float rounding only, as threads and compile do)
RUNTIME_ONLY = ("steps_per_run", "loader_workers", "threads", "train_folds", "compile", "channels_last",
                "ddp_timeout_minutes", "checkpoint_minutes")


# options added after models were trained: hashed only away from their default, so that a model trained before
# the option existed (which trained exactly as the default does) is still found by its hash
HASHED_UNLESS_DEFAULT = ("batch_dice", "dice_include_background")


def train_hash(cfg: Config) -> str:
    defaults = to_dict(TrainConfig())
    options = {k: v for k, v in to_dict(cfg.train).items()
               if k not in RUNTIME_ONLY and not (k in HASHED_UNLESS_DEFAULT and v == defaults[k])}
    if cfg.train.max_steps != "auto":
        options.pop("time_budget_minutes")  # used only to plan max_steps: auto
    return section_hash(options, {"seed": cfg.seed}, upstream_hash(cfg.stage_dir("preprocess"), "preprocess"))


def run_train(cfg: Config, force: bool = False, resume: bool = False) -> dict:
    """Train every requested fold on the preprocess folder's cached cases; write the model folder."""
    stage_hash = train_hash(cfg)
    runtime = setup_runtime(cfg.train)
    try:
        return _run(cfg, stage_hash, runtime, force, resume)
    finally:
        teardown_runtime(runtime)


def _run(cfg: Config, stage_hash: str, runtime: Runtime, force: bool, resume: bool) -> dict:
    options = cfg.train
    out = cfg.stage_dir("train")
    pre_dir = cfg.stage_dir("preprocess")
    run = None
    if runtime.is_main:
        if force:
            reset_folder(out)
        run = StageRun.open("train", out, stage_hash, force=force, device=str(runtime.device))
    if broadcast_object(runtime, run.skipped_up_to_date if run else None):
        log.info("train: %s is up to date; nothing to do", out)
        return {"stage": "train", "status": "up_to_date", "folder": str(out)}

    plan, entries = read_index(pre_dir)
    sampling, batch_size, spec = resolve_setup(cfg, plan, pre_dir, entries, runtime.device.type)
    by_id = {e["id"]: e for e in entries}
    splits = make_splits(list(by_id), options.folds, options.validation_fraction, cfg.seed)
    folds = options.train_folds if options.train_folds is not None else list(range(len(splits)))
    bad = [f for f in folds if not 0 <= f < len(splits)]
    if bad:
        raise ConfigError(f"train.train_folds must hold fold numbers 0..{len(splits) - 1}, got {bad}.")
    if options.checkpoint_minutes < 0:
        raise ConfigError(f"train.checkpoint_minutes must be 0 (only at validations) or more, got "
                          f"{options.checkpoint_minutes}.")
    if resume:
        check_resumable(out, len(splits), run)
    if runtime.is_main:
        atomic.write_json(out / "splits.json", {"seed": cfg.seed, "folds": splits})
    class_names = [label["name"] for label in plan["labels"]]
    log.info("train: %s %s, patch %s × %d, %d fold(s), %s on %s%s", options.network, options.mode,
             sampling.patch_size, batch_size, len(folds), runtime.precision, runtime.device,
             f", {runtime.world_size} processes" if runtime.distributed else "")

    arrays: dict[str, tuple] = {}
    prepared: dict = {}

    def fold_job(fold: int, fold_options: TrainConfig) -> FoldJob:
        split = splits[fold]
        for case_id in split["train"] + split["val"]:
            if case_id not in arrays:
                image, label, _ = load_cached_case(pre_dir, by_id[case_id])
                check_finite(case_id, image)
                arrays[case_id] = (image, label)
        for case_id in split["train"]:
            if case_id not in prepared:
                prepared[case_id] = prepare_case(case_id, *arrays[case_id], sampling,
                                                 derived_seed(cfg.seed, "centres", case_id),
                                                 len(plan["class_values"]))
        return FoldJob(fold=fold, folder=out / f"fold_{fold}", options=fold_options, seed=cfg.seed,
                       stage_hash=stage_hash, network_spec=spec, sampling=sampling, batch_size=batch_size,
                       class_names=class_names, train_cases=[prepared[c] for c in split["train"]],
                       val_cases=[(c, *arrays[c]) for c in split["val"]], resume=resume,
                       intensity=plan.get("intensity"))

    step_plan = None
    if options.max_steps == "auto":
        step_plan = broadcast_object(runtime, read_step_plan(out, stage_hash) if runtime.is_main else None)
        if step_plan is None:
            step_plan = measure_step_plan(options, fold_job(folds[0] if folds else 0, options), runtime, stage_hash)
            if runtime.is_main:
                write_step_plan(out, step_plan)
        else:
            log.info("train: reusing the step plan of an earlier run (%s): %d steps per fold",
                     out / "step_plan.json", step_plan["max_steps"])
    options = resolved_options(options, step_plan)

    results = []
    for fold in range(len(splits)):
        name = f"fold_{fold}"
        if broadcast_object(runtime, run.is_case_done(name) if run else None):
            if run:
                with run.case(name):
                    pass
                results.append(run.records[name].extra["result"])
            continue
        if fold not in folds:
            continue
        split = splits[fold]
        job = fold_job(fold, options)
        result = FoldTrainer(job, runtime).run()
        results.append(result)
        if run and result["complete"]:
            with run.case(name, {"train": split["train"], "val": split["val"]}) as record:
                record.outputs = {"checkpoint": str(out / name / "checkpoint_last.pt"),
                                  "weights": str(out / name / "model_best.pt")}
                record.extra["result"] = result
        if not result["complete"]:
            log.info("train fold %d: stopped at step %d of %d (steps_per_run); continue with --resume",
                     fold, result["step"], options.max_steps)
    barrier(runtime)
    finished = [r for r in results if r["complete"]]
    complete = len(finished) == len(splits)  # done.json only when every fold is trained
    if not runtime.is_main:
        return {"stage": "train", "rank": runtime.rank, "complete": complete, "folds": results}

    run.extra.update({
        "runtime": {"device": str(runtime.device), "precision": runtime.precision,
                    "precision_reason": runtime.precision_reason,
                    "channels_last": runtime.channels_last, "world_size": runtime.world_size,
                    "loader_workers": runtime.loader_workers, "pin_memory": runtime.pin_memory,
                    # bit-exact repeats hold on the CPU; on CUDA see each fold's nondeterministic_ops
                    "deterministic": options.deterministic,
                    "exact_repeats": options.deterministic and runtime.device.type == "cpu"},
        "sampling": {"mode": sampling.mode, "patch_size": sampling.patch_size, "batch_size": batch_size,
                     "context_slices": sampling.context_slices},
        "network": spec, "max_steps": options.max_steps, "val_every": options.val_every, "step_plan": step_plan,
        "folds": results, "cross_validation": cross_validation(finished, class_names),
        "complete": complete, "folds_done": sorted(r["fold"] for r in finished), "folds_total": len(splits),
    })
    if finished and len(finished) == len(results):  # no fold is waiting for --resume
        decision = decide_postprocessing(cfg, runtime, splits, sampling, batch_size, spec, complete)
        model_dir = write_model_folder(out, spec, sampling, plan, finished, cfg, stage_hash,
                                       precision={"used": runtime.precision, "reason": runtime.precision_reason},
                                       steps={"max_steps": options.max_steps, "step_plan": step_plan},
                                       postprocessing=decision)
        run.extra["model"] = str(model_dir)
        run.extra["postprocessing"] = cv_summary(decision) or {
            "decided": False, "reason": f"decided when every fold is finished ({len(finished)} of {len(splits)})"}
    if not complete:
        log.info("train: %d of %d folds done; train the others with train.train_folds (or run again)",
                 len(finished), len(splits))
    report = run.finish(complete=complete)
    return report


def measure_step_plan(options: TrainConfig, job: FoldJob, runtime: Runtime, stage_hash: str) -> dict:
    """max_steps auto: time a few steps and one validation of ``job``'s fold on a throwaway network, then plan."""
    import dataclasses

    from pipeline.train.data import PatchDataset

    warm = dataclasses.replace(options, max_steps=UNTIMED_STEPS + WARMUP_MAX_STEPS, val_every=10 ** 9)
    job = dataclasses.replace(job, options=warm, resume=False)
    trainer = FoldTrainer(job, runtime)
    dataset = PatchDataset(job.train_cases, job.sampling, warm, job.seed, job.fold, runtime.rank)
    log.info("train: max_steps auto: measuring the step rate on %s (about %.0f s)", runtime.device,
             warmup_seconds(options) + 5)
    measured = broadcast_object(runtime, measure_rate(trainer, dataset, job.batch_size, runtime, job.val_cases,
                                                      warmup_seconds(options)))
    del trainer
    step_plan = plan_steps(options, measured, stage_hash, str(runtime.device))
    log.info("train: planned %d steps per fold (validation every %d) for %.4g min per fold: %.2f steps/s, "
             "%.1f s per validation", step_plan["max_steps"], step_plan["val_every"], options.time_budget_minutes,
             step_plan["steps_per_second"], step_plan["validation_seconds"])
    return step_plan


def check_finite(case_id: str, image: np.ndarray) -> None:
    """Refuse a cached training image with NaN or infinite voxels (they would poison every step's loss)."""
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        raise InputError(f"preprocessed case {case_id} must hold finite intensities, got {bad} NaN or infinite "
                         f"voxel(s). Fix or drop that case's source volume and re-run 'ctseg ingest' and "
                         f"'ctseg preprocess'.")


def check_resumable(out: Path, n_folds: int, run) -> None:
    """``--resume`` needs something to continue: a fold's checkpoint or a finished fold; else say so."""
    checkpoints = [out / f"fold_{k}" / "checkpoint_last.pt" for k in range(n_folds)]
    finished = run is not None and any(run.is_case_done(f"fold_{k}") for k in range(n_folds))
    if not finished and not any(path.is_file() for path in checkpoints):
        raise ConfigError(f"train --resume must continue a checkpoint, got none in {out} (no "
                          f"fold_<k>/checkpoint_last.pt). Start the training with a plain 'ctseg train'.")


def resolve_setup(cfg: Config, plan: dict, pre_dir: Path, entries: list[dict],
                  device_type: str = "cuda") -> tuple[SamplingSpec, int, dict]:
    """Sampling (mode, patch, context), batch size and network spec; config errors before any training.

    Patch and batch left null come from the preprocess plan: its CPU configuration when training on the CPU.
    """
    options = cfg.train
    dims = 2 if options.mode == "2d" else 3
    if options.mode == "3d" and options.context_slices:
        raise ConfigError(f"train.context_slices must be 0 in 3d mode, got {options.context_slices}. "
                          f"Neighbouring slices as channels (2.5D) need train.mode=2d.")
    if options.context_slices < 0:
        raise ConfigError(f"train.context_slices must be 0 or more, got {options.context_slices}.")
    planned = plan["configurations"][options.mode]
    if device_type == "cpu" and "cpu" in planned:  # plans before the CPU configuration have one for all devices
        planned = planned["cpu"]
    patch = list(options.patch_size) if options.patch_size is not None else list(planned["patch_size"])
    if len(patch) != dims or any(int(p) < 1 for p in patch):
        raise ConfigError(f"train.patch_size must be {dims} positive sizes in {options.mode} mode, got {patch}.")
    batch_size = options.batch_size if options.batch_size is not None else int(planned["batch_size"])
    if batch_size < 1:
        raise ConfigError(f"train.batch_size must be at least 1, got {batch_size}.")
    check_budget_options(options)
    shapes = {entry["id"]: cached_shape(pre_dir, entry) for entry in entries}
    if options.patch_size is None:
        # the plan sizes the patch from shapes estimated before resampling; an image can come out a voxel
        # smaller, so a planned patch is capped at the largest cached image (in whole downsampling units)
        unit = 2 ** (len(options.channels) - 1)
        largest = [max(shape[axis] for shape in shapes.values()) for axis in range(dims)]
        capped = [min(int(p), max(unit, size // unit * unit)) for p, size in zip(patch, largest)]
        if capped != [int(p) for p in patch]:
            log.info("train: planned patch %s capped to %s to fit the largest preprocessed image %s",
                     patch, capped, largest)
        patch = capped
    sampling = SamplingSpec(options.mode, [int(p) for p in patch], options.context_slices)
    check_patch_fits(sampling, shapes)
    build_augmentation(sampling, options)  # checks the augmentation settings now, not at the first step
    spec = network_spec(options.network, dims, 2 * options.context_slices + 1, len(plan["class_values"]),
                        options.channels, sampling.patch_size, norm=options.norm,
                        num_res_units=options.num_res_units, dropout=options.dropout,
                        deep_supervision=options.deep_supervision)
    return sampling, batch_size, spec


def cross_validation(results: list[dict], class_names: list[str]) -> dict:
    """Mean Dice per class over every validation case (each case in the fold that held it out)."""
    cases = {case: scores for r in results for case, scores in r.get("val_cases", {}).items()}
    per_class = {}
    for name in class_names:
        values = [s[name] for s in cases.values() if s.get(name) is not None and not np.isnan(s[name])]
        per_class[name] = round(float(np.mean(values)), 4) if values else None
    present = [v for v in per_class.values() if v is not None]
    return {"cases": len(cases), "mean_dice": per_class,
            "mean_foreground_dice": round(float(np.mean(present)), 4) if present else None,
            "case_dice": cases}


def decide_postprocessing(cfg: Config, runtime: Runtime, splits: list[dict], sampling: SamplingSpec,
                          batch_size: int, spec: dict, complete: bool) -> dict | None:
    """The postprocessing decision (pipeline.train.postprocessing) once every fold is finished, else None."""
    if not complete:
        return None
    return cv_postprocessing(cfg, runtime, splits, sampling, batch_size, spec)


def write_model_folder(out: Path, spec: dict, sampling: SamplingSpec, plan: dict, results: list[dict],
                       cfg: Config, stage_hash: str, precision: dict | None = None,
                       steps: dict | None = None, postprocessing: dict | None = None) -> Path:
    """model/: each fold's best weights, postprocessing.json when decided, and model.json (written last: its
    presence means complete)."""
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    folds = []
    for result in sorted(results, key=lambda r: r["fold"]):
        relative = f"fold_{result['fold']}/model_best.pt"
        source = out / f"fold_{result['fold']}" / "model_best.pt"
        with atomic.atomic_path(model_dir / relative) as tmp:
            shutil.copyfile(source, tmp)
        folds.append({"fold": result["fold"], "checkpoint": relative, "val_dice": result["best_dice"],
                      "best_step": result["best_step"]})
    training_fingerprint.write_for_training(model_dir, cfg.stage_dir("preprocess"), cfg.stage_dir("ingest"),
                                            plan["labels"], cfg.preprocess.body_threshold_hu)
    if postprocessing is not None:
        write_postprocessing(model_dir, postprocessing)
    write_model_json(model_dir, {
        "network": spec,
        "mode": sampling.mode,
        "context_slices": sampling.context_slices,
        "patch_size": sampling.patch_size,
        "plan": plan,
        "labels": [{"name": lbl["name"], "value": lbl["value"], "color": lbl["color"], **codes_json(lbl)}
                   for lbl in plan["labels"]],
        "class_values": plan["class_values"],
        "folds": folds,
        "training": {"max_steps": (steps or {}).get("max_steps", cfg.train.max_steps),
                     "step_plan": (steps or {}).get("step_plan"), "seed": cfg.seed, "stage_hash": stage_hash,
                     "precision": precision,
                     "created": _dt.datetime.now().isoformat(timespec="seconds")},
    })
    return model_dir
