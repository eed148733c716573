"""A synthetic radiotherapy export (CT + RTSTRUCT with varying ROI names) for the structure and case-id tests."""
from __future__ import annotations

import numpy as np
import pydicom
from scipy import ndimage

from pipeline.geometry import Volume
from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series, write_rtstruct
from pipeline.synthetic.phantoms import PhantomOptions, make_phantom

SMALL = dict(shape=44, slices=12, inplane_spacing_min=2.0, inplane_spacing_max=2.6, slice_spacing_min=3.0,
             slice_spacing_max=4.0)


PATIENTS = {
    "RT001": (dict(direction="identity", feet_first=False), {"GTV": "gtv", "PTV": "ptv", "BODY": "body",
                                                             "z_help": "help"}),
    "RT002": (dict(direction="identity", feet_first=True), {"gtv_1": "gtv", "PTV": "ptv", "BODY": "body"}),
    "RT003": (dict(direction="oblique", feet_first=False), {"GTV Primary": "none", "PTV": "ptv", "BODY": "body"}),
    "RT004": (dict(direction="identity", feet_first=False), {"PTV": "ptv", "BODY": "body"}),
}


def _masks(phantom) -> dict[str, np.ndarray]:
    body = np.asarray(phantom.image.array) > -400
    gtv = np.asarray(phantom.label.array) == 1
    ptv = ndimage.binary_dilation(gtv, iterations=2) & body
    return {"gtv": gtv, "ptv": ptv, "body": body, "help": np.asarray(phantom.label.array) == 2,
            "none": np.zeros_like(gtv)}


def _merged_rtstruct(files, image: Volume, rois: dict[str, np.ndarray], path) -> None:
    """One RTSTRUCT holding overlapping ROIs: written one ROI at a time by write_rtstruct, then joined."""
    parts = []
    for index, (name, mask) in enumerate(rois.items()):
        part = path.parent / f".part{index}.dcm"
        write_rtstruct(Volume(mask.astype(np.uint8), image.affine), files, part, {1: name})
        parts.append(pydicom.dcmread(part))
        part.unlink()
    joined = parts[0]
    for number, part in enumerate(parts[1:], start=2):
        roi, contour, observation = (part.StructureSetROISequence[0], part.ROIContourSequence[0],
                                     part.RTROIObservationsSequence[0])
        roi.ROINumber = contour.ReferencedROINumber = observation.ReferencedROINumber = number
        observation.ObservationNumber = number
        contour.ROIDisplayColor = [number * 40, 255 - number * 40, 90]
        joined.StructureSetROISequence.append(roi)
        joined.ROIContourSequence.append(contour)
        joined.RTROIObservationsSequence.append(observation)
    joined.save_as(path)


def write_rt_export(root):
    """The export, and per patient the image and the masks written into its RTSTRUCT (for comparison)."""
    truth = {}
    for seed, (patient, (geometry, rois)) in enumerate(PATIENTS.items()):
        phantom = make_phantom(seed + 3, PhantomOptions(**SMALL, **geometry))
        files = write_ct_series(phantom.image, root / patient / "ct",
                                SeriesWriteOptions(patient_id=patient, patient_name=f"DOE^{patient}",
                                                   series_number=2))
        masks = _masks(phantom)
        chosen = {name: masks[kind] for name, kind in rois.items()}
        _merged_rtstruct(files, phantom.image, chosen, root / patient / "rs" / "RS.dcm")
        truth[patient] = (phantom.image, chosen)
    return truth
