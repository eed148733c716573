"""Check ingest and evaluate together on real data: our RTSTRUCT rasterisation vs the IBSI's own masks.

Ingests ../shared/data/sts_ct (20 patients: CT + RTSTRUCT GTV) through the ingest stage, then runs the
evaluate stage with our rasterised labels as "prediction" and the IBSI's reference/CT_mask.nii.gz as
reference. Writes JSON with per-patient Dice/HD95/surface Dice and the summary.

    python bench/sts_reference.py --output bench/results/sts_reference.json
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import api  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "sts_reference.json")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sts_ct")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"sts_ct data must exist at {args.data}; pass --data", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = tmp / "dataset.yaml"
        template = (REPO / "datasets" / "sts_ct" / "dataset.yaml").read_text()
        dataset.write_text(template.replace("source: ../../../shared/data/sts_ct", f"source: {args.data}"))
        cfg = load_config([], [f"output_root={tmp}", "experiment=sts", f"dataset={dataset}"])
        start = time.perf_counter()
        ingest_report = api.ingest(cfg)
        ingest_seconds = time.perf_counter() - start
        ingest_dir = cfg.stage_dir("ingest")
        pred, ref = tmp / "ours", tmp / "ibsi"
        pred.mkdir()
        ref.mkdir()
        with open(ingest_dir / "private" / "case_mapping.csv") as handle:
            for row in csv.DictReader(handle):
                patient = row["patient_id"]
                (pred / f"{patient}.nii.gz").symlink_to(ingest_dir / "labelsTr" / f"{row['case_id']}.nii.gz")
                (ref / f"{patient}.nii.gz").symlink_to(args.data / patient / "reference" / "CT_mask.nii.gz")
        report = api.evaluate(cfg, pred_dir=pred, ref_dir=ref, output=tmp / "evaluate")
        rows = [dict(r) for r in csv.DictReader(open(tmp / "evaluate" / "metrics.csv"))]
        summary = json.loads((tmp / "evaluate" / "summary.json").read_text())
    result = {
        "what": "Dice of our RTSTRUCT rasterisation (ingest) against the IBSI reference masks, per patient",
        "patients": len(rows),
        "ingest_seconds": round(ingest_seconds, 2),
        "ingest_counts": ingest_report.get("counts"),
        "per_case": [{k: r[k] for k in ("case_id", "dice", "hd95_mm", "surface_dice")} for r in rows],
        "min_dice": min(float(r["dice"]) for r in rows),
        "mean_dice": sum(float(r["dice"]) for r in rows) / len(rows),
        "summary": summary,
        "evaluate_counts": report.get("counts"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"{len(rows)} patients: mean Dice {result['mean_dice']:.4f}, min {result['min_dice']:.4f}; "
          f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
