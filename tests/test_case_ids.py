"""One case id per series everywhere: ingest, predict (straight from DICOM) and evaluate pair the same cases."""
from __future__ import annotations

import csv
import re

import numpy as np
import yaml

from pipeline import api
from pipeline.config import load_config
from pipeline.predict.cases import discover_cases
from pipeline.predict.stage import run_predict
from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series
from pipeline.synthetic.phantoms import PhantomOptions, make_phantom

from helpers.predict import write_small_model
from helpers.rt_export import write_rt_export


def _ingest_ids(out) -> dict[str, str]:
    with open(out / "private" / "case_mapping.csv", newline="") as handle:
        return {row["patient_id"]: row["case_id"] for row in csv.DictReader(handle)}


def test_predict_from_dicom_then_evaluate_pairs_with_ingested_labels(tmp_path, caplog):
    export = tmp_path / "export"
    write_rt_export(export)
    dataset = tmp_path / "dataset.yaml"
    dataset.write_text(yaml.safe_dump({"name": "rt", "source": str(export), "exclude": ["^z_"],
                                       "labels": [{"name": "background", "value": 0},
                                                  {"name": "liver", "value": 1, "regex": ["^gtv"]}]}))
    cfg = load_config([], [f"output_root={tmp_path / 'outputs'}", f"dataset={dataset}"])
    ingest_dir = tmp_path / "ingest"
    api.ingest(cfg, output=ingest_dir)
    ingested = _ingest_ids(ingest_dir)
    # predict straight from the DICOM export, and from one patient's folder of it: the same ids as ingest
    discovered = {case.case_id for case in discover_cases(export, cfg.ingest).cases}
    assert discovered == set(ingested.values())
    assert [c.case_id for c in discover_cases(export / "RT002", cfg.ingest).cases] == [ingested["RT002"]]

    model = write_small_model(tmp_path / "model")
    plain = load_config([], [f"output_root={tmp_path / 'outputs'}"])  # standalone: no dataset configured
    with caplog.at_level("INFO", logger="ctseg"):
        result = run_predict(plain, model, export, tmp_path / "pred")
    assert result.exit_code == 0
    lines = [r.getMessage() for r in caplog.records if re.match(r"\[\d/4\] case_", r.getMessage())]
    assert len(lines) == 4 and all(re.fullmatch(r"\[[1-4]/4\] case_[0-9a-f]{12}: done in \d+\.\d s"
                                                r"( \(\d+ warnings?\))?", line) for line in lines), lines
    assert not any("pending" in r.getMessage() for r in caplog.records)
    assert {c["id"] for c in result.report["cases"]} == set(ingested.values())
    report = api.evaluate(plain, pred_dir=tmp_path / "pred", ref_dir=ingest_dir / "labelsTr",
                          output=tmp_path / "evaluate")
    evaluated = {c["id"] for c in report["cases"]}
    assert evaluated == {ingested["RT001"], ingested["RT002"]}  # the two cases with a GTV label map
    # class names come from predict's own sidecars, not label_<n>
    with open(tmp_path / "evaluate" / "metrics.csv", newline="") as handle:
        classes = {row["class_name"] for row in csv.DictReader(handle)}
    assert "label_1" not in classes and classes <= {"liver", "spleen", "kidneys"} and classes


def test_predict_honours_ingest_select(tmp_path):
    export = tmp_path / "export"
    for number, (patient, description) in enumerate([("P1", "ABDOMEN STANDARD"), ("P2", "LUNG SHARP")]):
        phantom = make_phantom(number, PhantomOptions(shape=32, slices=12, noise_hu=0.0))
        write_ct_series(phantom.image, export / patient, SeriesWriteOptions(patient_id=patient,
                                                                            series_description=description))
    everything = load_config([], [])
    assert len(discover_cases(export, everything.ingest).cases) == 2
    cfg = load_config([], ["ingest.select.exclude_description_regex=^lung"])
    found = discover_cases(export, cfg.ingest)
    assert len(found.cases) == 1  # was 2: predict read 'ingest.selection', which does not exist
    assert any("LUNG" in note or "not selected" in note for note in found.skipped)
    ids = {case.case_id for case in found.cases}
    ingest = api.ingest(cfg, source=export, output=tmp_path / "ingest")
    assert {c["id"] for c in ingest["cases"]} == ids


def test_case_id_scheme_is_documented_once_and_anonymous():
    from pipeline.case_ids import series_case_id

    class Series:
        key = "uid:1.2.3/4.5.6"
        patient_id = "DOE 123"
        series_number = 7

    case_id = series_case_id(Series())
    assert case_id.startswith("case_") and len(case_id) == 17 and "123" not in case_id
    assert series_case_id(Series()) == case_id
    assert series_case_id(Series(), anonymise=False) == "DOE_123_7"
    assert np.all([c.isalnum() or c in "_-" for c in case_id])


def test_train_without_a_dataset_says_so_first(tmp_path, capsys):
    from pipeline.cli import main

    for verb in ("train", "preprocess"):
        assert main([verb, "--set", f"output_root={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert "no dataset is configured" in err and "--set dataset=" in err and "dataset.suggested.yaml" in err
        assert "Run 'ctseg preprocess'" not in err and err.count("ctseg: error") == 1


def test_evaluate_reads_class_names_from_the_colour_table(tmp_path):
    from pipeline.evaluate.stage import class_names

    (tmp_path / "labels.ctbl").write_text("# Color table file written by ctseg predict\n0 background 0 0 0 0\n"
                                          "1 liver 221 130 101 255\n3 GTV_Mass 255 0 0 255\n")
    assert class_names(load_config([], []), tmp_path) == {1: "liver", 3: "GTV_Mass"}


def test_all_cases_failing_prints_each_reason_once(tmp_path, capsys, caplog):
    from pipeline.cli import main

    phantom = make_phantom(1, PhantomOptions(shape=32, slices=12, noise_hu=0.0))
    phantom.image.array[:] = 200  # no air anywhere: not plausible CT, refused below
    write_ct_series(phantom.image, tmp_path / "export" / "P1", SeriesWriteOptions(patient_id="P1"))
    code = main(["ingest", str(tmp_path / "export"), "--output", str(tmp_path / "out"),
                 "--set", f"output_root={tmp_path}", "--set", "ingest.plausibility.refuse=true"])
    err = capsys.readouterr().err
    assert code == 1 and "no case could be ingested" in err
    reason = "must look like a CT volume in HU"
    assert reason not in err  # the final error does not repeat the case's reason ...
    assert sum(reason in record.getMessage() for record in caplog.records) == 1  # ... logged once for the case
