"""The morning report a clinician reads at a glance, and the evaluation's worst cases drawn over the CT."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from pipeline.config import Config
from pipeline.geometry import Volume
from pipeline.predict.ledger import CaseRow
from pipeline.predict.model import LabelInfo
from pipeline.predict.report import _overlay, write_html, write_thumbnail
from pipeline.synthetic.phantoms import PhantomOptions, make_phantom
from pipeline.volume_io import save_nifti

INFOS = [LabelInfo(1, "liver", (221, 130, 101)), LabelInfo(2, "spleen", (157, 108, 162)),
         LabelInfo(3, "kidneys", (185, 102, 83))]
LONG_WARNING = ("RTSTRUCT not written: case c1: an RTSTRUCT needs every source image to be one slice of the volume, "
                "got an image at voxel index [0.0, 0.325, 1.0] (the series was resampled, e.g. for gantry tilt or "
                "missing slices). Use the .seg.nrrd or NIfTI output." * 2)


def _row(case_id: str, thumbnail: str | None, warnings: list[str]) -> CaseRow:
    outputs = {"labels": {"path": f"{case_id}.nii.gz", "sha256": "0"}}
    if thumbnail:
        outputs["thumbnail"] = {"path": thumbnail, "sha256": "0"}
    return CaseRow(case_id=case_id, input=f"/exports/{case_id}", status="done", error=None, shard=None, attempts=1,
                   settings_hash=None, run_id=None, host=None, pid=None, proc_start=None, started=None, updated=0.0,
                   seconds=2.5, timings={}, outputs=outputs, warnings=warnings,
                   summary={"volumes": {"liver": {"volume_ml": 1500.0}, "spleen": {"volume_ml": 200.0},
                                        "kidneys": {"volume_ml": 300.0}}})


def test_report_has_a_legend_and_puts_thumbnails_on_their_own_row(tmp_path: Path):
    phantom = make_phantom(3, PhantomOptions(shape=48, slices=16, noise_hu=0.0))
    write_thumbnail(phantom.image.array, phantom.label.array, phantom.image.grid, INFOS, tmp_path / "c1.thumb.png",
                    title="c1")
    rows = [_row("c1", "c1.thumb.png", [LONG_WARNING, "liver: touches the image border (left)"]),
            _row("c2", None, [])]
    page = write_html(tmp_path / "report.html", tmp_path, rows, {"cases": 2}, [i.name for i in INFOS],
                      [i.color for i in INFOS]).read_text(encoding="utf-8")
    legend = re.search(r"<ul class='legend'.*?</ul>", page, re.S).group(0)
    for info in INFOS:
        assert f"background:rgb({info.color[0]},{info.color[1]},{info.color[2]})'></span>{info.name}</li>" in legend
    section = re.search(r"<section class='case' id='c1'>.*?</section>", page, re.S).group(0)
    # warnings sit in a wrapping block, the thumbnail after the case's details, outside any table
    notes = section.index("<div class='notes'>")
    image = section.index("<img ")
    assert notes < section.index(LONG_WARNING[:40]) < image
    assert "</table>" in section[:notes] and "<table" not in section[image:]
    assert "overflow-wrap:anywhere" in page and "img{max-width:100%" in page
    assert "files: c1.nii.gz, c1.thumb.png" in section
    assert "<section class='case' id='c2'>" in page and "no warnings" in page


def test_thumbnail_outlines_labels_and_carries_a_legend(tmp_path: Path):
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[1:5, 1:5] = 1
    colors = np.array([[0, 0, 0], [1.0, 0.5, 0.25]], dtype=np.float32)
    rgba = _overlay(labels, colors)
    assert rgba[1, 1, 3] == 1.0 and rgba[2, 2, 3] == np.float32(0.45) and rgba[0, 0, 3] == 0.0
    phantom = make_phantom(3, PhantomOptions(shape=48, slices=16, noise_hu=0.0))
    with_labels = write_thumbnail(phantom.image.array, phantom.label.array, phantom.image.grid, INFOS,
                                  tmp_path / "a.png")
    without = write_thumbnail(phantom.image.array, np.zeros_like(phantom.label.array), phantom.image.grid, INFOS,
                              tmp_path / "b.png")
    # the legend adds a strip below the views; a case without labels has none
    assert mpimg.imread(with_labels).shape[0] > mpimg.imread(without).shape[0]


def test_evaluation_worst_cases_are_drawn_over_the_ct(tmp_path: Path):
    from pipeline.evaluate.stage import run_evaluate

    for n in range(2):
        phantom = make_phantom(20 + n, PhantomOptions(shape=48, slices=16, noise_hu=5.0))
        save_nifti(phantom.image, tmp_path / "ingest" / "imagesTs" / f"c{n}_0000.nii.gz")
        save_nifti(phantom.label, tmp_path / "ingest" / "labelsTs" / f"c{n}.nii.gz")
        pred = np.roll(phantom.label.array, 2, axis=0)
        save_nifti(Volume(pred, phantom.label.affine), tmp_path / "pred" / f"c{n}.nii.gz")
    report = run_evaluate(Config(), tmp_path / "pred", tmp_path / "ingest" / "labelsTs", tmp_path / "eval")
    assert not any("without the CT" in note for note in report["notes"])
    page = (tmp_path / "eval" / "evaluation.html").read_text(encoding="utf-8")
    import base64

    pngs = re.findall(r"src='data:image/png;base64,([^']+)' ?>?", page)
    axial = pngs[-6]  # the two worst cases: 6 views after the box plots
    pixels = mpimg.imread(io.BytesIO(base64.b64decode(axial)))[..., :3]
    grey = (np.ptp(pixels, axis=-1) < 0.02) & (pixels.mean(-1) > 0.2) & (pixels.mean(-1) < 0.9)
    assert grey.mean() > 0.05  # soft tissue in the -160..240 HU window, not outlines on black

    (tmp_path / "ingest" / "imagesTs" / "c0_0000.nii.gz").unlink()
    (tmp_path / "ingest" / "imagesTs" / "c1_0000.nii.gz").unlink()
    report = run_evaluate(Config(), tmp_path / "pred", tmp_path / "ingest" / "labelsTs", tmp_path / "eval2")
    assert any("drawn without the CT for c0, c1" in note or "drawn without the CT for c1, c0" in note
               for note in report["notes"])


@pytest.mark.parametrize("top", [3, 39])  # one comparison per value, and bincount for many labels
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_label_counts_equal_a_bincount_in_every_memory_layout(top, layout):
    from pipeline.predict.report import label_counts

    labels = np.random.default_rng(top).integers(0, top + 1, (70, 60, 300)).astype(np.uint8)  # > one chunk
    if layout == "F":
        labels = np.asfortranarray(labels)
    elif layout == "strided":
        labels = labels[:, ::2]
    assert label_counts(labels, top).tolist() == np.bincount(labels.ravel(), minlength=top + 1).tolist()
