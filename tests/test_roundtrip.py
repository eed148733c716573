"""Geometry round trip: phantom DICOM export → ingest → model grid → back, on oblique and feet-first phantoms.

The ground-truth label stands in for a model: it is taken onto the model grid exactly as an image is, then
brought back the way predict does. The output must sit on the input grid exactly, and every label on the
same world coordinates.
"""
import numpy as np
import pytest
import yaml

from pipeline import api
from pipeline.config import load_config
from pipeline.geometry import Volume, resample_to_grid
from pipeline.preprocess.transform import labels_to_source, prepare_image, prepare_label
from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series
from pipeline.synthetic.phantoms import PhantomOptions, label_centroid_ras, make_phantom
from pipeline.volume_io import load_volume, save_nifti

CASES = {
    "oblique_feet_first": PhantomOptions(shape=72, slices=28, direction="oblique", feet_first=True),
    "random_direction": PhantomOptions(shape=64, slices=24, direction="random"),
    "identity_head_first": PhantomOptions(shape=64, slices=24),
}


@pytest.mark.parametrize("name", CASES)
def test_ingest_then_predict_lands_on_source_grid(tmp_path, name):
    phantom = make_phantom(seed=7, options=CASES[name])
    series_dir = tmp_path / "export" / "PAT" / "STUDY" / "SERIES"
    write_ct_series(phantom.image, series_dir, SeriesWriteOptions(shuffle_instance_numbers=True, seed=3))
    save_nifti(phantom.label, tmp_path / "label.nii.gz")
    dataset = tmp_path / "dataset.yaml"
    dataset.write_text(yaml.safe_dump({
        "name": "roundtrip",
        "labels": [{"name": n, "value": v, "color": [v * 60, 0, 0], "synonyms": []}
                   for v, n in phantom.label_names.items()],
        "cases": [{"id": "rt", "image": "export/PAT/STUDY/SERIES", "label": "label.nii.gz"}]}))
    cfg = load_config([], [f"output_root={tmp_path / 'out'}", f"dataset={dataset}"])
    api.ingest(cfg)

    image = load_volume(cfg.stage_dir("ingest") / "imagesTr" / "rt_0000.nii.gz")
    label = load_volume(cfg.stage_dir("ingest") / "labelsTr" / "rt.nii.gz")
    # DICOM slices are ordered along the slice normal, so k may run opposite to the phantom's; the same
    # voxels must still sit at the same world positions (same shape, spacing, voxel set)
    assert sorted(image.grid.shape) == sorted(phantom.image.grid.shape)
    assert np.allclose(sorted(image.grid.spacing), sorted(phantom.image.grid.spacing), atol=1e-4)
    assert label.grid.difference(image.grid) is None, "the label must be on its image's grid"
    phantom_on_ingested = resample_to_grid(phantom.image.array, phantom.image.grid, image.grid)
    assert np.array_equal(image.array, phantom_on_ingested)
    assert np.array_equal(label.array, resample_to_grid(phantom.label.array, phantom.label.grid, image.grid))

    # at source resolution the way there and back is the identity
    same = {"target_spacing": sorted_spacing(image), "intensity": {"mode": "window", "low": -200, "high": 300}}
    prepared = prepare_image(image, same)
    back = labels_to_source(prepare_label(label, prepared.grid), prepared.grid, image.grid)
    assert np.array_equal(back, label.array)

    # at a coarser model spacing, with cropping, each organ lands on the same world coordinates
    coarse = {**same, "target_spacing": [2.0, 2.0, 3.0], "crop_to_body": True, "body_threshold_hu": -500}
    prepared = prepare_image(image, coarse)
    back = labels_to_source(prepare_label(label, prepared.grid), prepared.grid, image.grid)
    output = tmp_path / "pred.nii.gz"
    save_nifti(Volume(back, image.affine), output, dtype=np.uint8)
    written = load_volume(output)
    assert written.grid.difference(image.grid, atol_mm=1e-5) is None
    for value in phantom.label_names:
        expected = label_centroid_ras(phantom.label, value)
        got = label_centroid_ras(written, value)
        # nearest-neighbour at 2x2x3 mm may move a centroid by up to half a model voxel; a flip moves it by cm
        assert np.linalg.norm(got - expected) < 0.5 * np.linalg.norm([2.0, 2.0, 3.0]), \
            f"label {value} moved by {got - expected} mm"


def sorted_spacing(image):
    from pipeline.geometry import canonical_grid

    return list(canonical_grid(image.grid).spacing)


def test_left_right_is_not_mirrored():
    """The liver (label 1) is on the patient's right: RAS +x points to the patient's right (LPS +x to the left)."""
    for options in CASES.values():
        phantom = make_phantom(seed=11, options=options)
        assert label_centroid_ras(phantom.label, 1)[0] > label_centroid_ras(phantom.label, 2)[0]
