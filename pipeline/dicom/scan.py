"""Scanning an export folder: every DICOM file's header, read in parallel, grouped into series.

Grouping key (:attr:`SeriesInfo.key`):
- ``uid:<StudyInstanceUID>/<SeriesInstanceUID>`` when both UIDs are present. Should one UID pair
  hold files of several patients (a broken export), each patient becomes its own series
  (``…#patient-<hash>``, the hash of PatientID, never the ID itself).
- otherwise the fallback ``folder:<folder relative to root>|patient-<hash>|<Modality>|<SOPClassUID>|
  series-<SeriesNumber>|for-<FrameOfReferenceUID>`` plus the image geometry
  ``|<Rows>x<Columns>|iop-<orientation rounded to 1e-3>|ps-<pixel spacing rounded to 1e-3>``:
  files in one folder form one series only when all of that agrees.

Two series are never merged. Within a UID group, images whose size, orientation or pixel spacing
differ are split into parts (``…#part<N>``, with :attr:`SeriesInfo.split_reason`), and images that
repeat a slice position are split by the first attribute that separates them cleanly (acquisition
number, temporal position, stack, image/frame type). Non-image objects (RTSTRUCT, SEG's own
references, RT plans, ...) are listed as series too; :func:`labels_for` pairs label objects with
the image series they were drawn on.

Patient IDs are kept on :class:`SeriesInfo` for the private case mapping only; nothing here logs
them, and :attr:`SeriesInfo.short_key` (a hash) is what logs and file names should use.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.dicom.header import FileHeader, SkipFile, SliceRef, read_header
from pipeline.errors import InputError

ORIENTATION_TOLERANCE = 1e-3   # max difference of direction cosines within one series
SPACING_TOLERANCE = 1e-3       # relative difference of pixel spacings within one series
DUPLICATE_POSITION_MM = 0.01   # two images closer than this along the normal share a position
DISCRIMINATORS = ("AcquisitionNumber", "TemporalPositionIdentifier", "TemporalPositionIndex", "StackID",
                  "ImageType", "FrameType")


@dataclass(frozen=True)
class SkippedFile:
    """A file the scan could not use, and why."""

    path: Path
    reason: str
    damaged: bool = True  # looks like a cut or corrupted DICOM object (maybe a lost slice), see SkipFile
    series_uid: str = ""  # its SeriesInstanceUID when the header could be read that far



@dataclass
class SeriesInfo:
    """One series of an export (or one part of a series that had to be split)."""

    key: str
    grouping: str                     # "uid" or "fallback" (see module docstring)
    modality: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    series_description: str
    series_number: int | None
    convolution_kernel: str
    slice_thickness: float | None
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_id: str = field(repr=False)
    manufacturer: str = ""
    folder: str = field(default="", repr=False)  # relative to the scanned root; may name the patient
    files: list[Path] = field(default_factory=list, repr=False)
    slices: list[SliceRef] = field(default_factory=list, repr=False)
    rows: int = 0
    columns: int = 0
    pixel_spacing: tuple[float, float] | None = None  # (between rows, between columns) mm
    orientation: tuple[float, ...] | None = None       # ImageOrientationPatient of the first image
    orientation_label: str = ""                           # axial / coronal / sagittal ("" for non-images)
    obliquity_deg: float = 0.0        # angle between the slice normal and the nearest patient axis
    tilt_deg: float = 0.0             # angle between the slice normal and the direction slices step in
    slice_spacing: float | None = None  # median distance between slice positions along the normal
    transfer_syntaxes: tuple[str, ...] = ()
    part: int = 0                     # 0 = whole series; N ≥ 1 = part N of a split series
    split_reason: str = ""
    referenced_series_uids: tuple[str, ...] = ()
    referenced_sop_uids: tuple[str, ...] = ()
    referenced_frame_of_reference_uids: tuple[str, ...] = ()
    # files beside this series' images that could not be read as images, or that are images of this
    # series that disagree with it (size, pixel spacing): each may be a lost slice. Assembly refuses
    # the series or, when configured, leaves them out and names them.
    damaged_files: list[SkippedFile] = field(default_factory=list, repr=False)

    @property
    def short_key(self) -> str:
        """A 10-character hash of :attr:`key`: safe for logs and file names."""
        return hashlib.sha1(self.key.encode("utf-8")).hexdigest()[:10]

    @property
    def slice_count(self) -> int:
        return len(self.slices)

    @property
    def is_image(self) -> bool:
        return bool(self.slices)

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """Voxel spacing in our [i, j, k] order: (between columns, between rows, between slices) mm."""
        if self.pixel_spacing is None:
            return None
        return (self.pixel_spacing[1], self.pixel_spacing[0], float(self.slice_spacing or 0.0))

    @property
    def sop_instance_uids(self) -> set[str]:
        return {s.sop_instance_uid for s in self.slices if s.sop_instance_uid}

    @property
    def name(self) -> str:
        """How messages name this series: description and short key (no patient data)."""
        description = self.series_description or "no description"
        return f"series '{description}' [{self.short_key}]"


@dataclass
class ScanResult:
    """Everything a scan found: the series, the files it skipped (with reasons) and warnings."""

    root: Path
    series: list[SeriesInfo] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def image_series(self) -> list[SeriesInfo]:
        return [s for s in self.series if s.is_image]


@dataclass(frozen=True)
class LabelMatch:
    """A label object (RTSTRUCT or SEG) that belongs to an image series, and the evidence."""

    label: SeriesInfo
    evidence: str  # "referenced SeriesInstanceUID", "referenced SOP instances" or "FrameOfReferenceUID"


# ---------------------------------------------------------------------------------------------
# Scan
# ---------------------------------------------------------------------------------------------

def scan_export(root: Path, workers: int = 2, processes: int = 1) -> ScanResult:
    """Read every file's header below ``root`` (in parallel) and group the files into series.

    ``processes`` > 1: the headers are read in that many forked processes (header parsing holds the GIL, so
    threads share one core), in chunks of files, the results in file order as with threads; ``workers``
    threads otherwise. Call it with no other thread running when ``processes`` > 1 (see
    :class:`pipeline.ingest.workers.CaseProcesses`).
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root} does not exist. Point ingest at the folder (or file) of the DICOM export.")
    paths = _list_files(root)
    result = ScanResult(root=root)
    if processes > 1 and len(paths) >= PROCESS_SCAN_MIN_FILES:
        outcomes = _read_in_processes(paths, processes)
    else:
        outcomes = _read_in_threads(paths, workers)
    headers = []
    for outcome in outcomes:
        if isinstance(outcome, SkippedFile):
            result.skipped.append(outcome)
        else:
            headers.append(outcome)
    headers = _drop_repeated_instances(headers, result)
    base = root if root.is_dir() else root.parent
    for key, grouping, members in _group(headers, base, result):
        result.series.extend(_series_from_group(key, grouping, members, base))
    _make_keys_unique(result.series)
    _attach_damaged_files(result)
    _attach_stray_series(result)
    result.series.sort(key=lambda s: (s.folder, s.series_number if s.series_number is not None else 1 << 30,
                                      s.key))
    return result


