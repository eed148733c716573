"""Assembling series into HU volumes: real exports against references, synthetic defects and encodings."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.dicom.assemble import AssemblyOptions, assemble_series, to_dcm2niix_convention
from pipeline.dicom.scan import scan_export
from pipeline.dicom.select import select_series
from pipeline.errors import InputError
from pipeline.geometry import Grid, resample_to_grid
from pipeline.synthetic.dicom import tilted_affine
from pipeline.volume_io import load_volume

from helpers.dicom_phantoms import phantom_affine, phantom_array, phantom_values, phantom_volume, rewrite, write_phantom


def _only_series(folder):
    result = scan_export(folder)
    images = result.image_series()
    assert len(images) == 1, [s.name for s in images]
    return images[0]


def _selected(folder):
    return [d.series for d in select_series(scan_export(folder).series) if d.selected]


# ---------------------------------------------------------------------------------------------
# Real exports against references
# ---------------------------------------------------------------------------------------------

@pytest.mark.shared_data
def test_sts_002_is_voxel_identical_to_the_ibsi_reference(shared_data):
    patient = shared_data / "sts_ct" / "STS_002"
    (series,) = _selected(patient)
    assembled = assemble_series(series)
    reference = load_volume(patient / "reference" / "CT_image.nii.gz")
    assert assembled.volume.array.shape == reference.array.shape == (161, 143, 48)
    assert np.array_equal(assembled.volume.array, reference.array)
    assert np.abs(assembled.volume.affine - reference.affine).max() < 1e-3
    assert assembled.provenance["corrections"] == [] and assembled.warnings == []
    assert assembled.provenance["series_instance_uid"] == series.series_uid


@pytest.mark.shared_data
def test_untilted_philips_series_matches_dcm2niix_exactly(shared_data):
    (series,) = [s for s in _selected(shared_data / "dcm_qa_ct" / "Philips") if s.folder == "S21570/S2010"]
    ours = to_dcm2niix_convention(assemble_series(series).volume)
    reference = nib.load(shared_data / "dcm_qa_ct" / "ref" / "1A_TRAUMA_PLAIN_HEAD_DM_Head_201.nii.gz")
    assert np.array_equal(ours.array, np.asanyarray(reference.dataobj))
    assert np.abs(ours.affine - reference.affine).max() < 1e-4
    # the conversion is exactly a row flip: the first row of dcm2niix is our last
    ours_raw = assemble_series(series).volume
    assert np.array_equal(ours.array[:, 0, :], ours_raw.array[:, -1, :])


@pytest.mark.shared_data
def test_tilted_philips_series_matches_dcm2niix_tilt_correction(shared_data):
    """Measured: same grid (affine within 1e-4 mm), inside the head mean |ΔHU| 0.0006, max 1 (rounding),
    correlation 0.99999999; the only other differences are one boundary row per slice, where dcm2niix
    extends the acquired area by one row on one side and we by half a pixel on both."""
    (series,) = [s for s in _selected(shared_data / "dcm_qa_ct" / "Philips") if s.folder == "S21610/S2010"]
    assembled = assemble_series(series)
    ours = to_dcm2niix_convention(assembled.volume)
    reference = nib.load(shared_data / "dcm_qa_ct" / "ref" / "1F_STEREOTAXIS_Head_201_Tilt_1.nii.gz")
    expected = np.asanyarray(reference.dataobj).astype(np.float64)
    assert ours.array.shape == expected.shape == (512, 600, 54)
    assert np.abs(ours.affine - reference.affine).max() < 1e-4
    difference = np.abs(ours.array - expected)
    head = expected > -500
    assert head.sum() > 1_000_000
    assert difference[head].mean() < 0.01 and difference[head].max() <= 1
    assert np.corrcoef(ours.array[head], expected[head])[0, 1] > 0.999999
    assert (difference == 0).mean() > 0.998
    rows_differing = np.unique(np.argwhere(difference > 1)[:, [1, 2]], axis=0)
    assert len(rows_differing) <= series.slice_count  # at most one boundary row per slice
    (correction,) = assembled.provenance["corrections"]
    assert correction["type"] == "gantry_tilt" and correction["angle_deg"] == pytest.approx(18.5, abs=0.01)
    assert correction["rows_added"] == 88


@pytest.mark.shared_data
def test_tilted_series_is_refused_when_configured(shared_data):
    series = _only_series(shared_data / "dcm_qa_ct" / "Philips" / "S21610" / "S2010")
    with pytest.raises(InputError, match=r"series 'STEREOTAXIS' \[\w{10}\] must have slices stacked along their "
                                         r"normal, got gantry tilt 18.50°"):
        assemble_series(series, AssemblyOptions(tilt="refuse"))


@pytest.mark.shared_data
def test_jpeg2000_series_with_blank_uids_lands_on_its_segmentation_grid(shared_data):
    series = _only_series(shared_data / "totalseg" / "example_ct_dicom")
    assembled = assemble_series(series)
    segmentation = load_volume(shared_data / "totalseg" / "example_seg_dicom.nii.gz")
    ours = to_dcm2niix_convention(assembled.volume)
    assert ours.array.shape == segmentation.array.shape == (512, 512, 20)
    assert np.abs(ours.affine - segmentation.affine).max() < 1e-4
    labels = json.loads((shared_data / "totalseg" / "label_map_total.json").read_text())["total"]
    def median_hu(prefix):
        values = [int(k) for k, v in labels.items() if v.startswith(prefix)]
        return np.median(ours.array[np.isin(segmentation.array, values)])

    assert 20 < median_hu("liver") < 150 and median_hu("humerus") > 400 and median_hu("vertebrae") > 150
    assert median_hu("colon") < -500  # gas-filled
    assert assembled.provenance["transfer_syntaxes"] == ["1.2.840.10008.1.2.4.90"]


@pytest.mark.shared_data
def test_feet_first_ct_keeps_its_geometry_and_matches_the_label_maps(shared_data):
    series = _only_series(shared_data / "dcmqi" / "ct-3slice")
    assembled = assemble_series(series)
    liver = load_volume(shared_data / "dcmqi" / "liver_seg.nrrd")
    assert Grid(assembled.volume.array.shape, assembled.volume.affine).difference(liver.grid, atol_mm=1e-3) is None
    # slices were written head to feet (InstanceNumber 1 is the top); we sort by position: k runs upwards
    assert assembled.volume.affine[2, 2] > 0
    assert 20 < assembled.volume.array[liver.array > 0].mean() < 80
    (padding,) = assembled.provenance["corrections"]
    assert padding["type"] == "padding_to_air" and padding["pixel_padding_value"] == -2000
    assert assembled.volume.array.min() == -1024


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["693_J2KR.dcm", "693_UNCI.dcm", "bad_sequence.dcm", "explicit_VR-UN.dcm"])
def test_single_slices_decode_like_pydicom(shared_data, name):
    path = shared_data / "single_slices" / name
    assembled = assemble_series(_only_series(path))
    dataset = pydicom.dcmread(path)
    expected = dataset.pixel_array.astype(np.float64) * float(dataset.get("RescaleSlope", 1)) + \
        float(dataset.get("RescaleIntercept", 0))
    ours = assembled.volume.array[:, :, 0].T
    padding = dataset.pixel_array == dataset.get("PixelPaddingValue", 1 << 20)
    assert ours.shape == expected.shape == (512, 512)
    assert np.array_equal(ours[~padding], expected[~padding])
    assert np.all(ours[padding] == -1024)


# ---------------------------------------------------------------------------------------------
# Synthetic series: encodings and storage
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {}, {"transfer_syntax": "implicit_little"}, {"transfer_syntax": "rle"}, {"transfer_syntax": "jpeg2000_lossless"},
    {"transfer_syntax": "jpegls_lossless"}, {"transfer_syntax": "jpeg_lossless"}, {"unsigned": True},
    {"unsigned": True, "bits_stored": 12},
    {"transfer_syntax": "jpeg2000_lossless", "unsigned": True, "bits_stored": 12},
    {"rescale_slope": 0.5, "rescale_intercept": -1024.0}, {"transfer_syntax": "rle", "rescale_slope": 0.5},
    {"shuffle_instance_numbers": True, "file_naming": "shuffled"}, {"file_naming": "no_suffix"},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_phantom_round_trips_exactly(tmp_path, options):
    volume = phantom_volume()
    write_phantom(tmp_path, volume, **options)
    assembled = assemble_series(_only_series(tmp_path))
    assert np.array_equal(assembled.volume.array, volume.array)
    assert np.abs(assembled.volume.affine - volume.affine).max() < 1e-6
    expected_dtype = np.float32 if options.get("rescale_slope", 1.0) != 1.0 else np.int16
    assert assembled.volume.array.dtype == expected_dtype
    assert assembled.warnings == [] and assembled.provenance["corrections"] == []


def test_unsigned_12_bit_garbage_above_bits_stored_is_masked(tmp_path):
    paths = write_phantom(tmp_path, unsigned=True, bits_stored=12)
    for path in paths:
        dataset = pydicom.dcmread(path)
        stored = np.frombuffer(dataset.PixelData, dtype="<u2") | np.uint16(0xA000)  # overlay bits 13 and 15
        dataset.PixelData = stored.tobytes()
        dataset.save_as(path)
    assembled = assemble_series(_only_series(tmp_path))
    assert np.array_equal(assembled.volume.array, phantom_array())


@pytest.mark.parametrize("direction", [
    [[1, 0, 0], [0, -1, 0], [0, 0, -1]],                     # feet first: row cosine -x (LPS), slices to the feet
    [[-1, 0, 0], [0, -1, 0], [0, 0, -1]],                    # slices written top to bottom, normal points up
    [[-1, 0, 0], [0, -np.cos(0.35), np.sin(0.35)], [0, -np.sin(0.35), -np.cos(0.35)]],  # oblique, 20°
], ids=["feet_first", "descending_slices", "oblique"])
def test_orientation_and_slice_direction_keep_every_voxel_in_place(tmp_path, direction):
    volume = phantom_volume(direction=direction)
    write_phantom(tmp_path, volume, patient_position="FFS")
    assembled = assemble_series(_only_series(tmp_path)).volume
    # same voxels at the same world positions (the k order may be reversed to ascend along the normal)
    mapping = np.linalg.inv(volume.affine) @ assembled.affine
    assert np.allclose(mapping[:3, :3], np.round(mapping[:3, :3]), atol=1e-6)
    resampled = resample_to_grid(volume.array, volume.grid, Grid(assembled.array.shape, assembled.affine))
    assert np.array_equal(assembled.array, resampled)
    normal = np.cross(lps_column(assembled.affine, 0), lps_column(assembled.affine, 1))
    assert np.dot(normal, lps_column(assembled.affine, 2)) > 0  # k ascends along row × column


def lps_column(affine_ras, axis):
    return np.diag([-1.0, -1.0, 1.0]) @ affine_ras[:3, axis]


def test_pixel_padding_becomes_air(tmp_path):
    write_phantom(tmp_path, pixel_padding_value=-2000)
    assembled = assemble_series(_only_series(tmp_path))
    array = assembled.volume.array
    padded = array == -1024
    assert 0 < padded.mean() < 0.5 and np.array_equal(array[~padded], phantom_array()[~padded])
    assert assembled.provenance["corrections"][0]["voxels"] == int(padded.sum())


# ---------------------------------------------------------------------------------------------
# Synthetic series: tilt, gaps, duplicates, inconsistencies, Enhanced CT
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tilt", [15.0, -20.0])
def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path, tilt):
    volume = phantom_volume()
    write_phantom(tmp_path, volume, gantry_tilt_deg=tilt)
    series = _only_series(tmp_path)
    assert series.tilt_deg == pytest.approx(abs(tilt), abs=1e-6)
    assembled = assemble_series(series)
    out = assembled.volume
    direction = out.affine[:3, :3] / np.linalg.norm(out.affine[:3, :3], axis=0)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    # every output voxel holds the phantom value at its world position in the sheared acquisition grid
    index = np.stack(np.meshgrid(*[np.arange(n) for n in out.array.shape], indexing="ij"), -1).reshape(-1, 3)
    source = (np.linalg.inv(tilted_affine(volume.affine, tilt)) @ out.affine @ np.c_[index, np.ones(len(index))].T)
    si, sj, sk = source[:3]
    assert np.abs(sk - np.round(sk)).max() < 1e-6 and np.abs(si - np.round(si)).max() < 1e-6
    inside = (sj >= 0) & (sj <= volume.array.shape[1] - 1)
    values = out.array[index[:, 0], index[:, 1], index[:, 2]]
    assert np.abs(values[inside] - phantom_values(si, sj, sk)[inside]).max() <= 0.5  # rounding to int16
    assert np.all(values[(sj < -0.5) | (sj > volume.array.shape[1] - 0.5)] == volume.array.min())
    assert assembled.provenance["corrections"][0]["type"] == "gantry_tilt"
    with pytest.raises(InputError, match="gantry tilt"):
        assemble_series(series, AssemblyOptions(tilt="refuse"))


def test_missing_slice_is_interpolated_within_the_gap_limit(tmp_path):
    volume = phantom_volume()
    write_phantom(tmp_path, volume, drop_slices=[4])
    assembled = assemble_series(_only_series(tmp_path))
    assert np.array_equal(assembled.volume.array, volume.array)  # the phantom is linear along k
    assert np.abs(assembled.volume.affine - volume.affine).max() < 1e-9
    (correction,) = assembled.provenance["corrections"]
    assert correction["type"] == "uneven_spacing_resampled" and correction["largest_gap_mm"] == pytest.approx(4.0)
    assert "uneven slice spacing" in assembled.warnings[0]


def test_gap_beyond_the_limit_is_refused(tmp_path):
    write_phantom(tmp_path, drop_slices=[3, 4, 5])
    series = _only_series(tmp_path)
    with pytest.raises(InputError, match=r"got a 8.00 mm gap between slices 2 and 3 \(IM0003.dcm and IM0004.dcm\) "
                                         r"where slices are 2.00 mm apart"):
        assemble_series(series)
    assembled = assemble_series(series, AssemblyOptions(max_gap_slices=4.0))
    assert np.array_equal(assembled.volume.array, phantom_array())


def test_irregular_positions_within_tolerance_keep_the_ipp_affine(tmp_path):
    volume = phantom_volume()
    paths = write_phantom(tmp_path, volume)
    position = [float(v) for v in pydicom.dcmread(paths[5]).ImagePositionPatient]
    rewrite(paths[5], ImagePositionPatient=[position[0], position[1], position[2] + 0.005])
    assembled = assemble_series(_only_series(tmp_path))
    assert assembled.provenance["geometry"]["regular"] and assembled.provenance["corrections"] == []
    assert assembled.provenance["geometry"]["max_position_residual_mm"] == pytest.approx(0.005, abs=1e-4)
    rewrite(paths[5], ImagePositionPatient=[position[0], position[1], position[2] + 0.5])
    moved = assemble_series(_only_series(tmp_path))
    assert moved.provenance["corrections"][0]["type"] == "uneven_spacing_resampled"


def test_identical_duplicate_is_dropped_with_a_warning(tmp_path):
    write_phantom(tmp_path, duplicate_slices=[2])
    series = _only_series(tmp_path)
    assert series.slice_count == 11
    assembled = assemble_series(series)
    assert np.array_equal(assembled.volume.array, phantom_array())
    assert "dropped 1 duplicate image(s) with identical pixel data" in assembled.warnings[0]


def test_differing_images_at_one_position_are_refused(tmp_path):
    paths = write_phantom(tmp_path)
    dataset = pydicom.dcmread(paths[2])
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.PixelData = (np.frombuffer(dataset.PixelData, "<i2") + 7).astype("<i2").tobytes()
    dataset.save_as(tmp_path / "other.dcm")
    with pytest.raises(InputError, match=r"must have one image per slice position, got different images at"):
        assemble_series(_only_series(tmp_path))


def test_split_parts_assemble_or_are_refused(tmp_path):
    uids = dict(study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    write_phantom(tmp_path / "a", **uids)
    write_phantom(tmp_path / "b", phantom_volume(shape=(32, 32, 10), origin=(10.0, 20.0, 40.0)), **uids)
    parts = scan_export(tmp_path).image_series()
    assert len(parts) == 2
    for part in parts:
        assembled = assemble_series(part)
        assert assembled.volume.array.shape[:2] == (part.columns, part.rows)
        assert "part" in assembled.warnings[0] and "image sizes" in assembled.warnings[0]
        with pytest.raises(InputError, match="must be one consistent series, got part"):
            assemble_series(part, AssemblyOptions(on_inconsistent="refuse"))


def test_missing_position_is_refused(tmp_path):
    paths = write_phantom(tmp_path)
    dataset = pydicom.dcmread(paths[1])
    del dataset.ImagePositionPatient
    dataset.save_as(paths[1])
    with pytest.raises(InputError, match=r"got 1 of 10 without them \(e.g. IM0002.dcm\)"):
        assemble_series(_only_series(tmp_path))


def _enhanced(tmp_path, transfer_syntax=None):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    frames = [pydicom.dcmread(p) for p in write_phantom(tmp_path / "single")]
    shutil.rmtree(tmp_path / "single")
    multiframe = LegacyConvertedEnhancedCTImage(frames, generate_uid(), 7, generate_uid(), 1,
                                                transfer_syntax_uid=transfer_syntax)
    path = tmp_path / "enhanced.dcm"
    multiframe.save_as(path)
    return path


@pytest.mark.parametrize("transfer_syntax", [None, "1.2.840.10008.1.2.5"], ids=["native", "rle"])
def test_enhanced_ct_round_trips(tmp_path, transfer_syntax):
    path = _enhanced(tmp_path, transfer_syntax)
    assembled = assemble_series(_only_series(path))
    assert np.array_equal(assembled.volume.array, phantom_array())
    assert np.abs(assembled.volume.affine - phantom_affine()).max() < 1e-6


def test_enhanced_ct_per_frame_rescale_and_positions(tmp_path):
    path = _enhanced(tmp_path)
    dataset = pydicom.dcmread(path)
    shared = dataset.SharedFunctionalGroupsSequence[0]
    transformation = shared.PixelValueTransformationSequence[0]
    del shared.PixelValueTransformationSequence
    order = list(range(10))[::-1]  # reverse the frame order: sorting must use the per-frame positions
    dataset.PixelData = np.frombuffer(dataset.PixelData, "<i2").reshape(10, -1)[order].tobytes()
    groups = [dataset.PerFrameFunctionalGroupsSequence[f] for f in order]
    for group in groups:
        z = float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        item = pydicom.Dataset()
        item.RescaleSlope = transformation.RescaleSlope
        item.RescaleIntercept = float(transformation.RescaleIntercept) + 10 * round((z + 30.0) / 2.0)
        item.RescaleType = "HU"
        group.PixelValueTransformationSequence = [item]
    dataset.PerFrameFunctionalGroupsSequence = groups
    dataset.save_as(path)
    series = _only_series(path)
    assert len({s.rescale_intercept for s in series.slices}) == 10
    with pytest.raises(InputError, match=r"must use one RescaleSlope/RescaleIntercept .* enhanced.dcm frame 2"):
        assemble_series(series)  # by default differing values refuse: in CT they are a sign of damage
    assembled = assemble_series(series, AssemblyOptions(varying_rescale="allow"))
    assert any("use their own RescaleSlope/RescaleIntercept" in w for w in assembled.warnings)
    expected = phantom_array() + 10 * np.arange(10)[None, None, :]  # slice k got intercept + 10 k
    assert np.array_equal(assembled.volume.array, expected)
