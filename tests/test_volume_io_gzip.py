"""The one gzip writer (volume_io.parallel_gzip): a standard gzip stream from ISA-L or zlib, read back by anyone."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from pipeline import volume_io
from pipeline.geometry import Volume
from pipeline.volume_io import gzip_backend, load_volume, parallel_gzip, save_nifti


def _payload() -> bytes:
    """CT-like int16 voxels (smooth + noise) with long runs of air, 3 MB: several chunks."""
    rng = np.random.default_rng(0)
    body = (np.cumsum(rng.normal(0, 3, size=(1 << 20) + 12345)) + rng.normal(0, 8, size=(1 << 20) + 12345))
    data = np.concatenate([np.full(1 << 19, -1000.0), body]).astype(np.int16)
    return data.tobytes()


@pytest.mark.parametrize("backend", ["isal", "zlib"])
@pytest.mark.parametrize("level", [0, 1, 2, 6])
def test_output_is_one_standard_gzip_stream_whatever_the_library(monkeypatch, backend, level):
    if backend == "isal":
        pytest.importorskip("isal")
    else:
        monkeypatch.setattr(volume_io, "_isal_zlib", None)
    data = _payload()
    compressed = parallel_gzip(data, level=level, threads=3, chunk_bytes=1 << 20)
    assert compressed[:3] == b"\x1f\x8b\x08"
    assert gzip.decompress(compressed) == data  # the stdlib reader: one member, CRC and length right
    expected = "isal" if backend == "isal" and level in (1, 2) else "zlib"
    assert gzip_backend(level) == expected
    if level == 0:
        assert len(compressed) > len(data)  # level 0 keeps zlib's meaning: stored, not compressed


def test_isal_serves_the_default_level_when_installed():
    pytest.importorskip("isal")
    assert gzip_backend(1) == "isal" and gzip_backend(9) == "zlib"


def test_nifti_written_through_isal_reads_back_with_nibabel(tmp_path):
    import nibabel as nib

    array = np.random.default_rng(1).integers(-1024, 2000, size=(40, 33, 21)).astype(np.int16)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    path = save_nifti(Volume(array, affine), tmp_path / "ct.nii.gz")
    image = nib.load(str(path))
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), array)
    np.testing.assert_allclose(image.affine, affine)
    np.testing.assert_array_equal(load_volume(path).array, array)
    gzip.decompress(path.read_bytes())  # and the stdlib reads the file as plain gzip


def _written_by_nibabel(tmp_path, name, image):
    import nibabel as nib

    path = tmp_path / name
    nib.save(image, str(path))  # nibabel's own gzip writer (zlib, another encoder than ours)
    return path


@pytest.mark.parametrize("kind", ["nifti1_int16", "nifti1_scaled", "nifti2_float", "nifti1_big_endian"])
def test_isal_reader_gives_what_nibabel_reads(tmp_path, kind):
    """The ISA-L fast path of load_volume returns nibabel's own array and affine, scaling and byte order included."""
    pytest.importorskip("isal")
    import nibabel as nib

    rng = np.random.default_rng(2)
    array = rng.integers(-1024, 3000, size=(31, 22, 13)).astype(np.int16)
    affine = np.array([[-0.8, 0, 0.1, 12.0], [0, 0.9, 0, -30.0], [0, 0, -2.5, 40.0], [0, 0, 0, 1.0]])
    if kind == "nifti2_float":
        image = nib.Nifti2Image(array.astype(np.float32) * 0.5, affine)
    else:
        image = nib.Nifti1Image(array, affine)
        if kind == "nifti1_scaled":  # stored values x slope + intercept (some exporters store CT so)
            image.header.set_slope_inter(0.5, -1024.0)
        if kind == "nifti1_big_endian":
            image = nib.Nifti1Image(array.astype(">i2"), affine, nib.Nifti1Header(endianness=">"))
    path = _written_by_nibabel(tmp_path, f"{kind}.nii.gz", image)
    expected = nib.load(str(path))
    assert volume_io._gunzipped_nifti(path) is not None  # the fast path served it
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.array, np.asanyarray(expected.dataobj))
    assert volume.array.dtype == np.asanyarray(expected.dataobj).dtype
    np.testing.assert_allclose(volume.affine, expected.affine)


def test_truncated_gzip_is_refused_with_the_file_named(tmp_path):
    pytest.importorskip("isal")
    from pipeline.errors import InputError

    array = np.random.default_rng(3).integers(-1024, 2000, size=(40, 33, 21)).astype(np.int16)
    path = save_nifti(Volume(array, np.eye(4)), tmp_path / "ct.nii.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="ct.nii.gz could not be read"):
        load_volume(path)