# fewer files than this are read in threads even when processes are asked for (forking costs more than it saves)
PROCESS_SCAN_MIN_FILES = 64
PROCESS_SCAN_CHUNKS_PER_PROCESS = 4


def _read_in_threads(paths: list[Path], workers: int, description: str = "scanning DICOM headers") -> list:
    from pipeline.progress import Progress

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool, \
            Progress(len(paths), description, unit="file") as progress:
        outcomes = []
        for outcome in pool.map(_read_one, paths):
            outcomes.append(outcome)
            progress.update()
    return outcomes


def _read_chunk(paths: list[Path]) -> list:
    return [_read_one(path) for path in paths]


def _read_in_processes(paths: list[Path], processes: int) -> list:
    """:func:`_read_one` of every path, in forked processes; what a process that died did not read is read here."""
    from concurrent.futures.process import BrokenProcessPool

    from pipeline.ingest.workers import fork_pool
    from pipeline.progress import Progress

    size = max(1, math.ceil(len(paths) / (processes * PROCESS_SCAN_CHUNKS_PER_PROCESS)))
    chunks = [paths[start:start + size] for start in range(0, len(paths), size)]
    outcomes: list = []
    with fork_pool(processes) as pool:
        futures = [pool.submit(_read_chunk, chunk) for chunk in chunks]  # forks before the progress display
        with Progress(len(paths), "scanning DICOM headers", unit="file") as progress:
            for number, future in enumerate(futures):
                try:
                    part = future.result()
                except BrokenProcessPool:  # a file crashed its reader (a library fault): the rest in threads
                    import logging

                    logging.getLogger("ctseg").warning(
                        "scan: a header reader process stopped abruptly; the remaining %d file(s) are read in this "
                        "process", sum(len(c) for c in chunks[number:]))
                    progress.close()
                    rest = [path for chunk in chunks[number:] for path in chunk]
                    return outcomes + _read_in_threads(rest, 2, "scanning DICOM headers (the rest)")
                outcomes.extend(part)
                progress.update(len(part))
    return outcomes


