"""Time to quality: training wall time until a mean validation Dice of 0.90 on the demo phantoms, three ways.

    python bench/train.py [--cap-minutes 20] [--val-seconds 45] [--quick]     (the default mode of bench/train.py)

Same data for every variant: the phantoms ``ctseg demo`` trains on (:mod:`pipeline.synthetic.phantoms` with
the demo's sizes, ``DemoConfig`` defaults), 8 for training and 3 for validation, written as NIfTI with an
ingest manifest. Variants, each in its own process, one after another:

- ``ours_default``: ctseg's default recipe: every preprocess and train setting at its default (planned
  spacing, window, patch and batch from the memory plan, the default network, DiceCE, AdamW, poly
  schedule, augmentation, ``precision: auto``), with ``max_steps: auto`` planned by the train stage's own
  step planner (pipeline/train/budget.py) for a budget equal to the cap. ``FoldTrainer`` runs the steps.
- ``tutorial``: MONAI's spleen segmentation tutorial loop as written there: LoadImaged → EnsureChannelFirstd →
  ScaleIntensityRanged(-57, 164) → CropForegroundd → Orientationd(RAS) → Spacingd(1.5, 1.5, 2) →
  RandCropByPosNegLabeld(96³, pos 1, neg 1, 4 samples) in a CacheDataset, batch 2, UNet 16-256 (strides 2,
  2 residual units, batch norm), DiceLoss, Adam 1e-4; validation by sliding_window_inference (160³, 4 windows
  per batch) and DiceMetric without background. One change: ``SpatialPadd`` to 96³ before the random crop,
  because the demo phantoms are smaller than 96 voxels along some axes at 1.5 mm (the tutorial's spleen CTs
  are not).
- ``ours_tutorial_net``: ctseg's default recipe with the tutorial's network (UNet 16-256, 2 residual units,
  batch norm) instead of the default one.

Each variant trains in slices of about ``--val-seconds`` of training, then validates on the 3 validation
phantoms (its own pipeline's validation grid and sliding window; the validation time is not counted) and
stops at the first validation with mean foreground Dice ≥ 0.90, or when the training time reaches the cap.
The JSON keeps every variant's curve (training seconds, CPU seconds, steps, Dice), the time each needed to
reach 0.90 (or that it did not within the cap), the Dice each had at the tutorial's own budget (the time the
tutorial trained, i.e. the cap unless it reached 0.90 first), and the ratio against the tutorial.
Goal (issue 14): ours_default reaches 0.90 in ≤ 1/3 of the tutorial loop's time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.90
VARIANTS = ("ours_default", "tutorial", "ours_tutorial_net")
TUTORIAL_CHANNELS = [16, 32, 64, 128, 256]
TRAIN_CASES, VAL_CASES = 8, 3


def write_phantoms(root: Path, cases: int) -> None:
    """The demo's phantoms (its generator and sizes), written as bench/train.py writes its own."""
    from train import write_dataset

    from pipeline.demo_options import DemoConfig
    from pipeline.synthetic.phantoms import PhantomOptions

    demo = DemoConfig()
    write_dataset(root, cases, PhantomOptions(shape=demo.in_plane_size, slices=demo.slices))


class Clock:
    """Training time and CPU time, paused while validating; the curve of (seconds, cpu, steps, Dice)."""

    def __init__(self, cap_seconds: float, val_seconds: float):
        self.cap, self.every = cap_seconds, val_seconds
        self.train = self.cpu = 0.0
        self.steps = 0
        self.curve: list[dict] = []
        self._wall = self._cpu = 0.0

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.train += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu

    def add(self, dice: float) -> bool:
        """Record a validation; True when training should stop."""
        self.curve.append({"train_seconds": round(self.train, 1), "cpu_seconds": round(self.cpu, 1),
                           "steps": self.steps, "mean_dice": round(dice, 4)})
        print(f"  {self.curve[-1]}", file=sys.stderr, flush=True)
        return dice >= TARGET or self.train >= self.cap

    def result(self) -> dict:
        reached = next((point for point in self.curve if point["mean_dice"] >= TARGET), None)
        return {"curve": self.curve, "reached": reached is not None,
                "seconds_to_target": reached["train_seconds"] if reached else None,
                "cpu_seconds_to_target": reached["cpu_seconds"] if reached else None,
                "steps_to_target": reached["steps"] if reached else None,
                "trained_seconds": round(self.train, 1),
                "final_dice": self.curve[-1]["mean_dice"] if self.curve else None}


