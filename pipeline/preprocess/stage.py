"""The preprocess stage: fingerprint and plan the training set, then resample and cache every case.

Output folder (``<experiment>/preprocess``)::

    fingerprint.json        per-case spacing/size/body extent and the HU statistics inside labels
    plan.json               target spacing, intensity handling, crop, patch/batch sizes (plan.py)
    index.json, arrays/     the cache the train stage reads (format, writer and reader: cache.py)

Cached arrays are reused across runs (even when the stage re-runs because, say, the memory budget
changed) as long as their ``transform_key`` (the plan fields that change arrays) and the source
files' size and modification time are unchanged; otherwise they are recomputed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.config import Config, section_hash
from pipeline.errors import CaseError, InputError
from pipeline.ingest.manifest import MANIFEST_FILE, read_manifest
from pipeline.preprocess import cache
from pipeline.preprocess.fingerprint import TrainingCase, case_fingerprint, load_case, source_identity
from pipeline.preprocess.plan import intensity_statistics, make_plan
from pipeline.preprocess.transform import prepare_image, prepare_label
from pipeline.progress import Progress
from pipeline.stage import CaseRecord, StageRun, reset_folder, upstream_hash

log = logging.getLogger("ctseg")

def training_cases(ingest_dir: Path) -> tuple[list[TrainingCase], list[dict]]:
    """The manifest's labelled training cases and its label descriptions."""
    manifest = read_manifest(ingest_dir)
    path = ingest_dir / MANIFEST_FILE
    cases = [TrainingCase(c["id"], ingest_dir / c["image"], ingest_dir / c["label"])
             for c in manifest.get("cases", []) if c.get("role") == "train" and c.get("label")]
    if not cases:
        raise InputError(f"{path} must list at least one training case with a label, got none. Give the "
                         f"dataset labelled cases with role 'train' (labelsTr/ or 'label:' in dataset.yaml).")
    labels = manifest.get("labels") or []
    if not any(int(lbl["value"]) != 0 for lbl in labels):
        raise InputError(f"{path} must describe at least one foreground label (value > 0), got {labels}. "
                         f"List the label names and values under 'labels:' in dataset.yaml.")
    return cases, labels


def run_preprocess(cfg: Config, force: bool = False) -> dict:
    """Fingerprint, plan and cache the training set of the experiment's ingest folder."""
    ingest_dir = cfg.stage_dir("ingest")
    out = cfg.stage_dir("preprocess")
    # the planned patch/batch size depends on the network width, so a new width re-plans (arrays are reused)
    stage_hash = section_hash(cfg.preprocess, {"channels": list(cfg.train.channels)},
                              upstream_hash(ingest_dir, "ingest"))
    if force:  # a forced run recomputes everything, cached arrays included
        reset_folder(out)
    run = StageRun.open("preprocess", out, stage_hash, force=force)
    if run.skipped_up_to_date:
        log.info("preprocess: %s is up to date; nothing to do", out)
        return {"stage": "preprocess", "status": "up_to_date", "folder": str(out)}

    cases, labels = training_cases(ingest_dir)
    allowed = {int(lbl["value"]) for lbl in labels} | {0}
    fingerprint = _fingerprint(cases, labels, allowed, cfg, run)
    plan = make_plan(fingerprint, cfg)
    atomic.write_json(out / "fingerprint.json", fingerprint)
    atomic.write_json(out / "plan.json", plan)
    log.info("preprocess: target spacing %s mm, intensity %s, 3d patch %s × %d", plan["target_spacing"],
             plan["intensity"]["mode"], plan["configurations"]["3d"]["patch_size"],
             plan["configurations"]["3d"]["batch_size"])

    index = []
    with Progress(len(cases), "preprocess: caching", unit="case") as progress:
        for case in cases:
            with run.case(case.id, {"image": str(case.image), "label": str(case.label)}) as record:
                if record is not None:
                    entry = _cache_case(case, plan, allowed, cfg, out, record)
                    record.extra["index"] = entry
                    index.append(entry)
                else:
                    index.append(run.records[case.id].extra["index"])
            progress.update()
    cache.write_index(out, plan["transform_key"], index)
    run.extra["plan"] = {k: plan[k] for k in ("target_spacing", "intensity", "configurations", "overrides")}
    run.extra["reused_arrays"] = sum(bool(r.extra.get("cache_reused")) for r in run.records.values())
    report = run.finish()
    if run.failed:
        raise _bad_cases_error(run.failed)
    return report


