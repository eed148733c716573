"""Pixel decoding: stored DICOM values → HU, written straight into a preallocated slice stack.

Native little-endian files are read with one ``numpy.fromfile`` at the pixel data offset that the
header scan recorded (no second parse); everything else (JPEG 2000, JPEG Lossless, JPEG-LS, RLE,
big endian, deflate) goes through :func:`pydicom.pixels.pixel_array` and its installed plugins
(pylibjpeg-openjpeg, pylibjpeg-libjpeg, pyjpegls, pylibjpeg-rle). Files are decoded in a thread
pool; NumPy and the codecs release the GIL for the heavy parts.

Per image: high bits beyond BitsStored are masked (unsigned) or sign-extended (signed); pixels equal
to PixelPaddingValue (or within PixelPaddingRangeLimit) are remembered before rescaling and set to
the configured air value afterwards; then HU = stored × RescaleSlope + RescaleIntercept.
"""
from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.dicom.header import PixelFormat, SliceRef
from pipeline.errors import InputError

INT16_MIN, INT16_MAX = -32768, 32767


@dataclass
class DecodeStats:
    """What decoding did, for provenance and warnings."""

    padding_voxels: int = 0
    clipped_voxels: int = 0
    transfer_syntaxes: set[str] = field(default_factory=set)


def output_dtype(slices: list[SliceRef], requested: str = "auto") -> np.dtype:
    """int16 when every slope and intercept is an integer (HU are then exact integers), else float32."""
    if requested == "int16":
        return np.dtype(np.int16)
    if requested == "float32":
        return np.dtype(np.float32)
    integral = all(float(s.rescale_slope).is_integer() and float(s.rescale_intercept).is_integer() for s in slices)
    return np.dtype(np.int16 if integral else np.float32)


def decode_into(slices: list[SliceRef], out: np.ndarray, air_hu: float, workers: int = 2,
                series_name: str = "series", failures: list | None = None) -> DecodeStats:
    """Decode ``slices[k]`` into ``out[k]`` (shape (n, rows, cols)) as HU, in parallel by file.

    A file that cannot be decoded raises :class:`InputError` naming it; when ``failures`` is a list,
    ``(path, reason)`` is appended to it instead, the other files are still decoded and that file's
    rows of ``out`` are left unset (the caller drops them).
    """
    by_file: dict[Path, list[tuple[int, SliceRef]]] = defaultdict(list)
    for index, slice_ref in enumerate(slices):
        by_file[slice_ref.path].append((index, slice_ref))
    jobs = list(by_file.items())

    def run(job) -> DecodeStats:
        path, members = job
        try:
            return _decode_file(path, members, out, air_hu, series_name)
        except InputError as exc:
            if failures is None:
                raise
            failures.append((path, f"pixel data could not be decoded: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a codec or a damaged file: name the file, never the batch
            message = f"{path.name} in {series_name} could not be decoded ({type(exc).__name__}: " \
                      f"{str(exc).splitlines()[0][:160] if str(exc) else ''}). Re-copy or re-export the file."
            if failures is None:
                raise InputError(message) from exc
            failures.append((path, f"pixel data could not be decoded: {message}"))
        return DecodeStats()

    stats = DecodeStats()
    if workers <= 1 or len(jobs) == 1:
        results = [run(job) for job in jobs]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, jobs))
    for result in results:
        stats.padding_voxels += result.padding_voxels
        stats.clipped_voxels += result.clipped_voxels
        stats.transfer_syntaxes |= result.transfer_syntaxes
    return stats


def _decode_file(path: Path, members: list[tuple[int, SliceRef]], out: np.ndarray, air_hu: float,
                 series_name: str) -> DecodeStats:
    pixel = members[0][1].pixel
    stats = DecodeStats(transfer_syntaxes={pixel.transfer_syntax})
    frames = read_stored_frames(path, pixel, series_name)
    for index, slice_ref in members:
        frame = frames[slice_ref.frame or 0]
        if frame.shape != out.shape[1:]:
            raise InputError(f"{path.name} in {series_name} must be {out.shape[2]}x{out.shape[1]} pixels like "
                             f"the rest of the series, got {frame.shape[1]}x{frame.shape[0]}. The export mixes "
                             f"image sizes; re-export the series.")
        padding, clipped = store_hu(frame, slice_ref, out[index], air_hu)
        stats.padding_voxels += padding
        stats.clipped_voxels += clipped
    return stats