def _make_keys_unique(series: list[SeriesInfo]) -> None:
    seen: dict[str, int] = {}
    for info in series:
        if info.key in seen:
            seen[info.key] += 1
            info.key = f"{info.key}#{seen[info.key]}"
        else:
            seen[info.key] = 1


def _list_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=False):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file():
                found.append(path)
    return found


def _read_one(path: Path):
    try:
        return read_header(path)
    except SkipFile as exc:
        return SkippedFile(path, str(exc), exc.damaged, exc.series_uid)
    except Exception as exc:  # noqa: BLE001 - one unreadable file must never end the scan
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        return SkippedFile(path, f"unreadable ({type(exc).__name__}: {first})")


def _attach_damaged_files(result: ScanResult) -> None:
    """A damaged file in the folder of an image series may be one of its slices: the series must know."""
    damaged_by_folder: dict[Path, list[SkippedFile]] = defaultdict(list)
    for skipped in result.skipped:
        if skipped.damaged:
            damaged_by_folder[skipped.path.parent].append(skipped)
    if not damaged_by_folder:
        return
    # a damaged file that names another series found in the export (an RTSTRUCT, another CT) is that
    # series' loss, not this one's; a damaged or unknown SeriesInstanceUID may be this series'
    known = {s.series_uid for s in result.series if s.series_uid}
    for info in result.series:
        if not info.is_image:
            continue
        folders = {path.parent for path in info.files}
        for folder in sorted(folders):
            info.damaged_files.extend(
                f for f in damaged_by_folder.get(folder, [])
                if not (f.series_uid and f.series_uid != info.series_uid and f.series_uid in known))


def _drop_repeated_instances(headers: list[FileHeader], result: ScanResult) -> list[FileHeader]:
    """The same SOP instance stored twice (a copied file) is read once; the copy is listed as skipped."""
    first_path: dict[tuple[str, str], Path] = {}
    kept = []
    for header in headers:
        uid = header.sop_instance_uid
        if uid:
            owner = (header.series_uid, uid)
            if owner in first_path:
                # an identical copy is harmless; a copy that differs means one of the two is damaged
                same = _same_bytes(header.path, first_path[owner])
                result.skipped.append(SkippedFile(
                    header.path, f"duplicate of {first_path[owner].name} (same SOPInstanceUID, "
                                 f"{'identical bytes' if same else 'but different content: one of them is damaged'})",
                    damaged=not same))
                continue
            first_path[owner] = header.path
        kept.append(header)
    return kept


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _patient_hash(patient_id: str) -> str:
    return hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:8]


