"""Running a reconstruction model on a FLAIR volume, batch by batch (torch; no napari, no Qt).

Steps 4-9 of the evaluation protocol of Ghorbel et al. 2022, "Transformer based Models for
Unsupervised Anomaly Segmentation in Brain MR Images" (https://arxiv.org/abs/2207.02059): axial
slices prepared by :func:`napari_tae.preprocess.prepare_volume`, reconstructed by the model, mapped
back to the native grid; residual, median filter, squash and connected components by
:mod:`napari_tae.postprocess`.

:func:`iter_reconstruct` is a generator that yields ``(slices_done, total)`` after every batch and
returns the :class:`Reconstruction` as its ``StopIteration`` value, so a GUI worker can show
progress and cancel by closing it, while :func:`reconstruct` and :func:`segment` consume the same
generator headlessly (the CLI, training's calibration and tests). Results are written into arrays
private to one run; a generator closed mid-run leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._allocator import keep_freed_memory, release_freed_memory
from ._slice_workers import SliceWorkers
from .brain import resolve_brain_mask
from .export import mask_settings
from .options import DEVICE_CHOICES, PRECISIONS
from .postprocess import anomaly_mask, lesion_table
from .postprocess import residual as residual_map
from .preprocess import NormParams, PreprocessOptions, prepare_volume
from .scores import default_score, label_free_squash, score_spec

__all__ = [
    "Reconstruction",
    "Segmentation",
    "default_squash",
    "inference_job",
    "iter_reconstruct",
    "precision_note",
    "reconstruct",
    "resolve_precision",
    "segment",
    "select_device",
]

_logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# device
# --------------------------------------------------------------------------------------------
def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(preference: str | torch.device = "auto") -> torch.device:
    """The torch device to run on: ``"auto"`` picks cuda, then mps, then cpu.

    Args:
        preference: ``"auto"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"cpu"`` or a torch.device.

    Raises:
        ValueError: unknown name, or a device that this machine's torch cannot use.
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    name = str(preference).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ValueError("Device 'mps' requested but Apple MPS is not available here.")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"Device {name!r} requested but CUDA is not available "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})."
            )
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"Invalid CUDA device {name!r}; expected 'cuda' or 'cuda:N'.") from None
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"Device {name!r} requested but only {count} CUDA device(s) exist.")
        return device
    raise ValueError(f"Unknown device {preference!r}; choose one of {', '.join(DEVICE_CHOICES)} or cuda:N.")


# --------------------------------------------------------------------------------------------
# reconstruction
# --------------------------------------------------------------------------------------------
@dataclass
class Reconstruction:
    """Model output on the native grid of the input volume.

    ``normalised``, ``reconstruction`` and ``residual`` are (Z, Y, X) float32; ``brain`` is bool
    and ``brain_method`` says where it came from (:class:`napari_tae.brain.BrainMask`).
    ``device`` and ``batch_size`` record what the run ended up using (after any OOM fallback).
    ``settings`` is the provenance of the reconstruction (model, preprocessing, brain mask, device),
    the part of the record that :func:`segment` and the widget's export share; the mask's part is
    :func:`mask_settings`.
    """

    normalised: np.ndarray
    reconstruction: np.ndarray
    residual: np.ndarray
    brain: np.ndarray
    norm: NormParams
    device: str = "cpu"
    batch_size: int = 0
    brain_method: str = "supplied"
    options: PreprocessOptions = field(default_factory=PreprocessOptions)
    settings: dict[str, Any] = field(default_factory=dict)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # MPS (and older CUDA builds) report a plain RuntimeError
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None  # parameter-free (the intensity baseline)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"bfloat16"`` or ``"float32"``: what ``precision`` (one of ``PRECISIONS``) means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if precision == "bfloat16" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"bfloat16 runs on CUDA or the CPU, not on {device.type}")
    if precision_note(precision, device):
        _warn_emulated_bfloat16()
    return precision


def precision_note(precision: str, device: torch.device) -> str:
    """What a user should know before running at ``precision`` on ``device``, or ``""``.

    Today one case: bfloat16 on a CPU without bfloat16 instructions, where torch emulates it.
    """
    if precision == "bfloat16" and device.type == "cpu" and not _cpu_has_bfloat16():
        return EMULATED_BFLOAT16
    return ""


