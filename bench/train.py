"""Benchmark: training time to quality (default) or iterations per second, ours against MONAI's spleen tutorial.

Default mode: time to a mean validation Dice of 0.90 on the demo phantoms (bench/train_quality.py says how):

    python bench/train.py --output bench/results/train_quality.json [--cap-minutes 20] [--quick]

``--throughput``: the iterations-per-second comparison below (same network and patch on both sides).

Both sides train the same network (the spleen tutorial's UNet: channels 16-256, strides 2,
2 residual units, batch norm) on the same data (synthetic abdominal phantoms from
:mod:`pipeline.synthetic.phantoms`, written as NIfTI), with the same patch size and batch size (96³ × 2 by
default) and the same target spacing (1.5 × 1.5 × 2 mm) and HU window ([-57, 164]) as the tutorial.

- reference: written the way MONAI's spleen tutorial writes it: ``CacheDataset`` over
  LoadImaged → EnsureChannelFirstd → ScaleIntensityRanged → CropForegroundd → Orientationd →
  Spacingd → RandCropByPosNegLabeld, a ``DataLoader``, fp32, default memory layout, DiceLoss, Adam.
- ours: the pipeline's own path: the preprocess stage's cached arrays, the train stage's patch
  sampler (RandCropByPosNegLabeld on arrays already cropped and resampled, precomputed centre
  indices) and ``FoldTrainer.train_step`` (the default layout of the device: channels-last on the CPU,
  contiguous on CUDA; precision ``auto``, DiceCE, AdamW).
- ours_contiguous: ours with channels-last off (what the layout alone is worth on the CPU).
- ours_channels_last (only with ``--variants``): ours with channels-last forced on (the layout on CUDA).
- ours_compiled: ours with ``train.compile: true`` (torch.compile; the compilation falls in the warm-up steps,
  whose seconds are recorded).
- ours_bf16, ours_fp32 (only with ``--variants``): precision forced to bf16 (fast on CPUs with AVX512-BF16/AMX,
  slow elsewhere) or fp32, whatever ``auto`` picks on this machine.

``--device`` (auto: CUDA when present) puts both sides on the same device: the reference's network
and batches go there as in the tutorial, so a GPU ratio compares like with like; on CUDA each timed
step ends with a synchronisation.

Each variant runs in its own subprocess; its peak resident memory is that process's VmHWM from
/proc/self/status. Setup (caching, preprocessing) is timed separately from the training steps.
Timings on a shared machine are noisy: the JSON records the load average before and after, and
the CPU seconds each step used (process time), which is less sensitive to other jobs.

    python bench/train.py --throughput --output bench/results/train.json [--steps 10] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_machine import machine_info  # noqa: E402

SPACING = (1.5, 1.5, 2.0)
WINDOW = (-57.0, 164.0)
CHANNELS = [16, 32, 64, 128, 256]
DEFAULT_VARIANTS = ("reference", "ours", "ours_contiguous", "ours_compiled")
# a body about 300 × 220 mm: after the tutorial's CropForegroundd (HU > -57) and 1.5 mm spacing every
# phantom is still larger than a 96³ patch, as the tutorial's spleen CTs are
PHANTOM = dict(shape=256, slices=120, inplane_spacing_min=1.15, inplane_spacing_max=1.3, slice_spacing_min=2.5,
               slice_spacing_max=3.0)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def write_dataset(root: Path, cases: int, phantom_options=None) -> list[dict]:
    """Phantom CTs and labels as NIfTI plus an ingest manifest (what 'ctseg ingest' would write), and the
    tutorial's file list (``files.json``); ``phantom_options`` (PhantomOptions) default to this benchmark's."""
    from pipeline import atomic
    from pipeline.geometry import Volume
    from pipeline.ingest.manifest import write_manifest
    from pipeline.synthetic.phantoms import LABEL_NAMES, PhantomOptions, make_phantom

    options = phantom_options or PhantomOptions(**PHANTOM)
    from pipeline.volume_io import save_nifti

    files = []
    entries = []
    for index in range(cases):
        case_id = f"phantom_{index:03d}"
        phantom = make_phantom(seed=index, options=options)
        image = root / "ingest" / "imagesTr" / f"{case_id}_0000.nii.gz"
        label = root / "ingest" / "labelsTr" / f"{case_id}.nii.gz"
        save_nifti(Volume(phantom.image.array, phantom.image.affine), image)
        save_nifti(Volume(phantom.label.array, phantom.label.affine), label)
        files.append({"image": str(image), "label": str(label)})
        entries.append({"id": case_id, "role": "train", "image": str(image.relative_to(root / "ingest")),
                        "label": str(label.relative_to(root / "ingest")), "provenance": None})
    labels = [{"name": name, "value": value, "color": [255, 0, 0], "synonyms": []}
              for value, name in LABEL_NAMES.items()]
    write_manifest(root / "ingest", labels, None, entries)
    atomic.write_json(root / "ingest" / "done.json", {"stage": "ingest", "hash": f"bench-{cases}"})
    atomic.write_json(root / "files.json", files)
    return files


# ---------------------------------------------------------------------------------------------
# Variants (each runs in its own process)
# ---------------------------------------------------------------------------------------------

def bench_device(requested: str):
    """The device both sides train on: ``--device``, auto = CUDA when torch sees a GPU."""
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def tutorial_preprocessing() -> list:
    """The spleen tutorial's deterministic transforms: load, window (-57, 164), crop to the foreground, RAS,
    1.5 x 1.5 x 2 mm (its training transforms then add the random crop; its validation uses these alone)."""
    from monai.transforms import (
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    return [LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]),
            ScaleIntensityRanged(keys=["image"], a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys=["image", "label"], source_key="image"),
            Orientationd(keys=["image", "label"], axcodes="RAS"),
            Spacingd(keys=["image", "label"], pixdim=SPACING, mode=("bilinear", "nearest"))]


def run_reference(root: Path, args) -> dict:
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceLoss
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        RandCropByPosNegLabeld,
    )

    torch.manual_seed(0)
    files = json.loads((root / "files.json").read_text())
    transforms = Compose([
        *tutorial_preprocessing(),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=[args.patch] * 3, pos=1,
                               neg=1, num_samples=1, image_key="image", image_threshold=0),
    ])
    start = time.perf_counter()
    dataset = CacheDataset(data=files, transform=transforms, cache_rate=1.0, num_workers=args.workers or None)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    setup = time.perf_counter() - start
    device = bench_device(args.device)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=CHANNELS, strides=(2, 2, 2, 2),
                 num_res_units=2, norm=Norm.BATCH).to(device)
    loss_function = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    model.train()

    def batches():
        while True:
            for batch in loader:
                yield batch["image"].to(device), batch["label"].to(device)

    def step(images, labels):
        optimizer.zero_grad()
        loss = loss_function(model(images), labels)
        loss.backward()
        optimizer.step()

    return {"setup_seconds": round(setup, 2), "device": str(device), **_time_steps(batches(), step, args, device)}


def run_ours(root: Path, args, channels_last: bool | None, precision: str, compile_network: bool = False) -> dict:
    import numpy as np

    from pipeline.config import load_config
    from pipeline.preprocess.cache import load_cached_case, read_index
    from pipeline.preprocess.stage import run_preprocess
    from pipeline.train.data import PatchDataset, batches, derived_seed, prepare_case
    from pipeline.train.loop import FoldJob, FoldTrainer
    from pipeline.train.runtime import setup_runtime
    from pipeline.train.stage import resolve_setup

    cfg = load_config([], [
        f"output_root={root}", "experiment=.", f"preprocess.target_spacing={list(SPACING)}",
        f"preprocess.window_low={WINDOW[0]}", f"preprocess.window_high={WINDOW[1]}",
        f"train.channels={CHANNELS}", "train.norm=batch", "train.num_res_units=2",
        f"train.patch_size={[args.patch] * 3}", f"train.batch_size={args.batch}", "train.augment.enabled=false",
        f"train.channels_last={'null' if channels_last is None else 'true' if channels_last else 'false'}",
        f"train.precision={precision}", f"train.device={bench_device(args.device).type}",
        "train.foreground_ratio=0.5", f"train.loader_workers={args.workers}",
        f"train.compile={'true' if compile_network else 'false'}", "train.max_steps=1000"])
    start = time.perf_counter()
    run_preprocess(cfg)
    pre_dir = cfg.stage_dir("preprocess")
    plan, entries = read_index(pre_dir)
    sampling, batch_size, spec = resolve_setup(cfg, plan, pre_dir, entries)
    cases = [prepare_case(e["id"], *load_cached_case(pre_dir, e)[:2], sampling, derived_seed(0, e["id"]),
                          len(plan["class_values"])) for e in entries]
    setup = time.perf_counter() - start
    runtime = setup_runtime(cfg.train)
    job = FoldJob(fold=0, folder=Path(tempfile.mkdtemp()), options=cfg.train, seed=0, stage_hash="bench",
                  network_spec=spec, sampling=sampling, batch_size=batch_size,
                  class_names=[lbl["name"] for lbl in plan["labels"]], train_cases=cases, val_cases=[], resume=False)
    trainer = FoldTrainer(job, runtime)
    dataset = PatchDataset(cases, sampling, cfg.train, 0, 0, 0)
    stream = ((images, labels) for _, images, labels in
              batches(dataset, 1, args.warmup + args.steps, batch_size, args.workers))
    result = _time_steps(stream, trainer.train_step, args, runtime.device)
    result.update({"setup_seconds": round(setup, 2), "precision": runtime.precision, "device": str(runtime.device),
                   "memory_format": str(trainer.memory_format).replace("torch.", ""),
                   "preprocessed_shapes": [list(np.shape(c.image)) for c in cases]})
    return result


def _time_steps(stream, step, args, device) -> dict:
    """Run warm-up steps, then time ``args.steps`` steps (data loading included: it is part of a step)."""
    import torch

    def sync():  # CUDA runs asynchronously: a step is done when its kernels are
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if args.threads:
        torch.set_num_threads(args.threads)
    warm = time.perf_counter()
    for _ in range(args.warmup):
        step(*next(stream))
    sync()
    warmup_seconds = time.perf_counter() - warm
    walls, cpus = [], []
    for _ in range(args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step(*next(stream))
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"steps": args.steps, "seconds_per_step_median": round(statistics.median(walls), 4),
            "seconds_per_step_min": round(min(walls), 4),
            "iterations_per_second": round(1 / statistics.median(walls), 4),
            "cpu_seconds_per_step_median": round(statistics.median(cpus), 4),
            "torch_threads": torch.get_num_threads(),
            "warmup_seconds_including_any_compilation": round(warmup_seconds, 1)}


def worker(args) -> None:
    root = Path(args.data)
    variant = args.variant
    if variant == "reference":
        result = run_reference(root, args)
    elif variant == "ours":
        result = run_ours(root, args, channels_last=None, precision="auto")
    elif variant == "ours_channels_last":
        result = run_ours(root, args, channels_last=True, precision="auto")
    elif variant == "ours_contiguous":
        result = run_ours(root, args, channels_last=False, precision="auto")
    elif variant == "ours_compiled":
        result = run_ours(root, args, channels_last=None, precision="auto", compile_network=True)
    elif variant == "ours_bf16":
        result = run_ours(root, args, channels_last=None, precision="bf16")
    elif variant == "ours_fp32":
        result = run_ours(root, args, channels_last=None, precision="fp32")
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "train.json")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--cases", type=int, default=4, help="phantom cases in the training set")
    parser.add_argument("--patch", type=int, default=96, help="cubic patch size")
    parser.add_argument("--batch", type=int, default=2, help="patches per step")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (both sides)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where both sides train (auto: CUDA when present)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best round counts")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated: reference, ours, ours_contiguous, ours_channels_last, ours_compiled, "
                             "ours_bf16, ours_fp32")
    parser.add_argument("--quick", action="store_true", help="64³ patches, 3 steps, 2 cases (a smoke run)")
    parser.add_argument("--throughput", action="store_true",
                        help="iterations per second with the same network on both sides (the old goal)")
    parser.add_argument("--cap-minutes", type=float, default=20.0,
                        help="time to quality: stop a variant that has not reached Dice 0.90 after this much training")
    parser.add_argument("--val-seconds", type=float, default=45.0,
                        help="time to quality: validate after about this many seconds of training")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import train_quality

    if not args.throughput:
        if args.quick:  # a smoke run: a minute per variant, so that the script cannot rot
            args.cap_minutes, args.val_seconds = min(args.cap_minutes, 1.0), 20.0
        if args.variant:
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            train_quality.worker(args)
            return
        if args.variants == ",".join(DEFAULT_VARIANTS):
            args.variants = ",".join(train_quality.VARIANTS)
        load_before = list(os.getloadavg())
        results = train_quality.run_all(args, {})
        results["machine"] = {**machine_info(load_before), **_cpu_features()}
        from pipeline import atomic

        if args.output == REPO / "bench" / "results" / "train.json":
            args.output = REPO / "bench" / "results" / "train_quality.json"
        atomic.write_json(args.output, results)
        print(json.dumps({"comparison": results["comparison"], "goal_met": results["goal_met"]}, indent=2))
        return
    if args.quick:
        args.patch, args.steps, args.cases, args.warmup, args.rounds = 64, 3, 2, 1, 1
    if args.variant:
        worker(args)
        return

    load_before = list(os.getloadavg())
    results: dict = {"benchmark": "train",
                     "settings": {"patch": [args.patch] * 3, "batch": args.batch, "steps": args.steps,
                                  "warmup": args.warmup, "rounds": args.rounds, "cases": args.cases,
                                  "spacing_mm": SPACING,
                                  "window_hu": WINDOW, "network": {"name": "UNet", "channels": CHANNELS,
                                                                   "strides": [2, 2, 2, 2], "num_res_units": 2,
                                                                   "norm": "batch"},
                                  "workers": args.workers, "phantom": PHANTOM, "device": args.device},
                     "variants": {}}
    with tempfile.TemporaryDirectory(prefix="ctseg-bench-train-") as tmp:
        start = time.perf_counter()
        write_dataset(Path(tmp), args.cases)
        results["data_seconds"] = round(time.perf_counter() - start, 2)
        runs: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
        for round_index in range(args.rounds):  # interleaved rounds: load spikes hit every variant alike
            for variant in runs:
                command = [sys.executable, __file__, "--throughput", "--variant", variant, "--data", tmp,
                           "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--patch", str(args.patch), "--batch", str(args.batch),
                           "--workers", str(args.workers), "--threads", str(args.threads), "--device", args.device]
                print(f"bench/train.py: round {round_index + 1}, {variant} ...", flush=True)
                done = subprocess.run(command, capture_output=True, text=True)
                lines = [lbl for lbl in done.stdout.splitlines() if lbl.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    runs[variant].append({"error": done.stderr.strip().splitlines()[-1:] or ["failed"]})
                else:
                    runs[variant].append(json.loads(lines[-1][len("RESULT "):]))
                print(f"  {json.dumps(runs[variant][-1])[:300]}", flush=True)
        for variant, rounds in runs.items():
            good = [r for r in rounds if "error" not in r]
            if not good:
                results["variants"][variant] = rounds[-1]
                continue
            best = min(good, key=lambda r: r["seconds_per_step_median"])  # the least disturbed round
            results["variants"][variant] = {**best, "rounds": [
                {k: r.get(k) for k in ("seconds_per_step_median", "cpu_seconds_per_step_median", "peak_rss_mb")}
                for r in rounds]}
    results["machine"] = {**machine_info(load_before), **_cpu_features()}
    reference = results["variants"].get("reference", {})
    ratios = {}
    for name, value in results["variants"].items():
        if name != "reference" and "iterations_per_second" in value and "iterations_per_second" in reference:
            ratios[name] = {
                "speedup_vs_reference": round(value["iterations_per_second"] / reference["iterations_per_second"], 3),
                "cpu_time_speedup_vs_reference": round(reference["cpu_seconds_per_step_median"]
                                                       / value["cpu_seconds_per_step_median"], 3),
                "peak_rss_ratio_vs_reference": round(value["peak_rss_mb"] / reference["peak_rss_mb"], 3)}
    results["ratios"] = ratios
    results["goal"] = "ours >= 2x the reference's iterations/s"
    if "ours" in ratios:
        results["goal_met"] = ratios["ours"]["speedup_vs_reference"] >= 2.0
    if "ours_compiled" in ratios:
        results["goal_met_with_train_compile"] = ratios["ours_compiled"]["speedup_vs_reference"] >= 2.0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    from pipeline import atomic

    atomic.write_json(args.output, results)
    print(json.dumps({"ratios": ratios, "goal_met": results.get("goal_met")}, indent=2))


def _cpu_features() -> dict:
    """What decides the precision and kernels training can use on this CPU (the rest is machine_info's)."""
    import torch

    from pipeline.precision import cpu_model_name, probe

    capability = probe(torch.device("cpu"))
    return {"cpu": cpu_model_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": capability.native_bf16, "native_bf16_detail": capability.detail}


if __name__ == "__main__":
    main()