def _group(headers: list[FileHeader], base: Path, result: ScanResult):
    """Yield (key, grouping, headers) per series before geometry splitting."""
    by_uid: dict[tuple[str, str], list[FileHeader]] = defaultdict(list)
    fallback: dict[str, list[FileHeader]] = defaultdict(list)
    for header in headers:
        if header.study_uid and header.series_uid:
            by_uid[(header.study_uid, header.series_uid)].append(header)
        else:
            folder = _relative_folder(header.path, base)
            key = (f"folder:{folder}|patient-{_patient_hash(header.patient_id)}|{header.modality}|"
                   f"{header.sop_class_uid}|series-{header.series_number}|for-{header.frame_of_reference_uid}")
            fallback[key].append(header)
    for (study, series), members in by_uid.items():
        patients = defaultdict(list)
        for header in members:
            patients[header.patient_id].append(header)
        if len(patients) > 1:
            result.warnings.append(f"series uid:{_short_uid(series)} holds files of {len(patients)} different "
                                   f"patients; they are kept apart as separate series")
            for patient_id, patient_members in patients.items():
                yield f"uid:{study}/{series}#patient-{_patient_hash(patient_id)}", "uid", patient_members
        else:
            yield f"uid:{study}/{series}", "uid", members
    for key, members in fallback.items():
        yield key, "fallback", members


def _short_uid(uid: str) -> str:
    return hashlib.sha1(uid.encode("utf-8")).hexdigest()[:10]


def _relative_folder(path: Path, base: Path) -> str:
    try:
        return path.parent.relative_to(base).as_posix() or "."
    except ValueError:
        return path.parent.as_posix()


def _series_from_group(key: str, grouping: str, headers: list[FileHeader], base: Path) -> list[SeriesInfo]:
    headers = sorted(headers, key=lambda h: str(h.path))
    images = [h for h in headers if h.is_image]
    others = [h for h in headers if not h.is_image]
    series = []
    if others:
        series.append(_make_series(key if not images else f"{key}#objects", grouping, others, [], base))
    if not images:
        return series
    by_class: dict[str, list[SliceRef]] = defaultdict(list)
    for header in images:
        by_class[header.sop_class_uid].extend(header.slices)
    clusters = [c for sop_class in sorted(by_class) for c in _geometry_clusters(by_class[sop_class])]
    clusters, stray = _absorb_stray_images(clusters)
    by_path = {h.path: h for h in images}

    def make(part_key: str, piece: list[SliceRef], part: int, reason: str) -> SeriesInfo:
        part_headers = [by_path[p] for p in dict.fromkeys(s.path for s in piece)]
        info = _make_series(part_key, grouping, part_headers, piece, base)
        info.part, info.split_reason = part, reason
        if stray and piece and piece[0] in stray[0]:
            info.damaged_files.extend(stray[1])
        return info

    if grouping == "fallback":  # without UIDs, each geometry is its own series, not a split one
        for cluster in clusters:
            cluster_key = f"{key}|{_geometry_signature(cluster[0])}"
            pieces = _split_repeated_positions(cluster)
            for number, (piece, reason) in enumerate(pieces, start=1):
                if len(pieces) == 1:
                    series.append(make(cluster_key, piece, 0, ""))
                else:
                    series.append(make(f"{cluster_key}#part{number}", piece, number, reason))
        return series
    geometry_reason = _describe_split(clusters, len(by_class)) if len(clusters) > 1 else ""
    parts = [(piece, "; ".join(r for r in (geometry_reason, reason) if r))
             for cluster in clusters for piece, reason in _split_repeated_positions(cluster)]
    for number, (piece, reason) in enumerate(parts, start=1):
        if len(parts) == 1:
            series.append(make(key, piece, 0, ""))
        else:
            series.append(make(f"{key}#part{number}", piece, number, reason))
    return series


STRAY_FRACTION = 0.1  # a geometry cluster this small (or of ≤ 2 images) inside a larger one is damage


