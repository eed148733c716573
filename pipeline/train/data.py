"""Training patches from the cached arrays: in-memory cases, class-balanced crops and augmentation.

Every patch is a pure function of ``(seed, fold, rank, item index)``: its random state is derived
from those numbers, not drawn from a shared generator. Resuming at step ``s`` therefore sees
exactly the patches an uninterrupted run would, with any number of loader workers, and each
torchrun rank draws its own shard of patches.

2D mode crops a ``(pi, pj, 2n+1)`` block around an axial slice (n = ``context_slices``), turns its
slices into channels and keeps the centre slice's label: one sampler serves 2D, 2.5D and 3D.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.preprocess.cache import load_cached_case
from pipeline.train.options import TrainConfig

MAX_INDICES = 200_000  # centre candidates kept per case and kind (memory stays small for large volumes)


@dataclass
class CaseArrays:
    """One cached case in memory, padded so that a patch fits, with its crop-centre candidates."""

    id: str
    image: np.ndarray  # float32 [i, j, k]
    label: np.ndarray  # uint8 [i, j, k]
    centres: list[np.ndarray]  # flat voxel indices: [anywhere, class 1, ..., class K-1]


@dataclass
class SamplingSpec:
    """What one training item looks like."""

    mode: str
    patch_size: list[int]
    context_slices: int

    @property
    def crop_size(self) -> list[int]:
        if self.mode == "2d":
            return [*self.patch_size, 2 * self.context_slices + 1]
        return list(self.patch_size)

    @property
    def spatial_dims(self) -> int:
        return 2 if self.mode == "2d" else 3


def derived_seed(*parts) -> int:
    """A 31-bit seed that depends on every part (stable across processes and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def load_cases(preprocess_dir: Path, entries: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Image and label arrays of the given index entries, by case id."""
    loaded = {}
    for entry in entries:
        image, label, _ = load_cached_case(preprocess_dir, entry)
        loaded[entry["id"]] = (image, label)
    return loaded


def prepare_case(case_id: str, image: np.ndarray, label: np.ndarray, spec: SamplingSpec, seed: int,
                 n_classes: int) -> CaseArrays:
    """Pad to the crop size (image with its minimum, i.e. air; label with background) and list centres."""
    crop = spec.crop_size
    pad = []
    for axis, size in enumerate(crop):
        if spec.mode == "2d" and axis == 2:
            pad.append((spec.context_slices, spec.context_slices))  # neighbours of the edge slices
            continue
        extra = max(0, size - image.shape[axis])
        pad.append((extra // 2, extra - extra // 2))
    if any(p for pair in pad for p in pair):
        edge = spec.mode == "2d" and spec.context_slices > 0
        image = _pad(image, pad, edge_axis=2 if edge else None)
        label = np.pad(label, pad, mode="constant", constant_values=0)
    valid = np.ones(label.shape, dtype=bool)
    if spec.mode == "2d" and spec.context_slices:
        # centres only on real slices: the repeated edge slices carry no label of their own
        valid[:, :, :spec.context_slices] = False
        valid[:, :, label.shape[2] - spec.context_slices:] = False
    rng = np.random.default_rng(seed)
    flat = label.ravel()
    valid = valid.ravel()
    centres = [_subsample(np.flatnonzero(valid), rng)]  # 'background' centres may fall anywhere, as in nnU-Net
    for cls in range(1, n_classes):
        centres.append(_subsample(np.flatnonzero((flat == cls) & valid), rng))
    return CaseArrays(case_id, np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label), centres)


def _pad(image: np.ndarray, pad: list[tuple[int, int]], edge_axis: int | None) -> np.ndarray:
    if edge_axis is not None:
        edge_pad = [(0, 0)] * 3
        edge_pad[edge_axis] = pad[edge_axis]
        image = np.pad(image, edge_pad, mode="edge")
        pad = [p if axis != edge_axis else (0, 0) for axis, p in enumerate(pad)]
    return np.pad(image, pad, mode="constant", constant_values=float(image.min()))


def _subsample(indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if indices.size > MAX_INDICES:
        indices = np.sort(rng.choice(indices, MAX_INDICES, replace=False))
    return indices.astype(np.int64)


def check_patch_fits(spec: SamplingSpec, shapes: dict[str, tuple[int, ...]]) -> None:
    """A patch must fit inside at least the largest image along every axis; smaller images are padded."""
    for axis, size in enumerate(spec.patch_size):
        largest_case, largest = max(((case, shape[axis]) for case, shape in shapes.items()), key=lambda x: x[1])
        if size > largest:
            raise ConfigError(f"train.patch_size {spec.patch_size} must fit inside the largest preprocessed image "
                              f"along every axis, got {size} voxels along axis {axis}, where the largest image "
                              f"(case {largest_case}) has {largest}: every patch would be partly padding. Use a "
                              f"patch_size of at most {largest} along axis {axis} (null plans one), or a finer "
                              f"preprocess.target_spacing.")


def build_augmentation(spec: SamplingSpec, options: TrainConfig):
    """MONAI dictionary transforms applied to one cropped item (keys 'image', 'label')."""
    from monai.transforms import Compose, MapTransform, RandAffined, RandFlipd, RandGaussianNoised, RandShiftIntensityd

    aug = options.augment
    transforms: list[MapTransform] = []
    if not aug.enabled:
        return Compose(transforms)
    dims = spec.spatial_dims
    for axis in sorted(set(aug.flip_axes)):
        if axis not in (0, 1, 2):
            raise ConfigError(f"train.augment.flip_axes must hold axes 0, 1 or 2, got {aug.flip_axes}.")
        if axis < dims and aug.flip_prob > 0:
            transforms.append(RandFlipd(keys=["image", "label"], prob=aug.flip_prob, spatial_axis=axis))
    if aug.affine_prob > 0:
        angle = np.deg2rad(aug.rotate_degrees)
        rotate = (angle,) if dims == 2 else (angle, angle, angle)
        transforms.append(RandAffined(keys=["image", "label"], prob=aug.affine_prob, rotate_range=rotate,
                                      scale_range=(aug.scale_range,) * dims, mode=("bilinear", "nearest"),
                                      padding_mode=("border", "zeros")))
    if aug.intensity_shift > 0:
        transforms.append(RandShiftIntensityd(keys=["image"], offsets=aug.intensity_shift, prob=0.5))
    if aug.noise_std > 0:
        transforms.append(RandGaussianNoised(keys=["image"], std=aug.noise_std, prob=0.2))
    return Compose(transforms)


class PatchDataset(torch.utils.data.Dataset):
    """Item ``n`` is the n-th training patch of this fold and rank (any n ≥ 0; see module docstring)."""

    def __init__(self, cases: list[CaseArrays], spec: SamplingSpec, options: TrainConfig, seed: int,
                 fold: int, rank: int):
        from monai.transforms import RandCropByLabelClassesd

        if not cases:
            raise ValueError("PatchDataset needs at least one case")
        self.cases = cases
        self.spec = spec
        self.key = (seed, fold, rank)
        ratio = min(max(options.foreground_ratio, 0.0), 1.0)
        n_foreground = len(cases[0].centres) - 1
        # RandCropByPosNegLabeld's multi-class form: a patch is centred on a random voxel (1 - ratio) or on a
        # voxel of a foreground class drawn uniformly (ratio), so small organs get as many patches as large ones
        self.crop = RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=spec.crop_size,
                                            ratios=[1.0 - ratio] + [ratio / n_foreground] * n_foreground,
                                            num_classes=n_foreground + 1, num_samples=1, indices_key="centres",
                                            allow_smaller=True, warn=False)
        self.augment = build_augmentation(spec, options)
        from monai.transforms import Randomizable

        self.randomizable = [self.crop] + [t for t in self.augment.transforms if isinstance(t, Randomizable)]

    def __len__(self) -> int:  # effectively unbounded; the training loop decides how many items it takes
        return 2 ** 31 - 1

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        from monai.data import get_track_meta, set_track_meta

        state = np.random.RandomState(derived_seed(*self.key, int(item)))
        case = self.cases[state.randint(len(self.cases))]
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: no metadata bookkeeping on the hot path
        try:
            # one generator per item, shared by the transforms in a fixed order (seeding one per transform
            # costs more than the transforms themselves on small 2D patches)
            for transform in self.randomizable:
                transform.set_random_state(state=state)
            data = {"image": case.image[None], "label": case.label[None], "centres": case.centres}
            cropped = self.crop(data)[0]
            item_data = {"image": cropped["image"], "label": cropped["label"]}
            if self.spec.mode == "2d":
                item_data = _slices_to_channels(item_data, self.spec.context_slices)
            out = self.augment(item_data)
        finally:
            set_track_meta(tracking)
        image = torch.as_tensor(out["image"], dtype=torch.float32)
        label = torch.as_tensor(out["label"]).to(torch.uint8)
        return image.contiguous(), label.contiguous()


def _slices_to_channels(item: dict, context: int) -> dict:
    """[1, pi, pj, 2n+1] → image [2n+1, pi, pj] and the centre slice's label [1, pi, pj]."""
    image = torch.as_tensor(item["image"])[0].permute(2, 0, 1)
    label = torch.as_tensor(item["label"])[:, :, :, context]
    return {"image": image.contiguous(), "label": label.contiguous()}


def batch_items(dataset: PatchDataset, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of (1-based) ``step``, built in this process."""
    first = (step - 1) * batch_size
    items = [dataset[first + b] for b in range(batch_size)]
    return torch.stack([i for i, _ in items]), torch.stack([lbl for _, lbl in items])


class StepBatches(torch.utils.data.Sampler):
    """Index batches for steps ``start..stop`` (1-based), for a DataLoader with worker processes."""

    def __init__(self, start: int, stop: int, batch_size: int):
        self.start, self.stop, self.batch_size = start, stop, batch_size

    def __iter__(self):
        for step in range(self.start, self.stop + 1):
            first = (step - 1) * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return max(0, self.stop - self.start + 1)


def batches(dataset: PatchDataset, start: int, stop: int, batch_size: int, workers: int, pin_memory: bool = False):
    """Yield (step, images, labels) for steps start..stop.

    With workers, one DataLoader serves the whole run (its single pass is every step from start to
    stop), so its workers already live across validations: ``persistent_workers`` would change
    nothing. ``pin_memory`` (CUDA) lets the copies to the GPU run asynchronously.
    """
    if workers <= 0:
        for step in range(start, stop + 1):
            images, labels = batch_items(dataset, step, batch_size)
            if pin_memory:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield step, images, labels
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=StepBatches(start, stop, batch_size),
                                         num_workers=workers, persistent_workers=False, prefetch_factor=2,
                                         pin_memory=pin_memory)
    for step, (images, labels) in zip(range(start, stop + 1), loader):
        yield step, images, labels
