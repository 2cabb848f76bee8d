"""What the trainer iterates over: augmented 2-D patches for training, whole cases for evaluation.

- 3-D volumes are trained slice by slice (along the last axis) and evaluated per volume.
- Training samples are fixed-size random crops (``input_mode="crop"``) or whole images resized to a
  square (``"resize"``); validation and test run at native resolution (the PEG makes this possible).
- Randomness is a pure function of (seed, epoch, sample): the sampler yields ``(epoch, index)`` and
  each sample seeds its own augmentation, so a resumed run replays exactly what an uninterrupted run
  would have done, whatever the number of data-loading workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from biosam2.data.cases import Case
from biosam2.data.dataset_format import IGNORE_INDEX  # re-exported: padding and rotation fill with it


def build_augmentation(
    patch_size: int, input_mode: str, augment: bool, resize_to: int | None = None, random_crop: bool = True
) -> A.Compose:
    """Flips, rotations, scaling, intensity changes, then the crop (or resize) to ``patch_size``.

    ``resize_to``: a model that squashes its inputs to a fixed square (``input_size``) must train at
    that scale too, so every image is first resized to it (e.g. G-SAM's ISBI recipe: resize to 256,
    then 128-px crops). ``random_crop=False``: padded to at least ``patch_size``, the crop left to the
    caller (foreground-centred crops).
    """
    steps: list[A.BasicTransform] = []
    if resize_to is not None:
        steps.append(A.Resize(resize_to, resize_to, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST))
    if augment:
        steps += [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                rotate=(-90, 90),  # G-SAM's +-90 degree rotations
                scale=(0.8, 1.25),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
                p=0.7,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.RandomGamma(gamma_limit=(80, 125), p=0.3),
            A.GaussNoise(std_range=(0.0, 0.03), p=0.2),
        ]
    if input_mode == "crop":
        steps += [
            A.PadIfNeeded(patch_size, patch_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
            *([A.RandomCrop(patch_size, patch_size)] if random_crop else []),
        ]
    elif input_mode == "resize":
        steps += [A.Resize(patch_size, patch_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)]
    else:
        raise ValueError(f"input_mode must be 'crop' or 'resize', got {input_mode!r}")
    return A.Compose(steps)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class EpochSeededSampler(Sampler):
    """Shuffles with a permutation that depends only on (seed, epoch); yields ``(epoch, index)``.

    With several processes (multi-GPU), each takes every ``num_replicas``-th sample of the same
    permutation (padded by wrapping around so that all take the same number of steps), as
    ``DistributedSampler`` does; Lightning must then be told not to wrap it again.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.arange(self.num_samples)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        total = len(self) * self.num_replicas
        order = np.resize(order, total)  # wraps around to pad
        return iter((self.epoch, int(i)) for i in order[self.rank : total : self.num_replicas])

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)


class ShardSampler(Sampler):
    """Every ``num_replicas``-th item from ``rank`` on, unpadded: each validation case is seen once."""

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, num_items, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


LARGE_IMAGE = 4  # planes more than this many crops wide are read one region per sample


class SliceDataset(Dataset):
    """Every 2-D image, and every slice of every volume, of the training cases, augmented.

    ``cases``: in-memory :class:`Case` objects, or :class:`~biosam2.data.cache.CachedCase` entries that
    read each sample's slice from the preprocessed cache (the same values, so the same samples).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: int,
        input_mode: str = "crop",
        augment: bool = True,
        seed: int = 0,
        resize_to: int | None = None,
        foreground_share: float = 0.0,
    ):
        if foreground_share and input_mode != "crop":
            raise ValueError("foreground-centred samples need input_mode='crop'")
        self.cases = list(cases)
        self.samples = [(c, z) for c, case in enumerate(self.cases) for z in (range(case.num_slices) if case.is_volume else [None])]
        # With no foreground share, albumentations' own RandomCrop: the samples of runs before this option.
        self.transform = build_augmentation(patch_size, input_mode, augment, resize_to, random_crop=not foreground_share)
        self.patch_size = patch_size
        self.foreground_share = foreground_share
        # Crops of images far larger than the crop come from a random region twice the crop's side (room
        # for the rotations and the 0.8 zoom-out), so a 3000x2000 image is never read whole for one crop.
        self.region_side = 2 * patch_size if input_mode == "crop" and resize_to is None else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        case_index, z = self.samples[index]
        case, rng = self.cases[case_index], np.random.default_rng([self.seed, epoch, index, 1])
        centred = bool(self.foreground_share) and rng.random() < self.foreground_share
        if centred and case.is_volume and case.foreground_slices:  # a slice that has foreground (the stored index)
            z = case.foreground_slices[int(rng.integers(len(case.foreground_slices)))]
        image, label = case.sample(z, self._region(case, z, np.random.default_rng([self.seed, epoch, index, 2]), centred))
        self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
        # uint8 is lossless: class ids are below IGNORE_INDEX (255), which dataset_format enforces.
        # Masks are resampled nearest-neighbour, so IGNORE_INDEX never blends into a class.
        out = self.transform(image=np.ascontiguousarray(np.moveaxis(image, 0, -1)), mask=label.astype(np.uint8))
        if self.foreground_share:
            out = self._crop(out["image"], out["mask"], rng, centred)
        image_out = torch.from_numpy(np.ascontiguousarray(np.moveaxis(out["image"], -1, 0), dtype=np.float32))
        return image_out, torch.from_numpy(out["mask"].astype(np.int64))


    def _region(self, case, z: int | None, rng: np.random.Generator, centred: bool) -> tuple[slice, slice] | None:
        """A (region_side)-square window of a plane more than LARGE_IMAGE crops wide (else None: all of
        it): at random, or, for a foreground-centred sample, around a random foreground pixel (found in
        the label plane alone, 1 byte a pixel)."""
        plane, side = case.plane_shape, self.region_side
        if side is None or max(plane) <= LARGE_IMAGE * self.patch_size:
            return None
        labels = case.labels_of(z) if centred else None
        foreground = np.flatnonzero((labels > 0) & (labels != IGNORE_INDEX)) if labels is not None else ()
        if len(foreground):
            centre = divmod(int(rng.choice(foreground)), plane[1])
            starts = [min(max(c - side // 2, 0), max(n - side, 0)) for c, n in zip(centre, plane)]
        else:
            starts = [int(rng.integers(0, max(n - side, 0) + 1)) for n in plane]
        return tuple(slice(start, start + side) for start in starts)

    def _crop(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, centred: bool) -> dict[str, np.ndarray]:
        """nnU-Net's oversampling: a ``foreground_share`` of the samples (``centred``) comes from a slice
        with foreground (volumes) and is centred on a random annotated foreground pixel of the augmented
        slice (when it kept one); the rest is placed at random."""
        size, (height, width) = self.patch_size, mask.shape
        foreground = np.flatnonzero((mask > 0) & (mask != IGNORE_INDEX)) if centred else ()
        if len(foreground):
            y, x = divmod(int(rng.choice(foreground)), width)
            top, left = min(max(y - size // 2, 0), height - size), min(max(x - size // 2, 0), width - size)
        else:
            top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        return {"image": image[top : top + size, left : left + size], "mask": mask[top : top + size, left : left + size]}


class CaseDataset(Dataset):
    """Whole cases at native resolution (validation and test), loaded one at a time when cached."""

    def __init__(self, cases: Sequence[Case]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> Case:
        return self.cases[index].load()


def collate_cases(batch: list[Case]) -> list[Case]:
    return batch