def _absorb_stray_images(clusters: list[list[SliceRef]]):
    """Images that sit among a series' slices but disagree with them in size or pixel spacing are damaged.

    A genuine second geometry in one series (a localizer, a reformat) has its own orientation or its
    own extent; one or two images with the series' orientation, inside its slice range, whose Rows,
    Columns or PixelSpacing differ are a corrupted header. They are taken out of the clusters and
    returned as (set of the main cluster's slices, [SkippedFile]) so the series names them.
    """
    if len(clusters) < 2:
        return clusters, None
    main = max(clusters, key=len)
    along = _positions_along_normal(main)
    if along is None or len(main) < 3:
        return clusters, None
    normal = slice_normal(main[0].orientation)
    steps = np.diff(np.sort(along))
    steps = steps[steps >= DUPLICATE_POSITION_MM]
    step = float(np.median(steps)) if len(steps) else 0.0
    low, high = float(along.min()) - step, float(along.max()) + step
    limit = max(2, int(len(main) * STRAY_FRACTION))
    kept, damaged = [main], []
    for cluster in clusters:
        if cluster is main:
            continue
        inside = len(cluster) <= limit and all(
            s.position is not None and (_same_orientation(s, main[0]) or not _valid_orientation(s.orientation))
            and low <= float(np.dot(s.position, normal)) <= high for s in cluster)
        if not inside:
            kept.append(cluster)
            continue
        reference = main[0]
        for s in cluster:
            what = []
            if (s.pixel.rows, s.pixel.columns) != (reference.pixel.rows, reference.pixel.columns):
                what.append(f"Rows/Columns {s.pixel.rows}/{s.pixel.columns} (series: {reference.pixel.rows}/"
                            f"{reference.pixel.columns})")
            if s.pixel_spacing != reference.pixel_spacing:
                what.append(f"PixelSpacing {s.pixel_spacing} (series: {reference.pixel_spacing})")
            if not _same_orientation(s, reference):
                what.append(f"ImageOrientationPatient {s.orientation} (series: {reference.orientation})")
            if not what:
                what.append("SOPClassUID")
            damaged.append(SkippedFile(s.path, f"damaged: {' and '.join(what) or 'geometry'} differ from the rest "
                                               f"of the series although the image lies among its slices"))
    if not damaged:
        return clusters, None
    order = {id(c): i for i, c in enumerate(clusters)}
    kept.sort(key=lambda c: order[id(c)])
    return kept, (set(main), damaged)


def _valid_orientation(orientation) -> bool:
    """Unit, perpendicular row and column cosines (a damaged ImageOrientationPatient rarely is)."""
    if orientation is None:
        return False
    values = np.asarray(orientation, dtype=np.float64)
    return bool(abs(np.linalg.norm(values[:3]) - 1) <= 1e-3 and abs(np.linalg.norm(values[3:6]) - 1) <= 1e-3
                and abs(float(values[:3] @ values[3:6])) <= 1e-3)


STRAY_SERIES_IMAGES = 2  # a "series" of at most this many images lying among another's slices is damage