def run_ours(root: Path, args, tutorial_net: bool) -> dict:
    import dataclasses

    import numpy as np
    import torch

    from pipeline.config import load_config
    from pipeline.preprocess.cache import load_cached_case, read_index
    from pipeline.preprocess.stage import run_preprocess
    from pipeline.train.budget import measure_rate, plan_steps, resolved_options, warmup_seconds
    from pipeline.train.data import PatchDataset, batches, derived_seed, prepare_case
    from pipeline.train.loop import FoldJob, FoldTrainer
    from pipeline.train.runtime import setup_runtime
    from pipeline.train.stage import resolve_setup

    overrides = [f"output_root={root}", "experiment=.", "train.max_steps=auto",
                 f"train.time_budget_minutes={args.cap_minutes}"]
    if tutorial_net:
        overrides += [f"train.channels={TUTORIAL_CHANNELS}", "train.num_res_units=2", "train.norm=batch"]
    cfg = load_config([], overrides)
    run_preprocess(cfg)
    pre_dir = cfg.stage_dir("preprocess")
    plan, entries = read_index(pre_dir)
    runtime = setup_runtime(cfg.train)
    sampling, batch_size, spec = resolve_setup(cfg, plan, pre_dir, entries, runtime.device.type)
    n_classes = len(plan["class_values"])
    loaded = {e["id"]: load_cached_case(pre_dir, e)[:2] for e in entries}
    ids = sorted(loaded)
    train_ids, val_ids = ids[:TRAIN_CASES], ids[TRAIN_CASES:TRAIN_CASES + VAL_CASES]
    cases = [prepare_case(c, *loaded[c], sampling, derived_seed(cfg.seed, "centres", c), n_classes) for c in train_ids]
    job = FoldJob(fold=0, folder=Path(tempfile.mkdtemp()), options=cfg.train, seed=cfg.seed, stage_hash="bench",
                  network_spec=spec, sampling=sampling, batch_size=batch_size,
                  class_names=[lbl["name"] for lbl in plan["labels"]], train_cases=cases,
                  val_cases=[(c, *loaded[c]) for c in val_ids], resume=False)
    # the train stage's own planner: steps for a budget equal to the cap, measured on a throwaway network
    warm_options = dataclasses.replace(cfg.train, max_steps=62, val_every=10 ** 9)
    warm_job = dataclasses.replace(job, options=warm_options)
    measured = measure_rate(FoldTrainer(warm_job, runtime), PatchDataset(cases, sampling, warm_options, cfg.seed, 0, 0),
                            batch_size, runtime, [], warmup_seconds(cfg.train))
    # validations are off the clock here, so the schedule spans the cap's training time alone (--quick: at least
    # 10 minutes' worth, so that the planner's 20-step minimum holds on a slow machine)
    schedule = dataclasses.replace(cfg.train, val_every=10 ** 9, time_budget_minutes=max(args.cap_minutes, 10.0))
    step_plan = plan_steps(schedule, {**measured, "validation_seconds": 0.0}, "bench", str(runtime.device))
    options = resolved_options(cfg.train, step_plan)
    job = dataclasses.replace(job, options=options)
    trainer = FoldTrainer(job, runtime)
    dataset = PatchDataset(cases, sampling, options, cfg.seed, 0, 0)
    clock = Clock(args.cap_minutes * 60.0, args.val_seconds)
    trainer.network.train()
    clock.start()
    since = time.perf_counter()
    for step, images, labels in batches(dataset, 1, options.max_steps, batch_size, runtime.loader_workers):
        trainer.train_step(images, labels)
        clock.steps = step
        if time.perf_counter() - since >= args.val_seconds or step == options.max_steps:
            clock.stop()
            means, _ = trainer.validate()
            trainer.network.train()
            if clock.add(float(np.nanmean(means))):
                break
            clock.start()
            since = time.perf_counter()
    return {**clock.result(), "precision": runtime.precision, "patch": sampling.patch_size, "batch": batch_size,
            "network": {"channels": list(cfg.train.channels), "num_res_units": cfg.train.num_res_units,
                        "norm": cfg.train.norm, "name": cfg.train.network},
            "target_spacing": plan["target_spacing"], "planned_steps": options.max_steps,
            "steps_per_second_planned": step_plan["steps_per_second"], "torch_threads": torch.get_num_threads()}


