"""The evaluate stage: pairs predicted and reference label volumes by case and scores them.

Pairing: every ``<case>.nii.gz`` / ``.nii`` / ``.nrrd`` / ``.mha`` in the prediction folder (Slicer
``.seg.nrrd`` files and probability maps are ignored) is matched with the reference file of the same
case id (``<case>.*``, or ``<case>_label.*`` / ``<case>_seg.*``). A prediction folder written by
``ctseg predict`` is read through its ledger when present, so only finished cases count.
Outputs: ``metrics.csv``, ``summary.json``, ``evaluation.html``, ``report.json``.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.config import Config, section_hash
from pipeline.errors import CaseError, CtsegError, InputError
from pipeline.geometry import resample_to_grid
from pipeline.stage import StageRun
from pipeline.volume_io import is_volume_file, load_volume, strip_volume_suffix

log = logging.getLogger("ctseg")

_IGNORED_SUFFIXES = (".seg.nrrd", "_prob.nii.gz", "_probabilities.nii.gz")
_REF_SUFFIXES = ("", "_label", "_seg", "_mask")


def list_volumes(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{folder} must be a folder of label volumes, but it does not exist. Check the path.")
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_volume_file(path) and not path.name.lower().endswith(_IGNORED_SUFFIXES) \
                and not path.name.startswith("."):
            found[strip_volume_suffix(path.name)] = path
    return found


def _ledger_cases(pred_dir: Path) -> set[str] | None:
    """Case ids the predict ledger(s) mark done, or None when the folder has no ledger."""
    from pipeline.predict.ledger import has_ledger, read_case_rows

    if not has_ledger(pred_dir):
        return None
    try:
        return {row.case_id for row in read_case_rows(pred_dir) if row.status == "done"}
    except sqlite3.Error as exc:
        log.warning("evaluate: could not read the ledger of %s (%s); pairing by file names instead", pred_dir, exc)
        return None


def pair_cases(pred_dir: Path, ref_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    predictions = list_volumes(pred_dir)
    done = _ledger_cases(pred_dir)
    if done is not None:
        predictions = {case: path for case, path in predictions.items() if case in done}
    references = list_volumes(ref_dir)
    pairs, unmatched = [], []
    for case, pred_path in predictions.items():
        ref_path = next((references[case + s] for s in _REF_SUFFIXES if case + s in references), None)
        if ref_path is None:
            unmatched.append(case)
        else:
            pairs.append((case, pred_path, ref_path))
    if not pairs:
        raise InputError(f"no prediction in {pred_dir} has a reference of the same case id in {ref_dir} "
                         f"({len(predictions)} predictions, {len(references)} references). Name both <case>.nii.gz.")
    return pairs, unmatched


def class_names(cfg: Config, pred_dir: Path) -> dict[int, str] | None:
    """Label names: from the configured dataset, else from what ``ctseg predict`` wrote beside its label maps.

    Predict writes ``<case>.labels.json`` per case and ``labels.ctbl`` (a Slicer colour table,
    ``value name r g b a``) per folder; a ``labels.json`` of the folder is read too. None: no names
    are known, and classes are named by the values present.
    """
    if cfg.dataset:
        from pipeline.dataset import load_dataset

        return {s.value: s.name for s in load_dataset(cfg.dataset).foreground()}
    names: dict[int, str] = {}
    for sidecar in [pred_dir / "labels.json", *sorted(pred_dir.glob("*.labels.json"))]:
        if not sidecar.is_file():
            continue
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            entries = data.get("labels", data) if isinstance(data, dict) else data
            for entry in entries:
                if int(entry["value"]) != 0:
                    names.setdefault(int(entry["value"]), str(entry["name"]))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("evaluate: label sidecar %s could not be read (%s); skipping it", sidecar, exc)
    table = pred_dir / "labels.ctbl"
    if table.is_file():
        for line in table.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and not line.lstrip().startswith("#") and parts[0].isdigit() and int(parts[0]) != 0:
                names.setdefault(int(parts[0]), parts[1])
    return names or None


def _inputs_key(pairs) -> list:
    return [(case, str(p), p.stat().st_mtime_ns, p.stat().st_size, str(r), r.stat().st_mtime_ns)
            for case, p, r in pairs]


def run_evaluate(cfg: Config, pred_dir: Path, ref_dir: Path, output: Path) -> dict:
    from pipeline.evaluate.metrics import case_metrics
    from pipeline.evaluate.report import (
        format_table,
        overlay_thumbnails,
        worst_cases,
        write_evaluation_html,
        write_metrics_csv,
        write_summary_json,
    )
    from pipeline.evaluate.summary import summarise

    pairs, unmatched = pair_cases(pred_dir, ref_dir)
    run = StageRun.open("evaluate", output, section_hash(cfg.evaluate, _inputs_key(pairs)), force=True)
    names = class_names(cfg, pred_dir)
    options = cfg.evaluate.metrics
    rows, thumbnails, notes = [], {}, []
    if cfg.evaluate.resample_ref:
        notes.append("References were resampled onto each prediction's grid with nearest neighbour "
                     "(--resample-ref); metrics are on the prediction grid.")
    if unmatched:
        notes.append(f"{len(unmatched)} prediction(s) without a reference were skipped: {', '.join(unmatched)}")
    for case, pred_path, ref_path in pairs:
        with run.case(case, {"prediction": str(pred_path), "reference": str(ref_path)}) as record:
            try:
                pred = load_volume(pred_path)
                ref = load_volume(ref_path)
                ref_array = _reference_on_grid(cfg, pred, ref, pred_path, ref_path, record)
                classes = names or {int(v): f"label_{int(v)}" for v in
                                    np.union1d(np.unique(pred.array), np.unique(ref_array)) if v != 0}
                case_rows = case_metrics(pred.array, ref_array, tuple(pred.grid.spacing), classes, options,
                                         case_id=case)
            except CtsegError as exc:
                raise CaseError(case, str(exc)) from exc
            rows.extend(case_rows)
            record.extra["mean_dice"] = float(np.mean([r["dice"] for r in case_rows])) if case_rows else None
            thumbnails[case] = (pred_path, ref_path)
    if not rows:
        run.finish(complete=False)
        raise CtsegError(f"no case in {pred_dir} could be evaluated; see {output / 'report.json'}.")
    summary = summarise(rows)
    images, without_ct = {}, []
    for case in worst_cases(rows, 5):
        pred_path, ref_path = thumbnails[case]
        pred, ref = load_volume(pred_path), load_volume(ref_path)
        ref_array = _reference_on_grid(cfg, pred, ref, pred_path, ref_path, None)
        ct = case_image_on_grid(case, pred_path, ref_path, pred.grid)
        if ct is None:
            without_ct.append(case)
        images[case] = overlay_thumbnails(ct, pred.array, ref_array, tuple(pred.grid.spacing), affine=pred.affine)
    if without_ct:
        notes.append(f"Worst-case thumbnails drawn without the CT for {', '.join(without_ct)}: no image found (looked "
                     f"for predict's input in <case>.provenance.json and for images*/<case>_0000.* beside the "
                     f"reference folder).")
    write_metrics_csv(rows, output / "metrics.csv")
    write_summary_json(summary, output / "summary.json")
    write_evaluation_html(rows, summary, images, output / "evaluation.html", notes)
    table = format_table(rows)
    run.extra.update({"mean_foreground_dice": float(np.mean([r["dice"] for r in rows])), "notes": notes,
                      "table": table, "outputs": {"metrics": str(output / "metrics.csv"),
                                                  "summary": str(output / "summary.json"),
                                                  "html": str(output / "evaluation.html")}})
    return run.finish()


def find_case_image(case: str, pred_path: Path, ref_path: Path) -> Path | None:
    """The CT a prediction was made from: predict's recorded input when it is a volume file, else the
    nnU-Net-style image beside the reference (``labelsTs/<case>.nii.gz`` → ``imagesTs/<case>_0000.nii.gz``)."""
    provenance = pred_path.parent / f"{case}.provenance.json"
    try:
        source = Path(json.loads(provenance.read_text(encoding="utf-8")).get("input", ""))
        if source.is_file() and is_volume_file(source):
            return source
    except (OSError, ValueError, TypeError):
        pass
    folder = ref_path.parent
    if folder.name.lower().startswith("labels"):
        images = folder.parent / ("images" + folder.name[len("labels"):])
        for stem in (f"{case}_0000", case):
            for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
                if (images / f"{stem}{suffix}").is_file():
                    return images / f"{stem}{suffix}"
    return None


def case_image_on_grid(case: str, pred_path: Path, ref_path: Path, grid) -> np.ndarray | None:
    """The case's CT on the prediction's grid (linearly resampled when its grid differs), or None."""
    path = find_case_image(case, pred_path, ref_path)
    if path is None:
        return None
    try:
        image = load_volume(path)
    except CtsegError as exc:
        log.warning("evaluate: thumbnails of %s without the CT: %s", case, exc)
        return None
    if image.grid.difference(grid) is None:
        return np.asarray(image.array, dtype=np.float32)
    return resample_to_grid(np.asarray(image.array, dtype=np.float32), image.grid, grid, order=1, fill=-1024.0)


def _reference_on_grid(cfg: Config, pred, ref, pred_path: Path, ref_path: Path, record) -> np.ndarray:
    from pipeline.evaluate.grids import check_same_grid

    if pred.grid.difference(ref.grid) is None:
        return ref.array
    if not cfg.evaluate.resample_ref:
        check_same_grid(pred_path, pred.grid, ref_path, ref.grid)
    if record is not None:
        record.warnings.append(f"reference resampled (nearest) from {ref.grid.shape} onto the prediction grid")
    return resample_to_grid(ref.array, ref.grid, pred.grid, order=0, fill=0)


def run_compare(cfg: Config, run_a: Path, run_b: Path, output: Path | None) -> dict:
    """Paired per-class comparison of two evaluation folders (their metrics.csv)."""
    from pipeline.evaluate.report import read_metrics_csv, write_comparison
    from pipeline.evaluate.summary import compare_runs

    rows_a = read_metrics_csv(_metrics_path(run_a))
    rows_b = read_metrics_csv(_metrics_path(run_b))
    comparison = compare_runs(rows_a, rows_b)
    output = output or run_b / f"compare_vs_{run_a.name}"
    write_comparison(comparison, output, run_a, run_b)
    report = {"stage": "compare", "status": "ok", "folder": str(output), "run_a": str(run_a),
              "run_b": str(run_b), "comparison": comparison}
    atomic.write_json(output / "report.json", report)
    return report


def _metrics_path(folder: Path) -> Path:
    path = folder / "metrics.csv" if folder.is_dir() else folder
    if not path.is_file():
        raise InputError(f"{path} must be the metrics.csv of an evaluation run, but it does not exist. "
                         f"Run 'ctseg evaluate' for that run first.")
    return path