def _attach_stray_series(result: ScanResult) -> None:
    """One or two images beside a series, among its slices, that form a series of their own are damaged.

    A damaged SeriesInstanceUID, StudyInstanceUID, PatientID or SOP class moves a slice of a series
    into a "series" of its own; the series would silently lose it. Such images (same orientation, or
    none valid; inside the series' slice range along its normal, at a position the series does not
    already cover) are named as damaged files of it. Images at positions the series covers (key
    images saved as a series of their own) leave it complete and are left alone.
    """
    images = [s for s in result.series if s.is_image]
    for info in images:
        if info.slice_count < 3 or info.orientation is None:
            continue
        along = _positions_along_normal(info.slices)
        if along is None:
            continue
        step = float(info.slice_spacing or 0.0)
        low, high = float(along.min()) - 2 * step, float(along.max()) + 2 * step
        normal = slice_normal(info.orientation)
        folders = {path.parent for path in info.files}
        for other in images:
            if other is info or other.slice_count > STRAY_SERIES_IMAGES or other.slice_count >= info.slice_count:
                continue
            if not {path.parent for path in other.files} <= folders:
                continue
            # same Study/Series UIDs but kept apart because PatientID differs: a damaged PatientID
            patient_split = bool(other.series_uid) and other.series_uid == info.series_uid and \
                other.study_uid == info.study_uid and "#patient-" in other.key
            if not patient_split and not all(
                    s.position is not None and (_same_orientation(s, info.slices[0])
                                                or not _valid_orientation(s.orientation))
                    and low <= float(np.dot(s.position, normal)) <= high for s in other.slices):
                continue
            # an image at a position the series already covers (a key image, a saved copy) takes
            # nothing from it: only one that fills a hole or extends an end can be a lost slice
            if not patient_split and all(float(np.min(np.abs(along - float(np.dot(s.position, normal)))))
                                         <= 0.25 * step for s in other.slices):
                continue
            differing = [name for name, a, b in (
                ("StudyInstanceUID", other.study_uid, info.study_uid), ("SeriesInstanceUID", other.series_uid,
                                                                        info.series_uid),
                ("PatientID", other.patient_id, info.patient_id), ("SOPClassUID", other.sop_class_uid,
                                                                   info.sop_class_uid),
                ("Modality", other.modality, info.modality)) if a != b] or ["its grouping attributes"]
            for path in other.files:
                info.damaged_files.append(SkippedFile(path, f"damaged: lies among the series' slices with the same "
                                                            f"geometry but differs in {', '.join(differing)}"))


def _geometry_signature(slice_ref: SliceRef) -> str:
    orientation = "none" if slice_ref.orientation is None else ",".join(
        f"{v:.3f}" for v in slice_ref.orientation)
    spacing = "none" if slice_ref.pixel_spacing is None else ",".join(f"{v:.3f}" for v in slice_ref.pixel_spacing)
    return f"{slice_ref.pixel.rows}x{slice_ref.pixel.columns}|iop-{orientation}|ps-{spacing}"


def _same_geometry(a: SliceRef, b: SliceRef) -> bool:
    if (a.pixel.rows, a.pixel.columns) != (b.pixel.rows, b.pixel.columns):
        return False
    if (a.orientation is None) != (b.orientation is None) or (a.pixel_spacing is None) != (b.pixel_spacing is None):
        return False
    if a.orientation is not None and max(abs(x - y) for x, y in zip(a.orientation, b.orientation)) \
            > ORIENTATION_TOLERANCE:
        return False
    if a.pixel_spacing is not None and any(abs(x - y) > SPACING_TOLERANCE * max(abs(x), abs(y), 1e-9)
                                           for x, y in zip(a.pixel_spacing, b.pixel_spacing)):
        return False
    return True


def _geometry_clusters(slices: list[SliceRef]) -> list[list[SliceRef]]:
    clusters: list[list[SliceRef]] = []
    for slice_ref in slices:
        for cluster in clusters:
            if _same_geometry(cluster[0], slice_ref):
                cluster.append(slice_ref)
                break
        else:
            clusters.append([slice_ref])
    return clusters


def _describe_split(clusters: list[list[SliceRef]], sop_classes: int) -> str:
    first = clusters[0][0]
    differences = {"SOP classes"} if sop_classes > 1 else set()
    for cluster in clusters[1:]:
        other = cluster[0]
        if _same_geometry(first, other):
            continue
        if (other.pixel.rows, other.pixel.columns) != (first.pixel.rows, first.pixel.columns):
            differences.add("image sizes")
        elif other.orientation != first.orientation and not _same_orientation(other, first):
            differences.add("orientations")
        else:
            differences.add("pixel spacings")
    sizes = ", ".join(f"{len(c)} images {_geometry_label(c[0])}{_few_names(c)}" for c in clusters)
    return f"series mixes {' and '.join(sorted(differences))} ({sizes}); split into {len(clusters)} parts"