def _fingerprint(cases: list[TrainingCase], labels: list[dict], allowed: set[int], cfg: Config,
                 run: StageRun) -> dict:
    options = cfg.preprocess
    records, samples, failed = [], [], []
    with Progress(len(cases), "preprocess: fingerprint", unit="case") as progress:
        for case in cases:
            try:
                image, label = load_case(case, allowed)
                record, hu = case_fingerprint(case, image, label, options.body_threshold_hu,
                                              options.intensity_samples_per_case)
                records.append(record)
                samples.append(hu)
            except CaseError as exc:
                failed.append(CaseRecord(id=case.id, status="failed", error=str(exc), hash=run.hash))
            progress.update()
    if failed:  # every bad case is reported at once, before anything is cached or trained
        for failure in failed:
            run.records[failure.id] = failure
        run.finish(complete=False)
        raise _bad_cases_error(failed)
    return {"cases": records, "labels": labels,
            "foreground_hu": intensity_statistics(np.concatenate(samples), options.percentile_low,
                                                  options.percentile_high)}


def _bad_cases_error(failed: list[CaseRecord]) -> InputError:
    details = " | ".join(r.error for r in failed[:5])
    more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
    return InputError(f"{len(failed)} training case(s) must be fixed before training: {details}{more}. "
                      f"See preprocess/report.json for the full list.")


def _cache_case(case: TrainingCase, plan: dict, allowed: set[int], cfg: Config, out: Path,
                record: CaseRecord) -> dict:
    paths = cache.case_paths(out, case.id)
    key = {"transform_key": plan["transform_key"], "image": source_identity(case.image),
           "label": source_identity(case.label), "cache_dtype": cfg.preprocess.cache_dtype}
    entry = {"id": case.id, **{k: str(p.relative_to(out)) for k, p in paths.items()}}
    record.outputs = {k: str(p) for k, p in paths.items()}
    meta = cache.read_meta(paths["meta"])
    if meta and meta.get("key") == key and paths["image"].is_file() and paths["label"].is_file():
        record.extra["cache_reused"] = True
        record.extra["shape"] = meta["grid"]["shape"]
        return entry

    image, label = load_case(case, allowed)
    prepared = prepare_image(image, plan)
    lookup = np.zeros(max(allowed) + 1, dtype=np.uint8)
    for index, value in enumerate(plan["class_values"]):
        lookup[value] = index
    classes = lookup[prepare_label(label, prepared.grid).astype(np.int64)]
    counts = np.bincount(classes.ravel(), minlength=len(plan["class_values"]))
    missing = [lbl["name"] for lbl, c in zip(plan["labels"], counts[1:]) if c == 0 and
               int(np.count_nonzero(label.array == lbl["value"]))]
    if missing:
        record.warnings.append(f"labels {missing} vanish at the target spacing {plan['target_spacing']} mm "
                               f"(too small); consider a finer preprocess.target_spacing")
    if not counts[1:].any():
        raise CaseError(case.id, f"label must keep at least one labelled voxel on the model grid, got none at "
                                 f"{plan['target_spacing']} mm. Use a finer preprocess.target_spacing.")
    dtype = np.float16 if cfg.preprocess.cache_dtype == "float16" else np.float32
    cache.save_array(paths["image"], prepared.array.astype(dtype))
    cache.save_array(paths["label"], classes)
    cache.write_meta(paths["meta"], {
        "id": case.id, "key": key, "grid": prepared.grid.to_json(), "source_grid": prepared.source_grid.to_json(),
        "class_voxels": counts.tolist()})
    record.extra["shape"] = list(prepared.array.shape)
    return entry
