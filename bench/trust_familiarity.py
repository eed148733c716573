"""Real data: does the unfamiliar-input check tell phantoms from real CTs, and sts_ct from itself?

    python bench/trust_familiarity.py --output bench/results/trust_familiarity.json

Builds training fingerprints (pipeline/models/training_fingerprint.py) exactly as ``ctseg train``
does, without training a network (the input check depends on the inputs only):

1. from the 8 demo phantoms (``ctseg demo``'s defaults), then checks the 3 held-out demo phantoms
   and every real CT of ``../shared/data`` (sts_ct, totalseg, dcmqi, pyradiomics, dcm_qa_ct),
   read through predict's own case discovery and reader: every real CT should be flagged;
2. from the sts_ct training cases as ingested (``outputs/sts_ct/ingest``; run
   ``ctseg ingest -c configs/sts_ct.yaml`` first), leaving each patient out in turn and checking
   that patient against the other 19: few or none should be flagged.

The JSON holds every case's distance, limit and flags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_machine import machine_info  # noqa: E402  (after the sys.path set-up above)

REAL_INPUTS = ["sts_ct", "totalseg/example_ct.nii.gz", "totalseg/example_ct_dicom", "dcmqi/ct-3slice",
               "pyradiomics/lung1_image.nrrd", "dcm_qa_ct/Philips/S21570"]


def check(fingerprint, volume, options) -> dict:
    from pipeline.predict import trust

    flags, measured = trust.input_flags(volume.array, volume.grid, fingerprint, options)
    return {"flags": [f.to_json() for f in flags], "unfamiliar": bool(flags), **measured}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "trust_familiarity.json")
    parser.add_argument("--shared", type=Path, default=Path("/work/shared/data"))
    args = parser.parse_args()
    from pipeline import training_fingerprint as tfp
    from pipeline.config import Config
    from pipeline.demo_options import DemoConfig
    from pipeline.predict.cases import discover_cases, read_case
    from pipeline.preprocess.fingerprint import load_case
    from pipeline.preprocess.stage import training_cases
    from pipeline.synthetic.phantoms import LABEL_NAMES, PhantomOptions, make_phantom

    cfg = Config()
    options = cfg.predict.trust
    threshold = cfg.preprocess.body_threshold_hu
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    result = {"machine": None, "options": {k: getattr(options, k) for k in vars(options)}}

    # 1. demo phantoms
    demo = DemoConfig()
    popts = PhantomOptions(shape=demo.in_plane_size, slices=demo.slices)
    labels = [{"name": n, "value": v} for v, n in LABEL_NAMES.items()]
    phantoms = [make_phantom(seed=i, options=popts) for i in range(demo.train_cases + demo.test_cases)]
    stats = [tfp.case_statistics(p.image.array, p.label.array, p.image.grid, list(LABEL_NAMES), threshold)
             for p in phantoms[:demo.train_cases]]
    phantom_fp = tfp.build(stats, labels)
    rows, other_real = [], []
    for n, p in enumerate(phantoms[demo.train_cases:]):
        rows.append({"case": f"held-out phantom {n}", **check(phantom_fp, p.image, options)})
    for relative in REAL_INPUTS:
        path = args.shared / relative
        if not path.exists():
            rows.append({"case": relative, "error": "missing"})
            continue
        try:
            discovery = discover_cases(path, cfg.ingest, 1)
        except Exception as exc:  # predict refuses the input as a whole (e.g. too few slices)
            rows.append({"case": relative, "error": str(exc).splitlines()[0]})
            continue
        for case in discovery.cases:
            try:
                image = read_case(case, cfg.ingest, refuse_implausible=True)
            except Exception as exc:  # a refused input is reported, not checked
                rows.append({"case": f"{relative}:{case.case_id}", "error": str(exc).splitlines()[0]})
                continue
            rows.append({"case": f"{relative}:{case.case_id}", **check(phantom_fp, image.volume, options)})
            if not relative.startswith("sts_ct"):
                other_real.append((f"{relative}:{case.case_id}", image.volume))
    result["phantom_model"] = {
        "training_cases": demo.train_cases, "nearest_other_wasserstein_hu":
            phantom_fp["hu_histogram"]["nearest_other_wasserstein_hu"], "cases": rows,
        "real_flagged": sum(r.get("unfamiliar", False) for r in rows if not r["case"].startswith("held-out")),
        "real_checked": sum("unfamiliar" in r for r in rows if not r["case"].startswith("held-out")),
        "held_out_phantoms_flagged": sum(r.get("unfamiliar", False) for r in rows if r["case"].startswith("held-out"))}

    # 2. sts_ct, leave one patient out
    ingest_dir = REPO / "outputs" / "sts_ct" / "ingest"
    if (ingest_dir / "manifest.json").is_file():
        cases, sts_labels = training_cases(ingest_dir)
        allowed = {int(lbl["value"]) for lbl in sts_labels} | {0}
        values = sorted(allowed - {0})
        loaded = [load_case(case, allowed) for case in cases]
        sts_stats = [tfp.case_statistics(i.array, lbl.array, i.grid, values, threshold) for i, lbl in loaded]
        sts_rows = []
        for n, (image, _label) in enumerate(loaded):
            others = tfp.build(sts_stats[:n] + sts_stats[n + 1:], sts_labels)
            sts_rows.append({"case": f"sts_ct patient {n}", **check(others, image, options)})
        result["sts_ct_leave_one_out"] = {"cases": sts_rows, "flagged": sum(r["unfamiliar"] for r in sts_rows),
                                          "checked": len(sts_rows)}
        # 3. the full sts_ct fingerprint (a thigh/knee sarcoma model) against the other real CTs
        full = tfp.build(sts_stats, sts_labels)
        others = [{"case": name, **check(full, volume, options)} for name, volume in other_real]
        result["sts_ct_model_other_real_ct"] = {"cases": others, "flagged": sum(r["unfamiliar"] for r in others),
                                                "checked": len(others)}
    result["machine"] = machine_info(load_before)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    for section in ("phantom_model", "sts_ct_leave_one_out", "sts_ct_model_other_real_ct"):
        if section not in result:
            continue
        print(f"== {section}")
        for r in result[section]["cases"]:
            if "error" in r:
                print(f"  {r['case']:<48} refused/skipped: {r['error'][:80]}")
                continue
            print(f"  {r['case']:<48} W1 {r['hu_wasserstein_hu']!s:>7} HU (limit {r['hu_limit_hu']}) unseen "
                  f"{r['hu_unseen_fraction']:.3f} flags {[f['code'] for f in r['flags']]}")
    print(json.dumps({k: v for k, v in result["phantom_model"].items() if k != "cases"}))
    if "sts_ct_leave_one_out" in result:
        print("sts_ct flagged", result["sts_ct_leave_one_out"]["flagged"], "of",
              result["sts_ct_leave_one_out"]["checked"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