def _few_names(cluster: list[SliceRef]) -> str:
    """The file names of a small part, so that a warning about a split names the odd files out."""
    if len(cluster) > 3:
        return ""
    return " [" + ", ".join(dict.fromkeys(s.path.name for s in cluster)) + "]"


def _same_orientation(a: SliceRef, b: SliceRef) -> bool:
    if a.orientation is None or b.orientation is None:
        return a.orientation == b.orientation
    return max(abs(x - y) for x, y in zip(a.orientation, b.orientation)) <= ORIENTATION_TOLERANCE


def _geometry_label(slice_ref: SliceRef) -> str:
    label = orientation_label(slice_ref.orientation) or "no orientation"
    return f"{slice_ref.pixel.columns}x{slice_ref.pixel.rows} {label}"


def _positions_along_normal(slices: list[SliceRef]) -> np.ndarray | None:
    if not slices or slices[0].orientation is None or any(s.position is None for s in slices):
        return None
    normal = slice_normal(slices[0].orientation)
    return np.array([s.position for s in slices], dtype=np.float64) @ normal


def _has_repeated_positions(slices: list[SliceRef]) -> bool:
    along = _positions_along_normal(slices)
    if along is None or len(along) < 2:
        return False
    return bool(np.any(np.diff(np.sort(along)) < DUPLICATE_POSITION_MM))


def _split_repeated_positions(slices: list[SliceRef]) -> list[tuple[list[SliceRef], str]]:
    """Split images that repeat positions by the first attribute that separates them cleanly."""
    if not _has_repeated_positions(slices):
        return [(slices, "")]
    for name in DISCRIMINATORS:
        values = [dict(s.discriminators).get(name) for s in slices]
        if None in values or len(set(values)) < 2:
            continue
        groups: dict[str, list[SliceRef]] = defaultdict(list)
        for slice_ref, value in zip(slices, values):
            groups[value].append(slice_ref)
        pieces = [groups[v] for v in sorted(groups, key=_natural)]
        if all(len(p) >= 2 and not _has_repeated_positions(p) for p in pieces):
            reason = (f"images repeat slice positions; split by {name} into {len(pieces)} parts "
                      f"({', '.join(f'{name} {v}' for v in sorted(groups, key=_natural))})")
            return [(p, reason) for p in pieces]
    return [(slices, "")]  # assembly decides: identical copies are dropped, differing ones refused


def _natural(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _make_series(key: str, grouping: str, headers: list[FileHeader], slices: list[SliceRef],
                 base: Path) -> SeriesInfo:
    first = headers[0]
    # attributes that decide selection are the series' majority, so that one damaged header (often the
    # first file) cannot change what the series is
    info = SeriesInfo(
        key=key, grouping=grouping, modality=_majority(h.modality for h in headers), sop_class_uid=first.sop_class_uid,
        image_type=_majority(h.image_type for h in headers),
        series_description=_majority(h.series_description for h in headers),
        series_number=_majority(h.series_number for h in headers),
        convolution_kernel=_majority(h.convolution_kernel for h in headers),
        slice_thickness=first.slice_thickness, study_uid=first.study_uid, series_uid=first.series_uid,
        frame_of_reference_uid=first.frame_of_reference_uid, patient_id=first.patient_id,
        manufacturer=first.manufacturer, folder=_relative_folder(first.path, base),
        files=[h.path for h in headers], slices=list(slices),
        transfer_syntaxes=tuple(sorted({h.transfer_syntax for h in headers})),
        referenced_series_uids=_merge(h.referenced_series_uids for h in headers),
        referenced_sop_uids=_merge(h.referenced_sop_uids for h in headers),
        referenced_frame_of_reference_uids=_merge(h.referenced_frame_of_reference_uids for h in headers))
    if slices:
        _describe_geometry(info, first)
    return info


def _majority(values: Iterable):
    """The most common value (the first one seen among equally common values)."""
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=counts.get)


def _merge(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for group in groups for v in group))


