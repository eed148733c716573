"""Real data: 5-fold CPU cross-validation of the clinical GTV on ../shared/data/sts_ct, scored on each CT's own grid.

    python bench/sts_cv.py --output bench/results/sts_cv.json

Runs the pipeline as a user would, with ``configs/sts_ct.yaml``: ingest (20 patients, RTSTRUCT read
through ingest) → preprocess → train (5 folds). Stages that are already up to date are not redone;
the JSON then takes each stage's compute time from its own ``report.json``.

Then, for every fold k, the network of fold k alone (``predict.folds=[k]``) segments the patients
that fold k held out, through the normal predict stage (labels back on the source CT grid), and
the evaluate stage scores them against the ingested RTSTRUCT masks. Every patient is thus scored
exactly once, by a network that never saw it. The training's own validation Dice (on the model
grid, one validation at the last step, so no checkpoint was picked with it) is reported beside it.

Postprocessing: predict applies the model folder's decided clean-up (``postprocessing.json``, decided by the
train stage on these same held-out predictions) by default; the figures are given with it (``source_grid``) and
without it (``source_grid_without_postprocessing``, a second predict run with
``predict.postprocess.model_decision=none``, done only when the decision keeps a rule for some class: otherwise
the labels are the same). The "with" figure is in-sample for the decision (chosen on these cases), as nnU-Net's
cross-validation figure after postprocessing is.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_machine import machine_info  # noqa: E402

CONFIG = REPO / "configs" / "sts_ct.yaml"


def stage_seconds(folder: Path) -> float | None:
    report = folder / "report.json"
    if not report.is_file():
        return None
    return json.loads(report.read_text()).get("seconds")


def dice_summary(rows: list[dict]) -> dict:
    """Mean, median, extremes, the worst three cases and the median HD95 of evaluate's metric rows."""
    dice = [float(r["dice"]) for r in rows]
    hd95 = [float(r["hd95_mm"]) for r in rows if r["hd95_mm"] not in ("", "nan", "inf")]
    worst = sorted(rows, key=lambda r: float(r["dice"]))[:3]
    return {"cases": len(dice), "mean_dice": round(statistics.mean(dice), 4),
            "median_dice": round(statistics.median(dice), 4), "min_dice": round(min(dice), 4),
            "max_dice": round(max(dice), 4), "worst_3": {r["case_id"]: round(float(r["dice"]), 4) for r in worst},
            "median_hd95_mm": round(statistics.median(hd95), 2) if hd95 else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "sts_cv.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every stage, e.g. --set experiment=sts_short --set "
                             "train.max_steps=100 (a shorter training than configs/sts_ct.yaml; say so with figures)")
    args = parser.parse_args()
    load_before = list(os.getloadavg())

    from pipeline import api, atomic
    from pipeline.config import load_config

    os.chdir(REPO)  # the config's dataset path and outputs/ are relative to the repository
    cfg = load_config([str(CONFIG)], list(args.overrides))
    walls = {}
    for name, run in (("ingest", api.ingest), ("preprocess", api.preprocess), ("train", api.train)):
        start = time.perf_counter()
        run(cfg)
        walls[name] = round(time.perf_counter() - start, 1)
    train_dir = cfg.stage_dir("train")
    train_report = json.loads((train_dir / "report.json").read_text())
    splits = json.loads((train_dir / "splits.json").read_text())["folds"]
    images = cfg.stage_dir("ingest") / "imagesTr"
    references = cfg.stage_dir("ingest") / "labelsTr"
    cv_root = cfg.experiment_dir / "cv"

    from pipeline.models.folder import read_postprocessing

    decision = read_postprocessing(train_dir / "model")
    if decision is None and train_report.get("complete"):  # a model trained before ctseg decided postprocessing
        from pipeline.train.postprocessing import decide_for_trained_model

        decision = decide_for_trained_model(cfg)
    any_rule = bool(decision) and any(entry.get("rule") for entry in decision["classes"].values())

    def predict_and_score(fold: int, listing: Path, name: str, extra: list[str]) -> list[dict]:
        """Predict the fold's held-out cases with its own network into cv/<name>, evaluate; the metric rows."""
        fold_cfg = load_config([str(CONFIG)], [*args.overrides, f"predict.folds=[{fold}]",
                                               "predict.outputs.dicom_seg=false", *extra])
        result = api.predict(fold_cfg, model_dir=train_dir / "model", input_path=listing, output=cv_root / name)
        if result.exit_code != 0:
            print(f"fold {fold}: some held-out cases failed to predict; see {cv_root / name}/report.html",
                  file=sys.stderr)
        api.evaluate(fold_cfg, pred_dir=cv_root / name, ref_dir=references, output=cv_root / f"{name}_evaluate")
        with open(cv_root / f"{name}_evaluate" / "metrics.csv", newline="") as handle:
            return [dict(row, fold=fold) for row in csv.DictReader(handle)]

    rows, rows_without, per_fold, predict_seconds = [], [], [], 0.0
    trained = {int(f["fold"]) for f in json.loads((train_dir / "model" / "model.json").read_text())["folds"]}
    for split in splits:
        fold = int(split["fold"])
        if fold not in trained:  # a partial cross-validation (train.train_folds): score the folds it has
            continue
        listing = cv_root / f"fold_{fold}_cases.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(listing, "".join(f"{(images / f'{case}_0000.nii.gz').resolve()}\n"
                                           for case in split["val"]))
        start = time.perf_counter()
        fold_rows = predict_and_score(fold, listing, f"fold_{fold}", [])
        if any_rule:
            rows_without.extend(predict_and_score(fold, listing, f"fold_{fold}_without_postprocessing",
                                                  ["predict.postprocess.model_decision=none"]))
        predict_seconds += time.perf_counter() - start
        trusted = {c["id"]: c.get("trust") or {} for c in json.loads(
            (cv_root / f"fold_{fold}" / "report.json").read_text())["cases"]}
        for row in fold_rows:
            entry = trusted.get(row["case_id"], {})
            row.update(confidence=entry.get("confidence"), needs_review=entry.get("needs_review"),
                       trust_flags=[f["code"] for f in entry.get("flags", [])], entropy=entry.get("entropy"))
        rows.extend(fold_rows)
        per_fold.append({"fold": fold, "cases": len(fold_rows),
                         "mean_dice": round(statistics.mean(float(r["dice"]) for r in fold_rows), 4)})

    if not any_rule:
        rows_without = rows  # no rule kept (or no decision): the labels are the very same
    cross_validation = train_report.get("cross_validation", {})
    scored = [(float(r["confidence"]), float(r["dice"])) for r in rows if r.get("confidence") is not None]
    from scipy.stats import spearmanr

    rho = spearmanr([c for c, _ in scored], [d for _, d in scored]) if len(scored) > 2 else None
    trust_summary = {
        "cases_scored": len(scored),
        "spearman_confidence_vs_dice": None if rho is None else round(float(rho.statistic), 3),
        "spearman_p_value": None if rho is None else round(float(rho.pvalue), 4),
        "needs_review": sum(bool(r.get("needs_review")) for r in rows),
        "unfamiliar_input": sum(any(f in ("spacing", "field_of_view", "hu_distribution") for f in r["trust_flags"])
                                for r in rows),
        "flag_counts": {code: sum(code in r["trust_flags"] for r in rows)
                        for code in sorted({f for r in rows for f in r["trust_flags"]})},
        "note": "one network per held-out case (predict.folds=[k]): no ensemble term, confidence = entropy and flags",
    }
    # training may run in several invocations (train.train_folds): its time is the sum over the folds below
    compute = {name: stage_seconds(cfg.stage_dir(name)) for name in ("ingest", "preprocess")}
    result = {
        "benchmark": "sts_ct 5-fold cross-validation of the GTV (CPU)",
        "command": "python bench/sts_cv.py (stages: ctseg ingest/preprocess/train -c configs/sts_ct.yaml)",
        "config": str(CONFIG.relative_to(REPO)),
        "patients": len(rows),
        "source_grid": {
            **dice_summary(rows),
            "postprocessing": "the model folder's decided clean-up (predict's default)",
            "per_fold": per_fold,
            "per_case": [{"case": r["case_id"], "fold": r["fold"], "dice": round(float(r["dice"]), 4),
                          "volume_ref_ml": round(float(r["volume_ref_ml"]), 1),
                          "volume_pred_ml": round(float(r["volume_pred_ml"]), 1), "flags": r["flags"],
                          "confidence": r.get("confidence"), "entropy": r.get("entropy"),
                          "trust_flags": r.get("trust_flags")}
                         for r in rows],
        },
        "source_grid_without_postprocessing": {
            **dice_summary(rows_without),
            "note": "predict.postprocess.model_decision=none" if any_rule else
            "the same labels as source_grid: the decision kept no rule (or the model folder has none)",
            "per_case": {r["case_id"]: round(float(r["dice"]), 4) for r in rows_without}},
        "postprocessing_decision": None if decision is None else {
            "source": decision["source"], "cases": decision["cases"], "grid": decision.get("grid"),
            "classes": {name: {k: entry.get(k) for k in ("rule", "dice_without", "dice_with", "reason")}
                        for name, entry in decision["classes"].items()}},
        "model_grid_validation": {"mean_dice": cross_validation.get("mean_dice"),
                                  "cases": cross_validation.get("cases"),
                                  "note": "the training's own validation at its last step (val_every = max_steps)"},
        "trust": trust_summary,
        "overrides": list(args.overrides),
        "stage_compute_seconds": compute,
        "training_minutes_all_folds": round(sum(f.get("seconds", 0) for f in train_report.get("folds", [])) / 60, 1),
        "this_run_wall_seconds": {**walls, "cv_predict_and_evaluate": round(predict_seconds, 1)},
        "machine": machine_info(load_before),
    }
    atomic.write_json(args.output, result)
    print(json.dumps({k: result[k] for k in ("patients", "training_minutes_all_folds")} |
                     {"source_grid_mean_dice": result["source_grid"]["mean_dice"],
                      "source_grid_mean_dice_without_postprocessing":
                          result["source_grid_without_postprocessing"]["mean_dice"],
                      "model_grid_mean_dice": cross_validation.get("mean_dice"), "trust": trust_summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