def read_stored_frames(path: Path, pixel: PixelFormat, series_name: str = "series") -> np.ndarray:
    """All frames of ``path`` as stored values, shape (frames, rows, cols), BitsStored applied."""
    if pixel.samples_per_pixel != 1:
        raise InputError(f"{path.name} in {series_name} must be greyscale (SamplesPerPixel 1) to be CT, got "
                         f"{pixel.samples_per_pixel} samples ({pixel.photometric}). Skip colour images.")
    count = pixel.rows * pixel.columns * pixel.frames
    if pixel.is_native_little_endian and pixel.bits_allocated in (8, 16, 32):
        dtype = np.dtype(f"<{'i' if pixel.pixel_representation else 'u'}{pixel.bits_allocated // 8}")
        try:
            stored = np.fromfile(path, dtype=dtype, count=count, offset=pixel.pixel_offset)
        except OSError as exc:
            raise InputError(f"{path} could not be read ({exc}). Check the file and re-copy the export.") from exc
        if stored.size < count:
            raise InputError(f"{path.name} in {series_name} is truncated: {stored.size} of {count} pixels present. "
                             f"Re-copy or re-export the file.")
    else:
        stored = _decode_with_pydicom(path, series_name)
    try:
        stored = stored.reshape(pixel.frames, pixel.rows, pixel.columns)
    except ValueError as exc:
        raise InputError(f"{path.name} in {series_name} decoded to {stored.shape}, which does not match "
                         f"{pixel.frames} frame(s) of {pixel.columns}x{pixel.rows}. The file is inconsistent; "
                         f"re-export it.") from exc
    return _apply_bits_stored(stored, pixel)


def _decode_with_pydicom(path: Path, series_name: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(str(path))
    except Exception as exc:  # codecs raise many types
        raise InputError(f"{path.name} in {series_name} could not be decoded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''}). Check that the pylibjpeg/"
                         f"pyjpegls plugins are installed, or re-export uncompressed.") from exc


def _apply_bits_stored(stored: np.ndarray, pixel: PixelFormat) -> np.ndarray:
    bits = stored.dtype.itemsize * 8
    if not 0 < pixel.bits_stored < bits:
        return stored
    if pixel.pixel_representation:
        signed = stored.astype(stored.dtype.str.replace("u", "i"), copy=False)
        shift = bits - pixel.bits_stored
        return (signed << shift) >> shift  # sign-extend the BitsStored-bit two's complement value
    unsigned = stored.astype(stored.dtype.str.replace("i", "u"), copy=False)
    return unsigned & np.array((1 << pixel.bits_stored) - 1, dtype=unsigned.dtype)


def padding_mask(stored: np.ndarray, pixel: PixelFormat) -> np.ndarray | None:
    """Pixels that are PixelPaddingValue (or within PixelPaddingRangeLimit), None when none can be."""
    if pixel.padding_value is None:
        return None
    value = pixel.padding_value
    if not pixel.pixel_representation and value < 0:  # some writers give the signed reading of the bits
        value += 1 << pixel.bits_stored
    if pixel.padding_range_limit is None:
        mask = stored == value
    else:
        low, high = sorted((value, pixel.padding_range_limit))
        mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def store_hu(stored: np.ndarray, slice_ref: SliceRef, out: np.ndarray, air_hu: float) -> tuple[int, int]:
    """Write HU of one stored image into ``out``; return (padding pixels set to air, clipped pixels)."""
    mask = padding_mask(stored, slice_ref.pixel)
    slope, intercept = slice_ref.rescale_slope, slice_ref.rescale_intercept
    clipped = 0
    if out.dtype == np.int16:
        if slope == 1 and (_fits_int16(slice_ref.pixel, intercept) or _values_fit_int16(stored, intercept)):
            if _is_int16_compatible(stored, slice_ref.pixel):  # same-type loop: several times faster
                np.add(stored.view(np.int16), np.int16(intercept), out=out)
            else:
                np.add(stored, np.int32(intercept), out=out, casting="unsafe")
        else:
            hu = stored.astype(np.int32) * int(slope) + int(intercept) if float(slope).is_integer() else \
                np.rint(stored * float(slope) + intercept)
            outside = (hu < INT16_MIN) | (hu > INT16_MAX)
            clipped = int(outside.sum())
            np.clip(hu, INT16_MIN, INT16_MAX, out=hu)
            out[...] = hu
    else:
        np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
        out += np.float32(intercept)
    if mask is not None:
        out[mask] = air_hu
        return int(mask.sum()), clipped
    return 0, clipped


def _is_int16_compatible(stored: np.ndarray, pixel: PixelFormat) -> bool:
    """True when the stored values read as int16 are the same numbers (uint16 below 2**15 included)."""
    if stored.dtype == np.int16:
        return True
    return stored.dtype == np.uint16 and min(pixel.bits_stored, 16) <= 15


def _values_fit_int16(stored: np.ndarray, intercept: float) -> bool:
    return bool(INT16_MIN <= int(stored.min()) + intercept and int(stored.max()) + intercept <= INT16_MAX)


def _fits_int16(pixel: PixelFormat, intercept: float) -> bool:
    bits = min(pixel.bits_stored, pixel.bits_allocated)
    low, high = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if pixel.pixel_representation
                 else (0, (1 << bits) - 1))
    return INT16_MIN <= low + intercept and high + intercept <= INT16_MAX