#: measured at 0.03x float32's speed on an AVX2-only CPU (docs/speed.md, section 7)
EMULATED_BFLOAT16 = ("this CPU has no bfloat16 instructions (AVX-512 BF16, AMX): bfloat16 is emulated "
                     "there, tens of times slower than float32; choose float32 or auto")


def _cpu_has_bfloat16() -> bool:
    # private torch checks, not in every release the project accepts: unknown counts as present
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is None or check() for check in checks)


@functools.cache
def _warn_emulated_bfloat16() -> None:
    # once per process: a batch run resolves the precision for every volume
    _logger.warning(EMULATED_BFLOAT16)


def resolve_run_options(device: str, precision: str) -> tuple[torch.device, str]:
    """:func:`select_device` and :func:`resolve_precision` for a command line's ``--device`` and
    ``--precision``, checked before any file is read.

    Raises:
        ValueError: naming the option at fault as the commands spell it
            (``"--device cuda: ..."``, ``"--precision bfloat16: ..."``).
    """
    try:
        resolved = select_device(device)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"--device {device}: {exc}") from None
    try:
        return resolved, resolve_precision(precision, resolved)
    except ValueError as exc:
        raise ValueError(f"--precision {precision}: {exc}") from None


def _forward_batch(model: nn.Module, batch: np.ndarray, device: torch.device, precision: str) -> np.ndarray:
    """One batch (B, S, S) -> reconstruction (B, S, S) float32 on the CPU.

    The grad/autocast modes are entered here, not around the generator's ``yield``: torch keeps
    them per thread, and a suspended generator must not leave them switched on for its consumer.
    """
    x = torch.from_numpy(batch).unsqueeze(1).to(device)  # (B, S, S) -> B x 1 x S x S
    # bf16 needs no loss scaling and is safe for inference
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bfloat16"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        out = model(x)
    return out.float()[:, 0].cpu().numpy()


