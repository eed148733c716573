"""The step planner: ``train.max_steps: auto`` measured against ``train.time_budget_minutes`` (``step_plan.json``).

With ``max_steps: auto`` the train stage runs a short warm-up before the first fold: the planned
network, patch, batch, precision and data pipeline of this run, on this machine, for a few timed
optimisation steps (after untimed ones that pay for allocation and any compilation), plus one
validation pass over the largest validation case. From the measured seconds per step and per
validation it fixes the steps per fold so that training and its validations fit the budget::

    steps * step_seconds + validations * validation_seconds <= time_budget_minutes * 60

``val_every: auto`` spreads ``VALIDATIONS_PER_FOLD`` validations over the fold. The budget is **per
fold** (a 5-fold cross-validation with a 30-minute budget therefore takes about 2.5 hours): folds can be
trained in parts or on different machines (``train.train_folds``), and each one gets the same step count.

The plan is written to ``<train>/step_plan.json`` with the rate it came from and the machine, and copied
into ``model.json`` (``training.step_plan``). A rerun of the same configuration (``--resume``, the
remaining folds, or a stage found up to date) reuses it, so every fold and every rerun trains the same
number of steps, whatever the load of the machine at the time; ``--force`` measures again. The warm-up
itself is not counted in the budget; its seconds are recorded.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from pipeline import atomic
from pipeline.errors import ConfigError
from pipeline.precision import cpu_model_name
from pipeline.train.options import TrainConfig

log = logging.getLogger("ctseg")

STEP_PLAN_FORMAT = "ctseg-step-plan/1"
VALIDATIONS_PER_FOLD = 10     # val_every: auto
MIN_STEPS = 20                # a budget that allows fewer is refused rather than training a useless model
UNTIMED_STEPS = 2             # allocation, autotuning, torch.compile
WARMUP_SECONDS = 20.0         # timed warm-up, at most (and at most 5 % of the budget)
WARMUP_MAX_STEPS = 60
WARMUP_MIN_STEPS = 3


def check_budget_options(options: TrainConfig) -> None:
    """Config errors before anything runs."""
    if options.max_steps == "auto" and not options.time_budget_minutes > 0:
        raise ConfigError(f"train.time_budget_minutes must be a positive number of minutes per fold when "
                          f"train.max_steps is auto, got {options.time_budget_minutes}. Set a budget, or set "
                          f"train.max_steps to a number of steps.")
    for key in ("max_steps", "val_every"):
        value = getattr(options, key)
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"train.{key} must be auto or at least 1, got {value!r}.")


def read_step_plan(out: Path, stage_hash: str) -> dict | None:
    """The plan an earlier run of this configuration made, or None (absent, other configuration, unreadable)."""
    path = out / "step_plan.json"
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("train: %s is unreadable; measuring the step rate again", path)
        return None
    if plan.get("format") != STEP_PLAN_FORMAT or plan.get("stage_hash") != stage_hash:
        return None
    return plan


def resolved_options(options: TrainConfig, plan: dict | None) -> TrainConfig:
    """The train options with max_steps and val_every as numbers: from the step plan where max_steps is auto,
    ``VALIDATIONS_PER_FOLD`` validations where only val_every is."""
    if plan is not None:
        return dataclasses.replace(options, max_steps=int(plan["max_steps"]), val_every=int(plan["val_every"]))
    if options.max_steps == "auto":
        raise ValueError("max_steps auto needs a step plan")  # programming error: plan_steps runs first
    if options.val_every == "auto":
        return dataclasses.replace(options, val_every=max(1, math.ceil(int(options.max_steps) / VALIDATIONS_PER_FOLD)))
    return options


def steps_for_budget(budget_seconds: float, step_seconds: float, validation_seconds: float,
                     val_every: int | str) -> tuple[int, int]:
    """(max_steps, val_every) that fit ``budget_seconds`` of training and validation."""
    if val_every == "auto":
        steps = math.floor((budget_seconds - VALIDATIONS_PER_FOLD * validation_seconds) / step_seconds)
        return steps, max(1, math.ceil(steps / VALIDATIONS_PER_FOLD))
    every = int(val_every)
    # ceil(steps / every) validations, one of them at the last step
    steps = math.floor((budget_seconds - validation_seconds) / (step_seconds + validation_seconds / every))
    return steps, every


def warmup_seconds(options: TrainConfig) -> float:
    """How long the timed warm-up runs: at most WARMUP_SECONDS and 5 % of the budget."""
    return min(WARMUP_SECONDS, 0.05 * float(options.time_budget_minutes) * 60.0)


def plan_steps(options: TrainConfig, measured: dict, stage_hash: str, device: str) -> dict:
    """The step plan for ``options`` (max_steps auto) from the warm-up's ``measured`` rates."""
    budget = float(options.time_budget_minutes) * 60.0
    steps, every = steps_for_budget(budget, measured["step_seconds"], measured["validation_seconds"],
                                    options.val_every)
    if steps < MIN_STEPS:
        raise ConfigError(
            f"train.time_budget_minutes must allow at least {MIN_STEPS} steps per fold, got "
            f"{options.time_budget_minutes} min for {max(steps, 0)} step(s) at {measured['step_seconds']:.2f} s "
            f"per step and {measured['validation_seconds']:.1f} s per validation on {device}. Raise the budget, "
            f"or use a smaller network, patch or batch.")
    return {"format": STEP_PLAN_FORMAT, "stage_hash": stage_hash, "max_steps": int(steps), "val_every": int(every),
            "time_budget_minutes": options.time_budget_minutes, "budget_scope": "per fold",
            "steps_per_second": round(1.0 / measured["step_seconds"], 3), **measured,
            "planned_seconds_per_fold": round(steps * measured["step_seconds"]
                                              + math.ceil(steps / every) * measured["validation_seconds"], 1),
            "device": device, "cpu": cpu_model_name(),
            "torch_threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_step_plan(out: Path, plan: dict) -> None:
    atomic.write_json(out / "step_plan.json", plan)


def measure_rate(trainer, dataset, batch_size: int, runtime, val_cases: list, timed_seconds: float) -> dict:
    """Seconds per training step (data included) and per validation of ``val_cases``, on a throwaway trainer.

    Under torchrun every rank takes the same fixed number of steps (their collectives must match);
    elsewhere the timed steps stop after ``timed_seconds``.
    """
    from pipeline.train.data import batches

    def sync():
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)

    began = time.perf_counter()
    total = UNTIMED_STEPS + (10 if runtime.distributed else WARMUP_MAX_STEPS)
    timed, start = 0, None
    for step, images, labels in batches(dataset, 1, total, batch_size, runtime.loader_workers,
                                        pin_memory=runtime.pin_memory):
        trainer.train_step(images, labels)
        if step == UNTIMED_STEPS:
            sync()
            start = time.perf_counter()
        elif step > UNTIMED_STEPS:
            timed += 1
            if not runtime.distributed and timed >= WARMUP_MIN_STEPS:
                sync()
                if time.perf_counter() - start >= timed_seconds:
                    break
    sync()
    step_seconds = (time.perf_counter() - start) / max(1, timed)
    validation_seconds = 0.0
    if val_cases:
        # the largest validation case, scaled to all of them by voxel count
        largest = max(val_cases, key=lambda case: case[1].size)
        trainer.job = dataclasses.replace(trainer.job, val_cases=[largest])
        mark = time.perf_counter()
        trainer.validate()
        sync()
        per_voxel = (time.perf_counter() - mark) / largest[1].size
        validation_seconds = per_voxel * sum(case[1].size for case in val_cases)
    return {"step_seconds": round(step_seconds, 5), "timed_steps": timed,
            "validation_seconds": round(validation_seconds, 3),
            "warmup_seconds": round(time.perf_counter() - began, 1)}
