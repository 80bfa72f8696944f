"""Training data: healthy FLAIR volumes -> preprocessed axial slices held in memory.

Every slice goes through :func:`napari_tae.brain.resolve_brain_mask` and
:func:`napari_tae.preprocess.prepare_volume`, the code path the plugin uses at inference, with the
run's :class:`~napari_tae.preprocess.PreprocessOptions` (recorded in the checkpoint), so the model
is trained on exactly what it will be fed. Slices are stored once,
as float16 (half the memory of float32; its ~1e-3 relative error is far below the 1 % squash
threshold), and batches are gathered by fancy indexing instead of per-item collation.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from napari_tae.brain import resolve_brain_mask
from napari_tae.io import is_nifti_path, nifti_files, nifti_stem
from napari_tae.preprocess import PreprocessOptions, prepare_volume

__all__ = [
    "InputError",
    "resolve_volumes",
    "pair_by_name",
    "split_by_volume",
    "SliceDataset",
    "VolumeSlices",
    "load_slices",
    "iter_batches",
]

_logger = logging.getLogger(__name__)

# Tokens that name what a file holds rather than whose scan it is ("case01_flair" vs "case01_seg").
_ROLE_TOKENS = frozenset({
    "flair", "t2", "t2flair", "image", "img", "vol", "volume", "seg", "segmentation", "label",
    "labels", "lesion", "lesions", "mask", "masks", "brainmask", "brain", "gt", "truth", "ground",
})


def configure_logging() -> None:
    """INFO lines with a timestamp on stderr for the ``python -m training`` commands, unless the
    caller (a test, an embedding program) configured logging already."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


class InputError(ValueError):
    """Bad user input detected before training/evaluation starts (one-line message)."""


def _is_nifti(path: Path) -> bool:
    return path.is_file() and is_nifti_path(path)


def resolve_volumes(specs: Sequence[str | os.PathLike], what: str = "--data") -> list[Path]:
    """Expand folders (their NIfTI files) and glob patterns into a sorted, de-duplicated list.

    Raises:
        InputError: a spec matches nothing, or the whole list holds no NIfTI file.
    """
    found: dict[Path, None] = {}  # absolute, links not followed: names are what pairs files
    for spec in specs:
        spec = os.fspath(spec)
        path = Path(spec)
        if path.is_dir():
            hits = nifti_files(path)
            if not hits:
                raise InputError(f"{what} {spec}: folder holds no NIfTI volume (.nii/.nii.gz)")
        elif path.is_file():
            hits = [path]
        else:
            hits = sorted(Path(p) for p in glob.glob(spec, recursive=True) if _is_nifti(Path(p)))
            if not hits:
                raise InputError(f"{what} {spec}: no such file, folder, or NIfTI files matching the pattern")
        for p in hits:
            found.setdefault(p.absolute(), None)
    if not found:
        raise InputError(f"{what}: no volumes given")
    return list(found)


def _pair_key(path: Path) -> str:
    tokens = [t for t in re.split(r"[_\-.\s]+", nifti_stem(path).lower()) if t]
    kept = [t for t in tokens if t not in _ROLE_TOKENS]
    return "_".join(kept or tokens)


def pair_by_name(images: Sequence[Path], others: Sequence[Path], what: str = "labels",
                 *, allow_missing: bool = False) -> list[Path | None]:
    """For each image, the file of ``others`` with the same name.

    Names match when equal after removing role words (``flair``, ``seg``, ``label``, ``mask`` ...),
    so ``sub1_flair.nii.gz`` pairs with ``sub1_seg.nii.gz`` and ``labels/sub1.nii.gz``.

    Raises:
        InputError: naming the files without a partner (unless ``allow_missing``, when images
            without a partner get ``None``) or names that are ambiguous.
    """
    by_key: dict[str, Path] = {}
    for p in others:
        key = _pair_key(p)
        if key in by_key:
            raise InputError(f"{what}: {by_key[key].name} and {p.name} both match volume name '{key}'")
        by_key[key] = p
    image_keys = [_pair_key(p) for p in images]
    if len(set(image_keys)) != len(image_keys):
        dup = next(k for k in image_keys if image_keys.count(k) > 1)
        raise InputError(f"images: two volumes share the name '{dup}'; cannot pair {what} by name")
    unmatched_images = [p.name for p, k in zip(images, image_keys) if k not in by_key]
    unmatched_others = sorted(p.name for k, p in by_key.items() if k not in set(image_keys))
    if unmatched_others or (unmatched_images and not allow_missing):
        parts = []
        if unmatched_images and not allow_missing:
            parts.append(f"no {what} for {', '.join(unmatched_images[:5])}")
        if unmatched_others:
            parts.append(f"no volume for {what} {', '.join(unmatched_others[:5])}")
        raise InputError(f"{what} do not pair with volumes by name: " + "; ".join(parts))
    return [by_key.get(k) for k in image_keys]