def run_tutorial(root: Path, args) -> dict:
    import torch
    from monai.data import CacheDataset, DataLoader, decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceLoss
    from monai.metrics import DiceMetric
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet
    from monai.transforms import (
        AsDiscrete,
        Compose,
        RandCropByPosNegLabeld,
        SpatialPadd,
    )
    from train import tutorial_preprocessing

    torch.manual_seed(0)
    files = json.loads((root / "files.json").read_text())
    train_files, val_files = files[:TRAIN_CASES], files[TRAIN_CASES:TRAIN_CASES + VAL_CASES]
    common = tutorial_preprocessing()
    train_transforms = Compose([*common, SpatialPadd(keys=["image", "label"], spatial_size=(96, 96, 96)),
                                RandCropByPosNegLabeld(keys=["image", "label"], label_key="label",
                                                       spatial_size=(96, 96, 96), pos=1, neg=1, num_samples=4,
                                                       image_key="image", image_threshold=0)])
    train_loader = DataLoader(CacheDataset(train_files, train_transforms, cache_rate=1.0), batch_size=2, shuffle=True)
    val_loader = DataLoader(CacheDataset(val_files, Compose(common), cache_rate=1.0), batch_size=1)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=TUTORIAL_CHANNELS, strides=(2, 2, 2, 2),
                 num_res_units=2, norm=Norm.BATCH)
    loss_function = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    metric = DiceMetric(include_background=False, reduction="mean")
    post_pred, post_label = AsDiscrete(argmax=True, to_onehot=4), AsDiscrete(to_onehot=4)
    clock = Clock(args.cap_minutes * 60.0, args.val_seconds)
    clock.start()
    since = time.perf_counter()
    done = False
    while not done:
        model.train()
        for batch in train_loader:
            optimizer.zero_grad()
            loss = loss_function(model(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            clock.steps += 1
            if time.perf_counter() - since >= args.val_seconds:
                clock.stop()
                model.eval()
                with torch.no_grad():
                    for val in val_loader:
                        outputs = sliding_window_inference(val["image"], (160, 160, 160), 4, model)
                        metric(y_pred=[post_pred(i) for i in decollate_batch(outputs)],
                               y=[post_label(i) for i in decollate_batch(val["label"])])
                dice = float(metric.aggregate().item())
                metric.reset()
                model.train()
                if clock.add(dice):
                    done = True
                    break
                clock.start()
                since = time.perf_counter()
    return {**clock.result(), "precision": "fp32", "patch": [96, 96, 96], "batch": "2 x 4 samples",
            "network": {"channels": TUTORIAL_CHANNELS, "num_res_units": 2, "norm": "batch", "name": "UNet"},
            "target_spacing": [1.5, 1.5, 2.0], "torch_threads": torch.get_num_threads()}


def worker(args) -> None:
    root = Path(args.data)
    if args.variant == "tutorial":
        result = run_tutorial(root, args)
    elif args.variant in ("ours_default", "ours_tutorial_net"):
        result = run_ours(root, args, tutorial_net=args.variant == "ours_tutorial_net")
    else:
        raise SystemExit(f"unknown variant {args.variant!r}")
    print("RESULT " + json.dumps(result))


def run_all(args, machine: dict) -> dict:
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    results: dict = {"benchmark": "train time to quality", "target_mean_dice": TARGET,
                     "settings": {"cap_minutes": args.cap_minutes, "val_seconds": args.val_seconds,
                                  "train_cases": TRAIN_CASES, "val_cases": VAL_CASES, "threads": args.threads},
                     "variants": {}}
    with tempfile.TemporaryDirectory(prefix="ctseg-bench-quality-") as tmp:
        write_phantoms(Path(tmp), TRAIN_CASES + VAL_CASES)
        for variant in variants:
            command = [sys.executable, str(REPO / "bench" / "train.py"), "--variant", variant, "--data", tmp,
                       "--cap-minutes", str(args.cap_minutes), "--val-seconds", str(args.val_seconds),
                       "--threads", str(args.threads)]
            print(f"bench/train.py: {variant} (cap {args.cap_minutes} min) ...", file=sys.stderr, flush=True)
            env = dict(os.environ)
            if args.threads:
                env["OMP_NUM_THREADS"] = str(args.threads)
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            results["variants"][variant] = (json.loads(lines[-1][len("RESULT "):]) if done.returncode == 0 and lines
                                            else {"error": f"exit {done.returncode}"})
    results["machine"] = machine
    tutorial = results["variants"].get("tutorial", {})
    budget = tutorial.get("trained_seconds")
    comparison = {}
    for name, value in results["variants"].items():
        if "curve" not in value:
            continue
        at_budget = [p for p in value["curve"] if budget is not None and p["train_seconds"] <= budget * 1.05]
        entry = {"seconds_to_target": value["seconds_to_target"],
                 "dice_at_tutorial_budget": at_budget[-1]["mean_dice"] if at_budget else None}
        if name != "tutorial" and value["seconds_to_target"] is not None and tutorial.get("curve"):
            if tutorial.get("seconds_to_target"):
                entry["time_ratio_vs_tutorial"] = round(value["seconds_to_target"] / tutorial["seconds_to_target"], 3)
            else:  # the tutorial did not get there within the cap: the ratio is at most this
                entry["time_ratio_vs_tutorial_at_most"] = round(
                    value["seconds_to_target"] / tutorial["trained_seconds"], 3)
        comparison[name] = entry
    results["comparison"] = comparison
    ours = comparison.get("ours_default", {})
    ratio = ours.get("time_ratio_vs_tutorial", ours.get("time_ratio_vs_tutorial_at_most"))
    results["goal"] = "ours_default reaches a mean validation Dice of 0.90 in <= 1/3 of the tutorial loop's time"
    results["goal_met"] = None if ratio is None else ratio <= 1 / 3
    return results
