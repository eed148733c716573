"""DICOM SEG → label map: the dcmqi liver SEG on its feet-first CT, and SEGs highdicom makes from phantoms."""
from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from pipeline.errors import InputError
from pipeline.geometry import Grid, resample_to_grid
from pipeline.labels.seg import read_dicom_seg, read_seg_grid
from pipeline.synthetic.dicom import write_ct_series
from pipeline.synthetic.phantoms import LABEL_NAMES, PhantomOptions, make_phantom
from pipeline.volume_io import load_volume, sitk_to_volume

SMALL = dict(shape=48, slices=12, inplane_spacing_min=2.0, inplane_spacing_max=2.6, slice_spacing_min=4.0,
             slice_spacing_max=6.0)


def read_series(names):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(n) for n in names])
    return sitk_to_volume(reader.Execute())


@pytest.fixture(scope="module")
def dcmqi(shared_data):
    folder = shared_data / "dcmqi"
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder / "ct-3slice")))
    return folder, read_series(names), read_series(names[::-1])


@pytest.mark.shared_data
def test_dcmqi_liver_seg_reproduces_the_nrrd_label(dcmqi):
    folder, image, _ = dcmqi
    expected = load_volume(folder / "liver_seg.nrrd")
    assert expected.grid.difference(image.grid) is None
    label, names = read_dicom_seg(folder / "liver.dcm", image.grid)
    assert names == {1: "Liver"} and label.dtype == np.uint8
    np.testing.assert_array_equal(label, expected.array)
    assert label.sum() > 100_000


@pytest.mark.shared_data
def test_dcmqi_liver_seg_on_the_feet_first_slice_order(dcmqi):
    folder, _, instance_order = dcmqi
    assert instance_order.grid.direction[2, 2] < 0  # slices run towards the feet, as the instance numbers do
    expected = load_volume(folder / "liver_seg.nrrd").array
    label, _ = read_dicom_seg(folder / "liver.dcm", instance_order.grid)
    np.testing.assert_array_equal(label, expected[:, :, ::-1])
    assert not np.array_equal(label, expected)


@pytest.mark.shared_data
def test_dcmqi_liver_seg_on_its_own_grid(dcmqi):
    folder, image, _ = dcmqi
    grid = read_seg_grid(folder / "liver.dcm")
    label, _ = read_dicom_seg(folder / "liver.dcm")
    assert label.shape == grid.shape
    on_image = resample_to_grid(label, grid, image.grid)
    np.testing.assert_array_equal(on_image, load_volume(folder / "liver_seg.nrrd").array)


@pytest.mark.shared_data
def test_segment_mapping_and_errors(dcmqi, tmp_path):
    folder, image, _ = dcmqi
    label, names = read_dicom_seg(folder / "liver.dcm", image.grid, segment_to_value={1: 7})
    assert names == {7: "Liver"} and set(np.unique(label).tolist()) == {0, 7}
    with pytest.raises(InputError, match=r"must contain segment number\(s\) \[2\], got \[1\] \(1=Liver\)"):
        read_dicom_seg(folder / "liver.dcm", image.grid, segment_to_value={2: 1})
    shifted = image.grid.affine.copy()
    shifted[:3, 3] += image.grid.direction[:, 0] * 0.4 * image.grid.spacing[0]
    with pytest.raises(InputError, match="must lie on the image grid's voxel centres"):
        read_dicom_seg(folder / "liver.dcm", Grid(image.grid.shape, shifted))
    with pytest.raises(InputError, match="must be a DICOM Segmentation"):
        read_dicom_seg(folder / "ct-3slice" / "01.dcm", image.grid)


def phantom_seg(tmp_path, segmentation_type, **phantom_options):
    """A real multi-segment SEG that highdicom builds from a phantom's DICOM series."""
    phantom = make_phantom(6, PhantomOptions(**SMALL, **phantom_options))
    files = write_ct_series(phantom.image, tmp_path / "ct")
    sources = [pydicom.dcmread(f) for f in files]
    # highdicom wants frames as (slices, rows, columns[, segments]) in the order of source_images
    label = phantom.label.array.transpose(2, 1, 0)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=value, segment_label=name, segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Organ, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for value, name in LABEL_NAMES.items()]
    if segmentation_type == "FRACTIONAL":
        pixels = np.stack([(label == v).astype(np.float32) for v in LABEL_NAMES], axis=-1)
    else:
        pixels = label
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=segmentation_type,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="ctseg tests", manufacturer_model_name="phantom", software_versions="1",
        device_serial_number="0")
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    return phantom, path


@pytest.mark.parametrize("segmentation_type", ["BINARY", "FRACTIONAL", "LABELMAP"])
def test_highdicom_segs_of_phantoms_round_trip(tmp_path, segmentation_type):
    phantom, path = phantom_seg(tmp_path, segmentation_type, feet_first=True)
    label, names = read_dicom_seg(path, phantom.image.grid)
    assert names == {1: "liver", 2: "spleen", 3: "kidneys"}
    np.testing.assert_array_equal(label, phantom.label.array)
    assert not np.array_equal(label, phantom.label.array[::-1])


def test_oblique_phantom_seg_round_trips(tmp_path):
    phantom, path = phantom_seg(tmp_path, "BINARY", direction="oblique")
    label, _ = read_dicom_seg(path, phantom.image.grid, segment_to_value={1: 1, 3: 2})
    expected = np.select([phantom.label.array == 1, phantom.label.array == 3], [1, 2], 0)
    np.testing.assert_array_equal(label, expected)
