"""What the plausibility flags and the confidence cost: predict with predict.trust on and off, side by side.

    python bench/trust_cost.py --model outputs/sts_ct/train/model --input outputs/sts_ct/ingest/imagesTr \
        --cases 3 --folds 0 1 --repeats 2 --output bench/results/trust_cost.json

Each repetition runs, in alternating order, the same cases through ``run_predict`` into fresh
output folders with ``predict.trust.enabled`` false and true (ensembling ``--folds``: with two or
more the ensemble-agreement observer is active). It also times one fold without and with a
single-axis mirroring TTA: the price of a flip-based agreement term for a single-fold model.
Reported: the summed case seconds (ledger) per variant, the ratio with/without, and the trust
step's own seconds from each case's timings.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_machine import machine_info  # noqa: E402  (after the sys.path set-up above)


def run_variant(model: Path, listing: Path, overrides: list[str], scratch: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.predict.stage import run_predict

    cfg = load_config([], ["predict.outputs.thumbnails=false", "predict.outputs.seg_nrrd=false", *overrides])
    out = Path(tempfile.mkdtemp(dir=scratch))
    result = run_predict(cfg, model, listing, out)
    with sqlite3.connect(str(out / "ledger.sqlite")) as db:
        rows = db.execute("SELECT seconds, timings, status FROM cases").fetchall()
    shutil.rmtree(out)
    if result.exit_code != 0 or any(r[2] != "done" for r in rows):
        raise SystemExit(f"variant {overrides} failed: {[r[2] for r in rows]}")
    timings = [json.loads(r[1]) for r in rows]
    return {"case_seconds": round(sum(r[0] for r in rows), 3),
            "trust_seconds": round(sum(t.get("trust", 0.0) for t in timings), 3),
            "infer_seconds": round(sum(t.get("infer", 0.0) for t in timings), 3)}


def foreground_worst_case(model: Path, files: list[Path], labels_dir: Path) -> list[dict]:
    """Seconds of the trust step when the prediction is the reference label map and every model voxel is foreground.

    An upper bound for the parts that grow with the foreground (components, entropy), for models
    that segment nothing yet (the short trainings of this session).
    """
    import time

    import numpy as np
    import torch

    from pipeline.config import Config
    from pipeline.predict import trust
    from pipeline.predict.model import load_predictor
    from pipeline.predict.report import label_statistics
    from pipeline.preprocess.transform import prepare_image
    from pipeline.volume_io import load_volume

    predictor = load_predictor(model, torch.device("cpu"))
    options = Config().predict
    rows = []
    for path in files:
        label_path = labels_dir / path.name.replace("_0000", "")
        if not label_path.is_file():
            continue
        image, label = load_volume(path), load_volume(label_path)
        labels = np.rint(label.array).astype(np.uint8)
        prepared = prepare_image(image, predictor.plan, predictor.crop_align)
        k = predictor.num_classes
        probabilities = np.random.default_rng(0).dirichlet(np.ones(k), prepared.array.shape).astype(np.float32)
        probabilities = np.ascontiguousarray(np.moveaxis(probabilities, -1, 0))
        classes = np.ones(prepared.array.shape, dtype=np.uint8)
        start = time.perf_counter()
        volumes, _ = label_statistics(labels, label.grid, predictor.labels, options.report)
        trust.assess_case(image.array, labels, image.grid, volumes, predictor.labels, predictor.training_fingerprint,
                          probabilities, classes, None, options.trust)
        rows.append({"case": path.name, "source_voxels": int(labels.size), "model_voxels": int(classes.size),
                     "foreground_voxels_source": int(np.count_nonzero(labels)),
                     "trust_seconds": round(time.perf_counter() - start, 3)})
    return rows


def observer_cost(model: Path, folds: list[int], tta: bool, repeats: int = 16) -> dict:
    """Seconds of batches of windows through the WindowPredictor with and without the agreement observer.

    Besides the medians with and without (noisy on a shared machine), the observer's own calls are
    timed inside the same runs: their share of the window time is the figure to trust.
    """
    import time

    import torch

    from pipeline.predict import trust
    from pipeline.predict.inference import WindowPredictor
    from pipeline.predict.model import load_predictor

    spent = [0.0]

    class Timed(trust.MemberAgreement):
        def member(self, log_probs):
            start = time.perf_counter()
            super().member(log_probs)
            spent[0] += time.perf_counter() - start

        def ensemble(self, log_probs):
            start = time.perf_counter()
            super().ensemble(log_probs)
            spent[0] += time.perf_counter() - start

    predictor = load_predictor(model, torch.device("cpu"), folds=folds)
    window = WindowPredictor(predictor, "auto", tta, ["SI"])
    batch = torch.rand((4, predictor.in_channels, *predictor.patch_size), generator=torch.Generator().manual_seed(0))
    times = {"without": [], "with": []}
    with torch.inference_mode():
        window(batch)
        for n in range(repeats):
            for name in (("without", "with") if n % 2 == 0 else ("with", "without")):
                observer = Timed.attach(window) if name == "with" else None
                start = time.perf_counter()
                window(batch)
                times[name].append(time.perf_counter() - start)
                if observer is not None:
                    observer.detach()
    median = {name: round(statistics.median(values), 4) for name, values in times.items()}
    return {"members": window.passes_per_window, "batch": list(batch.shape), "median_seconds": median,
            "ratio_with_vs_without_medians": round(median["with"] / median["without"], 4),
            "observer_seconds_per_batch": round(spent[0] / repeats, 5),
            "observer_share_of_window_time": round(spent[0] / sum(times["with"]), 5)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True, help="a folder of volumes")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--labels", type=Path, default=None,
                        help="reference labels of the inputs (<case>.nii.gz): also time the trust step on them")
    parser.add_argument("--ensemble-tta", action="store_true",
                        help="the ensemble variants also mirror along SI (a one-fold model then has two members)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "trust_cost.json")
    args = parser.parse_args()
    load_before = list(os.getloadavg())
    scratch = Path(tempfile.mkdtemp(prefix="ctseg-trust-cost-"))
    files = sorted(p for p in args.input.iterdir() if p.name.endswith((".nii.gz", ".nii", ".nrrd")))[:args.cases]
    listing = scratch / "cases.txt"
    listing.write_text("".join(f"{p.resolve()}\n" for p in files))
    folds = f"predict.folds=[{','.join(str(f) for f in args.folds)}]"
    tta = ["predict.tta=true", "predict.tta_axes=[SI]"] if args.ensemble_tta else []
    variants = {
        "ensemble_trust_off": [folds, *tta, "predict.trust.enabled=false"],
        "ensemble_trust_on": [folds, *tta, "predict.trust.enabled=true"],
        "one_fold_no_tta": [f"predict.folds=[{args.folds[0]}]", "predict.trust.enabled=false"],
        "one_fold_flip_tta": [f"predict.folds=[{args.folds[0]}]", "predict.trust.enabled=false", "predict.tta=true",
                              "predict.tta_axes=[SI]"],
    }
    runs = {name: [] for name in variants}
    names = list(variants)
    try:
        run_variant(args.model, listing, variants[names[0]], scratch)  # warm-up: caches, lazy imports
        for repeat in range(args.repeats):
            order = names if repeat % 2 == 0 else names[::-1]
            for name in order:
                runs[name].append(run_variant(args.model, listing, variants[name], scratch))
                print(name, runs[name][-1], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    observer = observer_cost(args.model, args.folds, args.ensemble_tta)
    print("observer", observer, flush=True)
    worst = foreground_worst_case(args.model, files, args.labels) if args.labels else []
    median = {name: statistics.median(r["case_seconds"] for r in values) for name, values in runs.items()}
    result = {
        "benchmark": "predict with and without the trust checks (flags + confidence), same cases, alternating",
        "model": str(args.model), "cases": [p.name for p in files], "folds": args.folds, "repeats": args.repeats,
        "ensemble_tta": args.ensemble_tta,
        "runs": runs, "median_case_seconds": median,
        "ratio_trust_on_vs_off": round(median["ensemble_trust_on"] / median["ensemble_trust_off"], 3),
        "trust_step_share": round(statistics.median(r["trust_seconds"] for r in runs["ensemble_trust_on"]) /
                                  median["ensemble_trust_on"], 4),
        "ratio_flip_tta_vs_none_one_fold": round(median["one_fold_flip_tta"] / median["one_fold_no_tta"], 3),
        "observer": observer,
        "foreground_worst_case": worst,
        "worst_case_trust_share": round(sum(r["trust_seconds"] for r in worst) / median["ensemble_trust_on"], 4)
        if worst else None,
        "machine": machine_info(load_before),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("median_case_seconds", "ratio_trust_on_vs_off", "trust_step_share",
                                            "ratio_flip_tta_vs_none_one_fold", "worst_case_trust_share",
                                            "observer")},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
