"""Benchmark: what bf16 (or fp16) autocast does to predict's labels and time, against fp32, with a trained model.

    python bench/precision.py --model M --input DIR --output bench/results/precision_predict.json \
        [--precisions fp32,bf16,fp16] [--repeats 3]

Runs :func:`pipeline.predict.stage.run_predict` on every volume of ``--input`` once per precision
and repeat, interleaved (fp32, bf16, fp32, bf16, ...), so that load from other work hits every
precision alike. The labels each precision writes (on the source grid, as a user gets them) are
compared with the fp32 labels of the same repeat:

- per class, the Dice agreement pooled over all cases (2|A∩B| / (|A|+|B|)) and its minimum over cases;
- the share of all voxels whose label changed;
- the network pass time (the ``infer`` timing of each case) and the whole case time, as ratios to fp32.

The policy (``pipeline/precision.py``) lets predict's ``auto`` use a precision only where every
class agrees with fp32 to a Dice of at least 0.995; the JSON says whether that holds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_once(model: Path, inputs: Path, out: Path, precision: str, threads: int) -> dict:
    """One predict batch in ``precision``; returns per-case timings and the label paths."""
    import torch

    from pipeline.config import Config
    from pipeline.predict.stage import run_predict

    if threads:
        torch.set_num_threads(threads)
    cfg = Config()
    cfg.predict.precision = precision
    cfg.predict.outputs.seg_nrrd = False
    cfg.predict.outputs.thumbnails = False
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    result = run_predict(cfg, model, inputs, out)
    seconds = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"predict in {precision} failed: {[c['error'] for c in result.report['cases']]}")
    cases = {c["id"]: {"infer_s": c["timings"]["infer"], "total_s": c["timings"]["total"],
                       "labels": str(out / c["outputs"]["labels"])} for c in result.report["cases"]}
    return {"precision": result.report["precision"], "batch_seconds": round(seconds, 3), "cases": cases}


def compare(reference: dict, other: dict, label_names: dict[int, str]) -> dict:
    """Per-class Dice agreement (pooled and worst case) and the share of voxels whose label changed."""
    import nibabel as nib
    import numpy as np

    pooled = {v: [0, 0] for v in label_names}  # intersection, size sum
    worst = {v: 1.0 for v in label_names}
    changed, total = 0, 0
    for case, entry in reference["cases"].items():
        a = np.asarray(nib.load(entry["labels"]).dataobj)
        b = np.asarray(nib.load(other["cases"][case]["labels"]).dataobj)
        changed += int((a != b).sum())
        total += a.size
        for value in label_names:
            x, y = a == value, b == value
            inter, size = int(np.logical_and(x, y).sum()), int(x.sum()) + int(y.sum())
            pooled[value][0] += inter
            pooled[value][1] += size
            if size:
                worst[value] = min(worst[value], 2.0 * inter / size)
    dice = {label_names[v]: round(2.0 * i / s, 5) if s else 1.0 for v, (i, s) in pooled.items()}
    return {"dice_agreement": dice, "min_dice_agreement_over_cases": {label_names[v]: round(d, 5)
                                                                       for v, d in worst.items()},
            "share_of_voxels_changed": changed / total if total else 0.0, "voxels": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained model folder (train/model)")
    parser.add_argument("--input", type=Path, required=True, help="folder of volumes to predict")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "precision_predict.json")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated; fp32 is the reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--label", default="", help="a name for this model/data pair in the JSON")
    args = parser.parse_args()
    import torch
    from bench_machine import machine_info

    from pipeline.models.folder import read_model_spec
    from pipeline.precision import cpu_model_name, probe

    precisions = ["fp32"] + [p for p in args.precisions.split(",") if p and p != "fp32"]
    spec = read_model_spec(args.model)
    label_names = {label["value"]: label["name"] for label in spec["labels"]}
    load_before = list(os.getloadavg())
    runs: dict[str, list[dict]] = {p: [] for p in precisions}
    with tempfile.TemporaryDirectory(prefix="ctseg-bench-precision-") as tmp:
        for repeat in range(args.repeats):
            for precision in precisions:
                run = run_once(args.model, args.input, Path(tmp) / f"{precision}_{repeat}", precision, args.threads)
                runs[precision].append(run)
                print(f"bench/precision.py: repeat {repeat + 1}, {precision}: {run['batch_seconds']} s", flush=True)
        results = {p: {} for p in precisions}
        for precision in precisions:
            infer = [sum(c["infer_s"] for c in r["cases"].values()) for r in runs[precision]]
            total = [sum(c["total_s"] for c in r["cases"].values()) for r in runs[precision]]
            results[precision] = {"resolved": runs[precision][0]["precision"],
                                  "network_pass_seconds_per_repeat": [round(s, 3) for s in infer],
                                  "case_seconds_per_repeat": [round(s, 3) for s in total]}
            if precision != "fp32":
                agreement = compare(runs["fp32"][0], runs[precision][0], label_names)
                stable = compare(runs[precision][0], runs[precision][-1], label_names)
                ratio = [f / o for f, o in zip(results["fp32"]["network_pass_seconds_per_repeat"], infer)]
                case_ratio = [f / o for f, o in zip(results["fp32"]["case_seconds_per_repeat"], total)]
                results[precision].update({
                    **agreement,
                    "same_labels_in_every_repeat": stable["share_of_voxels_changed"] == 0.0,
                    "network_pass_speedup_vs_fp32_per_repeat": [round(r, 3) for r in ratio],
                    "network_pass_speedup_vs_fp32_median": round(statistics.median(ratio), 3),
                    "case_speedup_vs_fp32_median": round(statistics.median(case_ratio), 3),
                    "meets_auto_rule_min_class_agreement_0.995": min(agreement["dice_agreement"].values()) >= 0.995
                    and min(agreement["min_dice_agreement_over_cases"].values()) >= 0.995,
                })
    result = {
        "benchmark": "predict labels and time per precision, against fp32, same trained model and inputs",
        "label": args.label, "model": str(args.model), "input": str(args.input),
        "cases": sorted(runs["fp32"][0]["cases"]), "repeats": args.repeats,
        "network": spec["network"], "patch_size": spec["patch_size"], "results": results,
        "machine": {**machine_info(load_before), "cpu_model": cpu_model_name(),
                    "native_bf16": probe(torch.device("cpu")).detail,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "timing_method": "precisions interleaved per repeat, in one process; ratios per repeat"},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    from pipeline import atomic

    atomic.write_json(args.output, result)
    print(json.dumps({p: {k: v for k, v in r.items() if "per_repeat" not in k} for p, r in results.items()},
                     indent=1))


if __name__ == "__main__":
    main()
