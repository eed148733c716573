"""Reading and writing image and label volumes (NIfTI, NRRD, MHA) with their exact geometry.

NIfTI is read and written with nibabel; NRRD/MHA/MHD are read with SimpleITK and converted from
its LPS, [k, j, i] convention to ours (see :mod:`pipeline.geometry`). Writes are atomic.
"""
from __future__ import annotations

import os
import struct
import types
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.errors import InputError
from pipeline.geometry import Grid, Volume, lps_to_ras

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def is_volume_file(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd.json")


def strip_volume_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (".seg.nrrd",) + VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_volume(path: str | Path) -> Volume:
    """Load a NIfTI, NRRD, MHA or MHD volume as a :class:`Volume` (array [i, j, k], RAS affine)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist. Check the path, or that the earlier stage finished.")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes). Re-export or re-copy the file.")
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            return _load_nifti(path)
        if name.endswith(ITK_SUFFIXES):
            return _load_itk(path)
    except InputError:
        raise
    except Exception as exc:  # nibabel/SimpleITK raise many types for corrupt files
        raise InputError(f"{path} could not be read as a volume ({type(exc).__name__}: {exc}). "
                         f"Check that the file is complete and not corrupt.") from exc
    raise InputError(f"{path} must be a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha/.mhd) file, "
                     f"got suffix '{''.join(path.suffixes)}'. Convert it, or point at a DICOM folder instead.")


def _load_nifti(path: Path) -> Volume:
    import nibabel as nib

    image: Any = _gunzipped_nifti(path) if _isal_zlib is not None else None
    if image is None:
        image = nib.load(str(path))  # a Nifti1Image or Nifti2Image (nibabel types it as its base class)
    array = np.asanyarray(image.dataobj)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{path} must hold a 3D volume, got shape {array.shape}. "
                         f"Split 4D series into one 3D file per time point or channel.")
    return Volume(np.asarray(array), np.asarray(image.affine, dtype=np.float64))


def _gunzipped_nifti(path: Path):
    """A ``.nii.gz`` decompressed in one piece with ISA-L (2-3x faster than the zlib stream nibabel reads
    through), then parsed by nibabel from memory; None for anything else (plain .nii, or a header that is
    neither NIfTI-1 nor NIfTI-2), which nibabel then loads itself."""
    import nibabel as nib
    from isal import igzip

    if not path.name.lower().endswith(".gz"):
        return None
    with open(path, "rb") as handle:
        # ISA-L's own C reader decompresses straight into the buffer readinto is given; igzip's file object
        # (the fallback) copies through an intermediate buffer
        reader = getattr(_isal_zlib, "_GzipReader", None)
        stream = reader(handle) if reader is not None else igzip.GzipFile(fileobj=handle, mode="rb")
        head = stream.read(540)
        sizeof_hdr = {int.from_bytes(head[:4], order) for order in ("little", "big")}
        image_class = next((c for c, size in ((nib.Nifti1Image, 348), (nib.Nifti2Image, 540)) if size in sizeof_hdr),
                           None)
        if image_class is None:
            return None
        image = _unscaled_nifti_into_array(stream, head, image_class, path)
    if image is None:  # scaled voxels or an unusual header: nibabel reads it from memory, as it always did
        image = image_class.from_bytes(igzip.decompress(path.read_bytes()))
    return image


def _unscaled_nifti_into_array(stream, head: bytes, image_class, path: Path):
    """The image decompressed straight into its voxel array, or None when the header asks for scaling or is not
    a single-file NIfTI (the caller then lets nibabel read it).

    Fresh process, the predict benchmark's 512x512x300 CT: 0.40 s against 0.53-0.56 s for decompressing to bytes
    and letting nibabel copy the voxels out of them (no 157 MB bytes object, no copy). The stream is read to its
    end, so gzip's CRC and length check runs as it does for a whole read.
    """
    import io

    import nibabel as nib

    size = 348 if image_class is nib.Nifti1Image else 540
    if len(head) < size:
        return None
    offset = int(image_class.header_class(head[:size]).get_data_offset())
    if offset < size:
        return None
    head += stream.read(max(0, offset - len(head)))
    header = image_class.header_class.from_fileobj(io.BytesIO(head[:offset]))  # extensions included
    slope, inter = header.get_slope_inter()
    if (slope if slope is not None else 1.0) != 1.0 or (inter if inter is not None else 0.0) != 0.0 or \
            header["magic"] not in (b"n+1", b"n+2"):
        return None  # nibabel returns the stored voxels unchanged only for no scaling or slope 1, intercept 0
    array = np.empty(header.get_data_shape(), dtype=header.get_data_dtype(), order="F")
    target = memoryview(array.reshape(-1, order="F")).cast("B")
    early = head[offset:offset + target.nbytes]  # voxel bytes that came with the header
    target[:len(early)] = early
    filled = len(early)
    while filled < target.nbytes:
        count = stream.readinto(target[filled:])
        if not count:
            raise InputError(f"{path} ends {target.nbytes - filled} bytes before its voxel data does "
                             f"({target.nbytes} bytes expected). The file is cut; copy or export it again.")
        filled += count
    while stream.read(1 << 20):  # to the end: the gzip trailer's CRC and length are checked there
        pass
    return image_class(array, header.get_best_affine(), header)


def _load_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3:
        raise InputError(f"{path} must hold a 3D volume, got {image.GetDimension()} dimensions.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} must have one component per voxel, got {image.GetNumberOfComponentsPerPixel()}.")
    return sitk_to_volume(image)


def sitk_to_volume(image) -> Volume:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.array(image.GetSpacing())[None, :]
    affine_lps[:3, 3] = image.GetOrigin()
    return Volume(np.ascontiguousarray(array), lps_to_ras(affine_lps))


def volume_to_sitk(volume: Volume):
    import SimpleITK as sitk

    grid = volume.grid
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)))
    affine_lps = lps_to_ras(grid.affine)
    spacing = grid.spacing
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine_lps[:3, 3]])
    image.SetDirection([float(v) for v in (affine_lps[:3, :3] / spacing[None, :]).ravel()])
    return image


def load_grid(path: str | Path) -> Grid:
    """Read only the header's grid (fast for NIfTI)."""
    path = Path(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        try:
            image: Any = nib.load(str(path))
        except Exception as exc:
            raise InputError(f"{path} could not be read as NIfTI ({exc}).") from exc
        return Grid(image.shape[:3], image.affine)
    return load_volume(path).grid


_isal_zlib: types.ModuleType | None
try:  # ISA-L (PyPI isal): the same deflate format, several times faster than zlib at the fastest levels
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - a platform without an isal wheel falls back to zlib
    _isal_zlib = None


def gzip_backend(level: int) -> str:
    """Which library :func:`parallel_gzip` deflates with at ``level``: 'isal' or 'zlib'."""
    return "isal" if _isal_zlib is not None and 1 <= level <= ISAL_MAX_ZLIB_LEVEL else "zlib"


# zlib levels served by ISA-L, and the ISA-L level used for each (ISA-L has levels 0-3). Measured with
# bench/compression.py (bench/README.md, "gzip"): ISA-L level 1 compresses CT 4-6x faster than zlib level 1
# into files 2-7% larger, label maps 50x+ faster into files half the size or smaller. Level 0 keeps zlib's
# meaning (stored, no compression); levels 3-9 ask for small files over speed, so zlib serves them.
ISAL_MAX_ZLIB_LEVEL = 2
_ISAL_LEVEL = {1: 1, 2: 2}


def parallel_gzip(data, level: int = 1, threads: int | None = None, chunk_bytes: int = 4 << 20) -> bytes:
    """gzip ``data`` on several threads, as pigz does: one standard gzip member that any reader opens.

    The one gzip writer of the project (.nii.gz, .seg.nrrd, probability maps). Each chunk is deflated
    independently (both libraries release the GIL) and all but the last end with a sync flush, so the
    raw deflate streams concatenate into one valid stream. Levels 1-2 deflate with ISA-L when the
    ``isal`` package is installed (:func:`gzip_backend`), higher levels and machines without it with zlib.
    """
    threads = threads or min(4, os.cpu_count() or 1)
    view = memoryview(data).cast("B")
    chunks = [view[start:start + chunk_bytes] for start in range(0, len(view), chunk_bytes)] or [view]
    last = len(chunks) - 1
    library: types.ModuleType = zlib
    library_level = level
    if _isal_zlib is not None and gzip_backend(level) == "isal":
        library, library_level = _isal_zlib, _ISAL_LEVEL[level]

    def deflate(item):
        index, piece = item
        compressor = library.compressobj(library_level, library.DEFLATED, -15, 9)
        return compressor.compress(piece) + compressor.flush(library.Z_FINISH if index == last
                                                             else library.Z_SYNC_FLUSH)

    if len(chunks) == 1 or threads <= 1:  # no pool to start for a small payload (a mask, a thin CT)
        crc = (_isal_zlib or zlib).crc32(view)
        body = b"".join(map(deflate, enumerate(chunks)))
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            bodies = pool.map(deflate, enumerate(chunks))
            crc = (_isal_zlib or zlib).crc32(view)  # computed while the workers compress
            body = b"".join(bodies)
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff"
    return header + body + struct.pack("<II", crc & 0xFFFFFFFF, len(view) & 0xFFFFFFFF)


def save_nifti(volume: Volume, path: str | Path, dtype=None, compresslevel: int = 1) -> Path:
    """Write ``volume`` atomically as NIfTI-1 with qform and sform both set to its affine.

    ``compresslevel`` 1 trades a few percent of file size for several times faster writes, and the
    compression runs on several threads (:func:`parallel_gzip`).
    """
    import nibabel as nib

    path = Path(path)
    array = volume.array if dtype is None else volume.array.astype(dtype, copy=False)
    image = nib.Nifti1Image(array, volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    if np.issubdtype(array.dtype, np.integer):
        image.header.set_slope_inter(1.0, 0.0)
    data = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = parallel_gzip(data, level=compresslevel)
    atomic.write_bytes(path, data)
    return path
