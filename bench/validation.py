"""Benchmark: training validation's sliding window, ours against the MONAI wrapper it replaced (seconds, Dice).

Training validation (``FoldTrainer.validate``) now runs the predict stage's sliding window
(:class:`pipeline.train.loop.ValidationWindow` over :func:`pipeline.predict.inference.sliding_window_predict`).

- reference: the former validation (``pipeline/models/inference.py`` until issue 16, copied here unchanged in
  substance): MONAI ``sliding_window_inference``, Gaussian mode, replicate padding, stitched on the CPU; 2D/2.5D
  models slice by slice in chunks of 32 slices; softmax of the blended logits, then argmax.
- ours: :class:`ValidationWindow` as the trainer builds it.

Both run the same seeded network (the demo's UNet, ``configs/demo.yaml``: channels 16-128, batch norm, one
residual unit; random weights), on the same z-scored synthetic abdomen (``tests/helpers/train.py``) at a
demo-like model-grid size, with the demo's patch, batch and ``train.val_overlap``, in fp32 and in the precision
``train.precision: auto`` picks on this machine, channels-last as training uses it on the CPU. Each variant runs
``--repeats`` times after one untimed warm-up of each, interleaved; the seconds are compared as ratios (of the
medians, of the fastest runs, and of the least CPU seconds, the figure least disturbed by other jobs), and the
labels of the two are compared voxel by voxel and as the per-class Dice against the phantom's labels.

    python bench/validation.py --output bench/results/validation.json [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SLICE_CHUNK = 32


def reference_probabilities(network, volume: torch.Tensor, mode: str, patch, context: int, overlap: float,
                            batch: int, dtype, channels_last: bool) -> torch.Tensor:
    """The former ``pipeline.models.inference.predict_probabilities`` for one network on the CPU."""
    from monai.inferers import sliding_window_inference

    def predictor(memory_format):
        def run(x):
            if dtype is None:
                out = network(x.contiguous(memory_format=memory_format))
            else:
                with torch.autocast("cpu", dtype=dtype):
                    out = network(x.contiguous(memory_format=memory_format))
            return out.float().contiguous()
        return run

    def window(x, memory_format):
        return sliding_window_inference(x, roi_size=list(patch), sw_batch_size=batch,
                                        predictor=predictor(memory_format), overlap=overlap, mode="gaussian",
                                        padding_mode="replicate")

    with torch.no_grad():
        if mode == "3d":
            fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
            return torch.softmax(torch.as_tensor(window(volume[None, None], fmt))[0].float(), dim=0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        padded = volume
        if context:
            padded = torch.cat([volume[:, :, :1].expand(-1, -1, context), volume,
                                volume[:, :, -1:].expand(-1, -1, context)], dim=2)
        result = None
        for start in range(0, volume.shape[2], SLICE_CHUNK):
            stop = min(volume.shape[2], start + SLICE_CHUNK)
            batch_slices = padded[:, :, start:stop + 2 * context].unfold(2, 2 * context + 1, 1).permute(2, 3, 0, 1)
            probs = torch.softmax(torch.as_tensor(window(batch_slices.contiguous(), fmt)).float(), dim=1)
            probs = probs.permute(1, 2, 3, 0)
            if result is None:
                result = torch.empty((probs.shape[0], *volume.shape), dtype=torch.float32)
            result[:, :, :, start:stop] = probs
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "validation.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.evaluate.metrics import dice_per_class
    from pipeline.models import build_network, network_spec
    from pipeline.precision import resolve_precision
    from pipeline.train.data import SamplingSpec
    from pipeline.train.loop import FoldJob, ValidationWindow
    from pipeline.train.options import TrainConfig
    from pipeline.train.runtime import Runtime

    from helpers.train import synthetic_case

    image, label = synthetic_case(3, spacing=(3.5, 3.5, 2.5))  # (63, 49, 48): about a demo case's model grid
    hu = image.array.astype(np.float32)
    array = (hu - hu.mean()) / hu.std()
    reference_labels = np.searchsorted([0, 1, 2, 5], label.array).astype(np.uint8)  # values 0,1,2,5 -> channels
    cpu = torch.device("cpu")
    auto = resolve_precision("auto", cpu, "train")
    setups = [("3d", [48, 40, 48], 0, 2), ("2d", [48, 40], 1, 8)]  # demo patch; 2.5D as the 2D train tests use it
    results = {"cpu": _cpu(), "threads": args.threads, "load_before": os.getloadavg(), "shape": list(array.shape),
               "auto_precision": auto.name, "cases": []}
    for mode, patch, context, batch in setups:
        for precision in dict.fromkeys(["fp32", auto.name]):
            dims = 3 if mode == "3d" else 2
            spec = network_spec("UNet", dims, 2 * context + 1, 4, [16, 32, 64, 128], patch, norm="batch",
                                num_res_units=1)
            torch.manual_seed(0)
            network = build_network(spec).eval().to(memory_format=torch.channels_last_3d if dims == 3
                                                    else torch.channels_last)
            options = TrainConfig()
            options.precision = precision
            job = FoldJob(0, Path("fold_0"), options, 0, "0" * 64, spec, SamplingSpec(mode, patch, context), batch,
                          ["liver", "spleen", "kidney"], [], [], False)
            dtype = None if precision == "fp32" else torch.bfloat16
            runtime = Runtime(cpu, dtype, False, True, precision_reason="bench")
            window = ValidationWindow.for_job(network, job, runtime, channels_last=True)
            times: dict[str, list[float]] = {"reference": [], "ours": []}
            cpu_times: dict[str, list[float]] = {"reference": [], "ours": []}
            labels = {}
            window.labels(array)  # warm-up: oneDNN builds its kernels for these shapes on the first call
            reference_probabilities(network, torch.from_numpy(array), mode, patch, context, options.val_overlap, batch,
                                    dtype, True)
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                labels["reference"] = reference_probabilities(network, torch.from_numpy(array), mode, patch, context,
                                                              options.val_overlap, batch, dtype, True).argmax(0).numpy()
                times["reference"].append(time.perf_counter() - start)
                cpu_times["reference"].append(time.process_time() - start_cpu)
                start, start_cpu = time.perf_counter(), time.process_time()
                labels["ours"] = window.labels(array)
                times["ours"].append(time.perf_counter() - start)
                cpu_times["ours"].append(time.process_time() - start_cpu)
            median = {k: statistics.median(v) for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}
            best_cpu = {k: min(v) for k, v in cpu_times.items()}
            dice = {k: [round(d, 6) for d in dice_per_class(v, reference_labels, 4)] for k, v in labels.items()}
            row = {"mode": mode, "patch": patch, "context_slices": context, "batch": batch, "precision": precision,
                   "seconds": times, "cpu_seconds": cpu_times, "median_seconds": median,
                   "ours_over_reference": round(median["ours"] / median["reference"], 3),
                   "ours_over_reference_fastest": round(best["ours"] / best["reference"], 3),
                   "ours_over_reference_cpu_seconds": round(best_cpu["ours"] / best_cpu["reference"], 3),
                   "label_agreement": float(np.mean(labels["ours"] == labels["reference"])),
                   "dice_vs_phantom": dice,
                   "classes_predicted": np.bincount(labels["ours"].ravel(), minlength=4).tolist()}
            results["cases"].append(row)
            print(json.dumps({k: row[k] for k in ("mode", "precision", "ours_over_reference",
                                                   "ours_over_reference_fastest", "ours_over_reference_cpu_seconds",
                                                   "label_agreement", "dice_vs_phantom")}), flush=True)
    results["load_after"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


def _cpu() -> str:
    from pipeline.precision import cpu_model_name

    return cpu_model_name()


if __name__ == "__main__":
    main()