def split_by_volume(paths: Sequence[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split whole volumes (never slices of one volume) into train and validation.

    Raises:
        InputError: fewer than two volumes, or a fraction outside (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    n = len(paths)
    if n < 2:
        raise InputError(f"too few volumes for a validation split: {n} given, need at least 2 "
                         "(or pass --val-data)")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


@dataclass
class VolumeSlices:
    """What one volume contributed (for logging and the checkpoint's training record)."""

    path: Path
    n_slices: int
    kept: int
    excluded_lesion: int = 0


class SliceDataset(torch.utils.data.Dataset):
    """Preprocessed axial slices, ``(N, S, S)`` float16 in [0, 1], held in memory.

    ``dataset[i]`` is one ``(1, S, S)`` slice; ``dataset[list_of_indices]`` (and ``__getitems__``,
    used by :class:`torch.utils.data.DataLoader`) gathers a whole batch in one indexing operation.
    """

    def __init__(self, slices: torch.Tensor, volumes: list[VolumeSlices] | None = None):
        if slices.ndim != 3:
            raise ValueError(f"slices must be (N, S, S), got shape {tuple(slices.shape)}")
        self.slices = slices
        self.volumes = volumes or []

    def __len__(self) -> int:
        return self.slices.shape[0]

    @property
    def img_size(self) -> int:
        return int(self.slices.shape[-1])

    def __getitem__(self, index):
        return self.slices[index].unsqueeze(-3)

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return self.slices[torch.as_tensor(indices, dtype=torch.long)].unsqueeze(1)

    def to(self, device: torch.device) -> SliceDataset:
        return SliceDataset(self.slices.to(device), self.volumes)


def collate_batch(batch):
    """DataLoader collate for :meth:`SliceDataset.__getitems__` (already a batch tensor)."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)


def _load_lesion(path: Path, shape: tuple[int, ...], volume_path: Path) -> np.ndarray:
    from napari_tae.io import VolumeError, load_mask

    try:
        lesion = load_mask(path).data > 0
    except VolumeError as exc:
        raise InputError(str(exc)) from None
    if lesion.shape != tuple(shape):
        raise InputError(f"{path}: lesion mask shape {lesion.shape} does not match volume "
                         f"{volume_path.name} shape {tuple(shape)}")
    return lesion


def load_slices(paths: Sequence[Path], img_size: int, *, min_brain_fraction: float = 0.1,
                lesion_masks: Sequence[Path | None] | None = None,
                options: PreprocessOptions | None = None,
                skull_strip: str = "auto") -> SliceDataset:
    """Load, preprocess and keep the usable slices of ``paths``.

    Args:
        paths: NIfTI volumes (healthy, or with ``lesion_masks``).
        img_size: model input size S.
        min_brain_fraction: drop slices whose brain area is below this fraction of the volume's
            largest axial brain area (top/bottom of the head, mostly background).
        lesion_masks: per volume a lesion mask (or None); slices touching a lesion are dropped.
        options: the run's preprocessing (normalisation percentiles, mm per pixel, N4;
            None = defaults).
        skull_strip: as in :func:`napari_tae.brain.resolve_brain_mask`.

    Raises:
        InputError: a volume cannot be read (message names it), or nothing usable remains.
    """
    from napari_tae.io import VolumeError, load_volume

    chunks: list[torch.Tensor] = []
    records: list[VolumeSlices] = []
    lesion_masks = list(lesion_masks) if lesion_masks is not None else [None] * len(paths)
    for path, lesion_path in zip(paths, lesion_masks):
        try:
            volume = load_volume(path)
        except (VolumeError, OSError, ValueError) as exc:
            msg = str(exc)
            raise InputError(msg if str(path.name) in msg else f"{path}: {msg}") from None
        try:
            brain = resolve_brain_mask(volume.data, volume.geometry.spacing, skull_strip=skull_strip)
            prepared = prepare_volume(volume.data, img_size, mask=brain.mask,
                                      spacing=volume.geometry.spacing, options=options)
        except ValueError as exc:  # e.g. an empty brain mask, a failed brain extraction
            raise InputError(f"{path}: {exc}") from None
        area = prepared.mask_slices.reshape(prepared.mask_slices.shape[0], -1).sum(axis=1)
        keep = area >= max(1, min_brain_fraction * area.max()) if area.max() > 0 else np.zeros_like(area, bool)
        excluded = 0
        if lesion_path is not None:
            lesion = _load_lesion(lesion_path, volume.data.shape, path)
            touched = lesion.reshape(lesion.shape[0], -1).any(axis=1)
            excluded = int((keep & touched).sum())
            keep &= ~touched
        records.append(VolumeSlices(path, int(area.shape[0]), int(keep.sum()), excluded))
        if keep.any():
            chunks.append(torch.from_numpy(np.ascontiguousarray(prepared.slices[keep])).to(torch.float16))
        del volume, prepared
    if not chunks:
        raise InputError(f"no usable slices in {len(paths)} volume(s) "
                         f"(first: {paths[0]}); is the brain empty or every slice excluded?")
    return SliceDataset(torch.cat(chunks), records)


def iter_batches(dataset: SliceDataset, indices: Sequence[int] | torch.Tensor,
                 batch_size: int) -> Iterator[torch.Tensor]:
    """Batches ``(B, 1, S, S)`` of ``dataset`` in the given index order (in-memory fast path)."""
    indices = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices,
                              dtype=torch.long)
    for start in range(0, len(indices), batch_size):
        yield dataset.__getitems__(indices[start:start + batch_size].to(dataset.slices.device))
