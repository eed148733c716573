"""The step planner (max_steps auto): the planned steps fit the time budget here, are recorded, and are reused."""
from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.train import budget
from pipeline.train.stage import run_train

from helpers.train import TINY, _experiment


def test_steps_for_budget_counts_validations():
    # 60 s, 0.1 s per step, 2 s per validation, 10 validations: (60 - 20) / 0.1 = 400 steps, every 40
    assert budget.steps_for_budget(60.0, 0.1, 2.0, "auto") == (400, 40)
    # a fixed val_every: steps * 0.1 + ceil(steps / 50) * 2 <= 60
    steps, every = budget.steps_for_budget(60.0, 0.1, 2.0, 50)
    assert every == 50 and steps * 0.1 + -(-steps // every) * 2.0 <= 60.0 + 1e-9 and steps >= 400


def test_budget_too_small_for_the_network_is_refused_with_the_figures():
    options = load_config([], ["train.time_budget_minutes=0.01"]).train
    with pytest.raises(ConfigError, match="time_budget_minutes must allow at least 20 steps"):
        budget.plan_steps(options, {"step_seconds": 0.5, "validation_seconds": 0.1, "timed_steps": 3,
                                    "warmup_seconds": 1.0}, "h", "cpu")


def test_auto_needs_a_positive_budget(prepared, tmp_path):
    cfg = _experiment(prepared, tmp_path, "nobudget", "train.max_steps=auto", "train.time_budget_minutes=0")
    with pytest.raises(ConfigError, match="time_budget_minutes must be a positive number"):
        run_train(cfg)


@pytest.mark.slow  # about 30 s: two trainings that fill a 24-second budget
def test_planned_steps_fit_the_budget_and_are_reused_on_rerun(prepared, tmp_path):
    # 0.4 min = 24 s per fold on this machine; the timed warm-up is 5 % of it (1.2 s) after 2 untimed steps
    settings = ("train.max_steps=auto", "train.time_budget_minutes=0.4", "train.val_every=auto")
    cfg = _experiment(prepared, tmp_path, "budget", *settings, "train.steps_per_run=5")
    first = run_train(cfg)
    out = cfg.stage_dir("train")
    plan = json.loads((out / "step_plan.json").read_text())
    assert plan["format"] == budget.STEP_PLAN_FORMAT and plan["budget_scope"] == "per fold"
    assert plan["max_steps"] >= budget.MIN_STEPS and plan["val_every"] == -(-plan["max_steps"] // 10)
    assert plan["timed_steps"] >= budget.WARMUP_MIN_STEPS and plan["steps_per_second"] > 0
    assert first["max_steps"] == plan["max_steps"] and not first["complete"]

    # the rerun continues with the same plan (no new warm-up), whatever the load is now
    again = load_config([], [f"output_root={tmp_path}", "experiment=budget", *TINY, *settings])
    second = run_train(again, resume=True)
    assert json.loads((out / "step_plan.json").read_text()) == plan
    assert second["complete"] and second["max_steps"] == plan["max_steps"]
    fold = second["folds"][0]
    assert fold["step"] == plan["max_steps"]
    # training + validations of the rerun's steps, scaled to the whole fold, fit the budget within ±25 %
    per_step = fold["seconds"] / fold["steps_this_run"]
    whole_fold = per_step * plan["max_steps"]
    assert 0.75 * 24.0 <= whole_fold <= 1.25 * 24.0, (whole_fold, plan)

    model = json.loads((out / "model" / "model.json").read_text())
    assert model["training"]["max_steps"] == plan["max_steps"]
    assert model["training"]["step_plan"]["steps_per_second"] == plan["steps_per_second"]