def iter_reconstruct(
    model: nn.Module,
    volume_data: np.ndarray,
    *,
    brain: np.ndarray | None = None,
    norm: NormParams | None = None,
    meta: Any = None,
    spacing: Any = None,
    skull_strip: str = "auto",
    options: PreprocessOptions | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    precision: str = "auto",
) -> Generator[tuple[int, int], None, Reconstruction]:
    """Reconstruct a volume slice batch by slice batch; yields progress, returns the result.

    Slices without brain are not sent to the model (their residual is 0 by definition); their
    reconstruction is 0 and they count as done. On an out-of-memory error the batch size is halved
    and the same batch retried, down to 1. The model is moved to ``device`` (and left there) and
    put in eval mode for the run (its train/eval mode is restored afterwards). On the CPU each
    batch is split into one chunk per torch thread, run at the same time
    (:class:`~napari_tae._slice_workers.SliceWorkers`).

    Args:
        model: A :class:`~napari_tae.models.ReconstructionModel` (needs ``img_size``).
        volume_data: (Z, Y, X) FLAIR volume in napari order, raw intensities.
        brain: Optional brain mask (non-zero = brain); else
            :func:`napari_tae.brain.resolve_brain_mask` with ``skull_strip``.
        norm: Normalisation to use; else the checkpoint's fixed one, else fitted on this
            volume's brain with the checkpoint's percentiles.
        meta: The checkpoint's :class:`~napari_tae.checkpoint.CheckpointMeta`, or None; its
            preprocessing metadata gives ``options`` when they are not given.
        spacing: (Z, Y, X) voxel size in mm, for brain extraction, bias correction and the
            checkpoint's physical pixel size; required by checkpoints with ``mm_per_px``
            (None: 1 mm for the others).
        skull_strip: ``"auto"``, ``"always"`` or ``"never"`` (ignored when ``brain`` is given).
        options: :class:`~napari_tae.preprocess.PreprocessOptions` overriding ``meta``'s
            (training's calibration passes the run's own).
        device: See :func:`select_device`.
        batch_size: Slices per forward pass (upper bound, halves on OOM).
        precision: One of :data:`napari_tae.options.PRECISIONS` (:func:`resolve_precision`).

    Yields:
        ``(slices_done, total)`` after each batch; the last one is ``(total, total)``.

    Returns:
        :class:`Reconstruction` (as ``StopIteration.value``; :func:`reconstruct` unwraps it).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    size = int(model.img_size)
    device = select_device(device)
    precision = resolve_precision(precision, device)
    options = options or PreprocessOptions.from_meta(meta)
    if spacing is None and options.mm_per_px is not None:
        # a silent 1 mm guess would show the model the brain at the wrong scale
        raise ValueError(
            f"the checkpoint works at {options.mm_per_px:g} mm per pixel: the voxel size "
            "(spacing) of the volume is needed"
        )
    resolved = resolve_brain_mask(volume_data, spacing, supplied=brain, skull_strip=skull_strip)
    prepared = prepare_volume(volume_data, size, mask=resolved.mask, norm=norm, spacing=spacing,
                              options=options)
    total = prepared.slices.shape[0]
    todo = np.flatnonzero(prepared.brain.reshape(total, -1).any(axis=1))
    # private output buffer: nothing outside this run sees it before it is complete
    recon_model = np.zeros_like(prepared.slices)

    was_training = model.training
    if _model_device(model) not in (None, device):
        model.to(device)
    model.eval()
    keep_freed_memory()  # activations reused, not mapped afresh for every batch (docs/speed.md)
    workers = SliceWorkers(torch.get_num_threads() if device.type == "cpu" else 1)
    forward = functools.partial(_forward_batch, model, device=device, precision=precision)
    try:
        start = 0
        while start < todo.size:
            index = todo[start : start + batch_size]
            out = None
            try:
                out = workers.map(forward, prepared.slices[index])
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not _is_out_of_memory(exc) or index.size == 1:
                    raise
                batch_size = index.size // 2  # of the batch that failed (the last may be short)
                _logger.warning("out of memory on %s; retrying with batch size %d", device, batch_size)
            if out is None:
                # outside the except block: the traceback no longer pins the failed batch's tensors
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            recon_model[index] = out
            start += index.size
            yield (int(todo[start]) if start < todo.size else total), total
        if todo.size == 0:
            yield total, total
    finally:
        workers.close()
        model.train(was_training)
        release_freed_memory()

    reconstruction = prepared.grid.to_native(recon_model)
    # brain beyond the model's field (wider than mm_per_px * size) was never seen: no residual
    # there rather than the whole intensity as a false anomaly
    seen = prepared.grid.to_native(np.ones((1, size, size), np.float32))[0] > 0.5
    settings = {
        "model": getattr(meta, "model_name", None) or getattr(model, "model_name", "") or type(model).__name__,
        "checkpoint_sha256": getattr(meta, "sha256", None),
        "img_size": size,
        "normalisation": prepared.norm.to_dict(),
        "brain_mask": resolved.method,
        "skull_strip": skull_strip,
        "preprocessing": options.to_dict(),
        "device": str(device),
        "batch_size": batch_size,
        "precision": precision,
    }
    return Reconstruction(
        normalised=prepared.normalised,
        reconstruction=reconstruction,
        residual=residual_map(prepared.normalised, reconstruction, prepared.brain & seen),
        brain=prepared.brain,
        norm=prepared.norm,
        device=str(device),
        batch_size=batch_size,
        brain_method=resolved.method,
        options=options,
        settings=settings,
    )


def reconstruct(model: nn.Module, volume_data: np.ndarray, **kwargs: Any) -> Reconstruction:
    """Headless :func:`iter_reconstruct`: runs it to the end and returns its result."""
    gen = iter_reconstruct(model, volume_data, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# --------------------------------------------------------------------------------------------
# full headless pipeline
# --------------------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """Everything one segmentation run produced, on the input's native grid.

    ``reconstruction``, ``residual`` and ``normalised`` are (Z, Y, X) float32, ``mask`` and
    ``brain`` bool; ``lesions`` is :func:`napari_tae.postprocess.lesion_table`'s list; ``settings``
    is a JSON-serialisable provenance record of how the result was made. ``score`` is what the mask
    thresholds, before the median (:mod:`napari_tae.scores`; the residual itself by default).
    """

    reconstruction: np.ndarray
    residual: np.ndarray
    mask: np.ndarray
    lesions: list[dict[str, Any]]
    settings: dict[str, Any]
    normalised: np.ndarray | None = None
    brain: np.ndarray | None = None
    norm: NormParams | None = None
    timings: dict[str, float] = field(default_factory=dict)
    score: np.ndarray | None = None


def default_squash(meta: Any, score: str | None = None, kernel: int = 5, mode: str = "2d") -> tuple[float, str]:
    """The checkpoint's calibrated squash (percent) for a score (None: its default) and median, and
    its source; else 1 % (the paper's S_1%). :func:`segment` falls back to a per-scan threshold
    instead (:func:`napari_tae.scores.label_free_squash`)."""
    return label_free_squash(meta, default_score(meta) if score is None else score, kernel, mode)


def segment(
    volume: Any,
    model: nn.Module,
    meta: Any = None,
    *,
    kernel: int = 5,
    squash: float | None = None,
    mode: str = "2d",
    min_size: int = 0,
    brain: np.ndarray | None = None,
    skull_strip: str = "auto",
    device: str | torch.device = "auto",
    batch_size: int = 8,
    precision: str = "auto",
    score: str | None = None,
) -> Segmentation:
    """Full headless path: reconstruct, residual, mask and lesion table, with provenance.

    Args:
        volume: :class:`napari_tae.io.Volume` (its geometry gives mL and mm centroids), or a plain
            (Z, Y, X) array (1 mm isotropic voxels at the origin assumed).
        model: Reconstruction model (a checkpoint's, or ``build_model("intensity")``).
        meta: :class:`napari_tae.checkpoint.CheckpointMeta` or None; gives the normalisation
            settings and the calibrated default squash.
        kernel, mode: Median filter (odd kernel, 1 = off; ``"2d"`` or ``"3d"``).
        squash: Threshold in percent of the intensity range; None = the checkpoint's calibrated
            value for this score, kernel and mode, else a per-scan robust one
            (:func:`napari_tae.scores.label_free_squash`).
        min_size: Smallest connected component kept, in voxels.
        brain: Optional brain mask; else :func:`napari_tae.brain.resolve_brain_mask`.
        skull_strip, device, batch_size, precision: As in :func:`iter_reconstruct`.
        score: ``"residual"``, ``"fused"`` or ``"prior"`` (None: the checkpoint's default).

    Raises:
        ValueError: a score the checkpoint has no parameters for (before any computation).
    """
    data = np.asarray(getattr(volume, "data", volume))
    geometry = getattr(volume, "geometry", None)
    spacing = tuple(float(s) for s in geometry.spacing) if geometry is not None else (1.0,) * data.ndim
    origin = tuple(float(o) for o in geometry.origin) if geometry is not None else (0.0,) * data.ndim
    spec = score_spec(meta, score)

    t0 = time.perf_counter()
    rec = reconstruct(
        model, data, brain=brain, meta=meta, spacing=spacing, skull_strip=skull_strip,
        device=device, batch_size=batch_size, precision=precision,
    )
    t1 = time.perf_counter()
    values = spec.compute(rec.normalised, rec.residual, rec.brain)
    if squash is None:
        squash, squash_source = label_free_squash(meta, spec.name, kernel, mode, values, rec.brain)
    else:
        squash, squash_source = float(squash), "user"
    mask = anomaly_mask(
        values, kernel=kernel, squash=squash, mode=mode, min_size=min_size, brain=rec.brain
    )
    lesions = lesion_table(mask, rec.residual, spacing, origin)
    t2 = time.perf_counter()

    settings = {**rec.settings, **mask_settings(meta, spec, kernel=kernel, mode=mode, squash=squash,
                                                squash_source=squash_source, min_size=min_size)}
    return Segmentation(
        reconstruction=rec.reconstruction,
        residual=rec.residual,
        mask=mask,
        lesions=lesions,
        settings=settings,
        normalised=rec.normalised,
        brain=rec.brain,
        norm=rec.norm,
        timings={"reconstruct_s": t1 - t0, "postprocess_s": t2 - t1},
        score=values,
    )


def inference_job(
    spec: str,
    data: np.ndarray,
    *,
    brain: np.ndarray | None = None,
    spacing: Any = None,
    skull_strip: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    precision: str = "auto",
) -> Generator[tuple[int, int], None, tuple[Any, Any, str]]:
    """Generator for a napari thread worker: yields ``(slices_done, total)`` per batch.

    Returns ``(Reconstruction, meta, device)``. Stopping the generator between yields (the
    worker's ``quit()``) abandons the run without any partial result escaping.
    """
    from napari_tae.checkpoint import load_model

    model, meta = load_model(spec)
    dev = select_device(device)
    # meta: the checkpoint's normalisation, as the headless inference.segment uses it, so the
    # widget and the CLI give identical masks
    rec = yield from iter_reconstruct(
        model, data, brain=brain, meta=meta, spacing=spacing, skull_strip=skull_strip,
        device=dev, batch_size=batch_size, precision=precision,
    )
    return rec, meta, str(dev)