def _describe_geometry(info: SeriesInfo, first_header: FileHeader) -> None:
    slices = info.slices
    reference = slices[0]
    info.rows, info.columns = reference.pixel.rows, reference.pixel.columns
    info.pixel_spacing = reference.pixel_spacing
    info.orientation = reference.orientation
    info.orientation_label = orientation_label(reference.orientation)
    info.obliquity_deg = obliquity_deg(reference.orientation)
    along = _positions_along_normal(slices)
    if along is not None and len(along) >= 2:
        order = np.argsort(along, kind="stable")
        positions = np.array([slices[i].position for i in order], dtype=np.float64)
        info.tilt_deg = tilt_angle_deg(reference.orientation, positions[-1] - positions[0])
        steps = np.diff(along[order])
        steps = steps[steps >= DUPLICATE_POSITION_MM]
        info.slice_spacing = float(np.median(steps)) if len(steps) else None
    if info.slice_spacing is None:
        info.slice_spacing = first_header.spacing_between_slices or first_header.slice_thickness


# ---------------------------------------------------------------------------------------------
# Geometry helpers shared with selection and assembly
# ---------------------------------------------------------------------------------------------

def slice_normal(orientation) -> np.ndarray:
    """Unit normal cross(row cosine, column cosine) of an ImageOrientationPatient (LPS)."""
    values = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(values[:3], values[3:6])
    length = np.linalg.norm(normal)
    return normal / length if length > 0 else normal


def orientation_label(orientation) -> str:
    """'axial', 'coronal' or 'sagittal': the patient axis closest to the slice normal."""
    if orientation is None:
        return ""
    normal = np.abs(slice_normal(orientation))
    if not np.any(normal):
        return ""
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def obliquity_deg(orientation) -> float:
    if orientation is None:
        return 0.0
    normal = np.abs(slice_normal(orientation))
    return float(math.degrees(math.acos(min(1.0, float(normal.max())))))


def tilt_angle_deg(orientation, step: np.ndarray) -> float:
    """Angle between the slice normal and the direction in which slice positions advance."""
    step = np.asarray(step, dtype=np.float64)
    length = np.linalg.norm(step)
    if orientation is None or length == 0:
        return 0.0
    normal = slice_normal(orientation)
    along = abs(float(step @ normal))
    across = float(np.linalg.norm(step - (step @ normal) * normal))
    return float(math.degrees(math.atan2(across, along)))


# ---------------------------------------------------------------------------------------------
# Pairing label objects with image series
# ---------------------------------------------------------------------------------------------

LABEL_MODALITIES = ("RTSTRUCT", "SEG")


def labels_for(image: SeriesInfo, series: list[SeriesInfo]) -> list[LabelMatch]:
    """RTSTRUCT/SEG series that were drawn on ``image``, with the evidence for each.

    The strongest evidence available decides: a label object that names the series it was drawn on
    (SeriesInstanceUID) pairs only by that; otherwise one that lists SOP instances pairs when they
    are images of ``image``; only when neither can be compared does FrameOfReferenceUID decide (CT,
    MR and PET of one study often share it, so it is the weakest evidence).
    """
    matches = []
    image_uids = image.sop_instance_uids
    for candidate in series:
        if candidate.modality not in LABEL_MODALITIES or candidate is image:
            continue
        if candidate.referenced_series_uids and image.series_uid:
            if image.series_uid in candidate.referenced_series_uids:
                matches.append(LabelMatch(candidate, "referenced SeriesInstanceUID"))
            continue
        if candidate.referenced_sop_uids and image_uids:
            if image_uids & set(candidate.referenced_sop_uids):
                matches.append(LabelMatch(candidate, "referenced SOP instances"))
            continue
        if image.frame_of_reference_uid and (
                image.frame_of_reference_uid in candidate.referenced_frame_of_reference_uids
                or image.frame_of_reference_uid == candidate.frame_of_reference_uid):
            matches.append(LabelMatch(candidate, "FrameOfReferenceUID"))
    return matches
