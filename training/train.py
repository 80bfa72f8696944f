"""``python -m training train``: train a reconstruction model on healthy FLAIR slices.

Recipe of Ghorbel et al. 2022 ("Transformer based Models for Unsupervised Anomaly Segmentation in
Brain MR Images", BrainLes 2022, https://arxiv.org/abs/2207.02059): Adam (0.9, 0.999), lr 1e-5,
batch 12, 50 epochs, MAE loss (+ the model's own extra terms, e.g. KL for ``vae``, VQ terms for
``vq_vae``), 256 x 256 axial slices, best validation checkpoint kept. The loop follows timm's
``train.py`` (``main`` / ``train_one_epoch`` / ``validate``) and nanoGPT's (DDP via ``torchrun``,
rank 0 writes, unwrapped model saved, no-op AMP context off CUDA).

After training the best model is calibrated on the healthy validation volumes (score parameters
and the calibration table per score, median kernel and mode, :mod:`training.calibrate`) and
written with
:func:`napari_tae.checkpoint.save_checkpoint`; the resume state (optimizer, epoch, RNG, best model)
is a separate ``<out>.resume.pt`` written atomically after each epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from napari_tae._allocator import keep_freed_memory
from napari_tae._atomic import atomic_path
from napari_tae.brain import SKULL_STRIP_CHOICES
from napari_tae.io import error_line
from napari_tae.options import MEDIAN_MODES, check_median_kernel
from napari_tae.preprocess import DEFAULT_FIELD_MM, PreprocessOptions
from napari_tae.scores import SCORES
from training.data import (
    InputError,
    SliceDataset,
    collate_batch,
    configure_logging,
    iter_batches,
    load_slices,
    pair_by_name,
    resolve_volumes,
    split_by_volume,
)

__all__ = [
    "NonFiniteLossError",
    "build_parser",
    "parse_args",
    "main",
    "run_training",
    "train_one_epoch",
    "validate",
    "resume_path_for",
]

_logger = logging.getLogger("training.train")

STATE_FORMAT = 1
# Named config overrides offered as flags (anything else goes through --set key=value).
_OVERRIDE_FLAGS = ("img_size", "depth", "patch_size", "num_heads", "embed_dim")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf: training stops instead of writing garbage."""


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training train",
        description="Train a napari-tae reconstruction model on healthy FLAIR volumes.",
    )
    parser.add_argument("-c", "--config", metavar="YAML",
                        help="YAML file whose keys set this parser's defaults (command line wins)")
    group = parser.add_argument_group("data")
    group.add_argument("--data", nargs="+", required=True, metavar="DIR_OR_GLOB",
                       help="healthy NIfTI volumes: folders and/or glob patterns")
    group.add_argument("--val-data", nargs="+", metavar="DIR_OR_GLOB",
                       help="validation volumes (default: split --data by volume)")
    group.add_argument("--val-fraction", type=float, default=0.1,
                       help="fraction of --data volumes held out for validation (default 0.1)")
    group.add_argument("--exclude-mask", metavar="GLOB",
                       help="lesion masks paired with the volumes by name; slices touching a "
                            "lesion are dropped (train on the lesion-free slices of patients)")
    group.add_argument("--min-brain-fraction", type=float, default=0.1,
                       help="skip slices whose brain area is below this fraction of the "
                            "volume's largest axial brain area (default 0.1)")
    group.add_argument("--upper-percentile", type=float, default=None,
                       help="normalisation clip percentile (default: napari_tae.preprocess's)")
    group.add_argument("--mm-per-px", type=float, default=None, metavar="MM",
                       help="model pixel size in mm, recorded in the checkpoint (default: a "
                            f"{DEFAULT_FIELD_MM:g} mm field over --img-size pixels)")
    group.add_argument("--bias-correction", choices=("n4", "none"), default="n4",
                       help="N4 bias-field correction inside the brain (default n4; "
                            "docs/preprocessing.md)")
    group.add_argument("--skull-strip", choices=SKULL_STRIP_CHOICES, default="auto",
                       help="brain extraction of heads (default auto: only volumes that are "
                            "not skull-stripped)")
    group.add_argument("--num-workers", type=int, default=0,
                       help="DataLoader workers (0: gather batches in-process; slices are in memory)")

    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="model name (see napari_tae.models.list_models)")
    group.add_argument("--img-size", type=int, help="slice size S (paper: 256)")
    group.add_argument("--depth", type=int, help="transformer depth override")
    group.add_argument("--patch-size", type=int, help="patch size override")
    group.add_argument("--num-heads", type=int, help="attention heads override")
    group.add_argument("--embed-dim", type=int, help="token width override")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="any model config override, value parsed as YAML (repeatable)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=50)
    group.add_argument("--batch-size", type=int, default=12, help="per process (paper: 12)")
    group.add_argument("--lr", type=float, default=1e-5)
    group.add_argument("--sched", choices=("constant", "cosine"), default="constant",
                       help="learning-rate schedule: constant (the paper) or cosine decay from "
                            "--lr towards 0 over --epochs, set at the start of each epoch")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--input-noise", type=float, default=0.0, metavar="STD",
                       help="denoising training: add coarse Gaussian noise of this std (intensity "
                            "range 0-1) inside the brain and learn to reconstruct the clean slice; "
                            "0 = off (the paper). Kascenas et al. 2022 use 0.2")
    group.add_argument("--noise-res", type=int, default=16, metavar="N",
                       help="the noise is drawn on an N x N grid and upsampled to the slice size "
                            "(coarse, lesion-sized blobs rather than pixel noise)")
    group.add_argument("--noise-blobs", type=float, default=0.0, metavar="STD",
                       help="also add sharp-edged blobs (about 4%% of the slice, cut out of a "
                            "second N x N noise field) brightened or darkened by offsets of this "
                            "std, so that well-delineated lesions are replaced too; 0 = off")
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms (bitwise reproducible, slower on GPU)")
    group.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                       help="mixed precision on CUDA (auto = bf16); always off on CPU")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, metavar="FILE.safetensors")
    group.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    group.add_argument("--data-note", metavar="TEXT",
                       help="what the training data were, stored in the checkpoint (shown by "
                            "'napari-tae models'), e.g. 'synthetic volumes only'")
    group.add_argument("--resume", nargs="?", const="auto", metavar="STATE",
                       help="continue from the resume state (default <out>.resume.pt)")
    group.add_argument("--log-dir", help="CSV log, args.yaml, TensorBoard (default <out>_train/)")
    group.add_argument("--log-interval", type=int, default=10,
                       help="steps between loss checks / progress updates")
    group.add_argument("--calib-kernel", type=int, default=5, help="median kernel for calibration")
    group.add_argument("--calib-mode", choices=MEDIAN_MODES, default="2d")
    group.add_argument("--default-score", choices=SCORES, default="residual",
                       help="score the checkpoint offers first (docs/scores.md)")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse, letting ``-c config.yaml`` set the defaults first (timm ``_parse_args``)."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        import yaml

        try:
            with open(known.config) as fh:
                cfg = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            parser.error(f"--config {known.config}: {error_line(exc)}")
        if not isinstance(cfg, dict):
            parser.error(f"--config {known.config}: expected a mapping of option: value")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
        # required options given in the YAML no longer need to be on the command line
        for action in parser._actions:
            if action.dest in cfg or action.dest.replace("_", "-") in cfg:
                action.required = False
    return parser, parser.parse_args(argv)


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides from the named flags and ``--set key=value`` (YAML-parsed values)."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in args.overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    for name in _OVERRIDE_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return overrides


def resume_path_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(_out_stem(out) + ".resume.pt")


def _out_stem(out: Path) -> str:
    return out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.stem


# --------------------------------------------------------------------------------------------
# Distributed / device / precision helpers


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _select_device(preference: str) -> torch.device:
    from napari_tae.inference import select_device

    try:
        return select_device(preference)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"--device {preference}: {error_line(exc)}") from None


def setup_distributed(device_pref: str) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (RANK/WORLD_SIZE in the env)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=_select_device(device_pref))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def amp_setup(device: torch.device, mode: str) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """Autocast context and scaler: bf16 on CUDA by default, a no-op context elsewhere."""
    if device.type != "cuda" or mode == "off":
        return contextlib.nullcontext(), None
    if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
        # loss scaler only used for float16 (half) dtype, bfloat16 does not need it
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16), None


class _TrainForward(nn.Module):
    """Makes ``forward_train`` the module's forward, so DDP's hooks see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_train(x)


# --------------------------------------------------------------------------------------------
# One epoch / validation


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on an interactive terminal (rank 0); None means: log progress lines instead."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # plain logging fallback
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


#: Sharp-edged blobs (``--noise-blobs``) cover the pixels where a second unit-variance noise field,
#: drawn like the smooth noise, exceeds this level: about 4 % of the slice, in lesion-sized pieces.
BLOB_LEVEL = 1.2
#: Grid of the blobs' intensity offsets: slowly varying, so one blob is mostly brighter or darker.
BLOB_OFFSET_RES = 4


def coarse_noise(x: torch.Tensor, std: float, res: int = 16,
                 generator: torch.Generator | None = None, blob_std: float = 0.0) -> torch.Tensor:
    """``x`` plus smooth Gaussian noise for denoising training, zero outside the brain (``x > 0``).

    Drawn on a ``res`` x ``res`` grid and upsampled bilinearly to the slice size, so the
    perturbations are blobs of about ``size / res`` pixels: a model trained to remove them pulls
    lesion-like deviations towards healthy tissue instead of copying them (Kascenas et al.,
    "Denoising Autoencoders for Unsupervised Anomaly Detection in Brain MRI", MIDL 2022).
    ``blob_std`` > 0 adds sharp-edged blobs (:data:`BLOB_LEVEL`) shifted by offsets of that std:
    smooth noise alone teaches that a sharp edge is anatomy, so a well-delineated lesion is copied.
    ``generator`` (a CPU generator) makes the draw repeatable, e.g. for validation. With ``std``
    and ``blob_std`` both 0 (plain autoencoder) ``x`` is returned as it is and nothing is drawn.
    """
    if std == 0 and blob_std == 0:
        return x

    def smooth(grid: int, scale: float) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1], grid, grid)
        if generator is None:
            cells = torch.randn(shape, device=x.device, dtype=x.dtype)
        else:
            cells = torch.randn(shape, generator=generator, dtype=x.dtype).to(x.device)
        return F.interpolate(cells * scale, size=x.shape[-2:], mode="bilinear", align_corners=False)

    noise = smooth(res, std)
    if blob_std > 0:
        blobs = smooth(res, 1.0) > BLOB_LEVEL
        noise = noise + blobs.to(x.dtype) * smooth(BLOB_OFFSET_RES, blob_std)
    return x + noise * (x > 0)


def epoch_lr(base_lr: float, epoch: int, epochs: int, sched: str = "constant") -> float:
    """Learning rate of epoch ``epoch`` (0-based) of ``epochs``: a function of the epoch alone,
    so a resumed run follows the same schedule without a scheduler state."""
    if sched == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))
    return base_lr


@dataclass(frozen=True)
class NoiseConfig:
    """The denoising objective (:func:`coarse_noise`); all zero is the paper's plain autoencoder.

    ``std``: smooth noise drawn on a ``res`` x ``res`` grid; ``blob_std``: sharp-edged blobs.
    """

    std: float = 0.0
    res: int = 16
    blob_std: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NoiseConfig:
        return cls(args.input_noise, args.noise_res, args.noise_blobs)

    @property
    def enabled(self) -> bool:
        return self.std > 0 or self.blob_std > 0

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return coarse_noise(x, self.std, self.res, generator, blob_std=self.blob_std)

    def to_meta(self) -> dict[str, Any] | None:
        """``training["input_noise"]`` in the checkpoint and the resume state; None: plain."""
        if not self.enabled:
            return None
        settings: dict[str, Any] = {"kind": "coarse_gaussian", "std": self.std, "res": self.res}
        if self.blob_std > 0:
            settings["blobs"] = {"std": self.blob_std, "level": BLOB_LEVEL, "offset_res": BLOB_OFFSET_RES}
        return settings


@dataclass
class Runtime:
    """Where the steps run: device, process group, autocast context and (float16) loss scaler."""

    device: torch.device
    dist_info: DistInfo
    amp_ctx: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Runtime:
        """One process on ``device``, no autocast."""
        device = torch.device(device)
        return cls(device, DistInfo(device=device))


def train_one_epoch(model: nn.Module, dataset: SliceDataset, *, optimizer: torch.optim.Optimizer,
                    batch_size: int, epoch: int, runtime: Runtime, noise: NoiseConfig = NoiseConfig(),
                    seed: int = 0, num_workers: int = 0, log_interval: int = 10,
                    max_steps: int | None = None) -> dict[str, float]:
    """One pass over this process's share of ``dataset``; returns mean losses and throughput.

    Args:
        model: module whose ``forward`` returns ``(reconstruction, extra_losses)`` (the
            ``forward_train`` wrapper, possibly inside DDP).
        epoch: seeds the shuffle (``DistributedSampler.set_epoch``), so a resumed run sees the
            same order as an uninterrupted one.
        noise: added to the input (denoising training); the loss always compares with the clean
            slice.

    Raises:
        NonFiniteLossError: the (all-reduced) running loss is NaN or infinite.
    """
    device, dist_info, scaler = runtime.device, runtime.dist_info, runtime.scaler
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    n_steps = math.ceil(len(indices) / batch_size)
    if max_steps is not None:
        n_steps = min(n_steps, max_steps)
    if num_workers > 0:
        batches: Iterable[torch.Tensor] = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers,
            collate_fn=collate_batch, pin_memory=device.type == "cuda")
    else:
        batches = iter_batches(dataset, indices, batch_size)

    model.train()
    loss_sum = torch.zeros((), device=device)
    extra_sums: dict[str, torch.Tensor] = {}
    bar = _progress(n_steps, f"epoch {epoch + 1}", dist_info.is_main)
    t0 = time.perf_counter()
    data_time = 0.0
    seen, step = 0, -1
    t_data = time.perf_counter()
    for step, x in enumerate(batches):
        if step >= n_steps:
            break
        x = x.to(device, non_blocking=True).float()
        data_time += time.perf_counter() - t_data
        with runtime.amp_ctx:
            recon, extra = model(noise.apply(x))
            loss = F.l1_loss(recon.float(), x)
            for value in extra.values():
                loss = loss + value.float()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach()
        for key, value in extra.items():
            extra_sums[key] = extra_sums.get(key, 0.0) + value.detach().float()
        seen += x.shape[0]
        last = step + 1 == n_steps
        if (step + 1) % log_interval == 0 or last:
            # one host sync per interval, all-reduced so every rank stops at the same step
            running = loss_sum.clone()
            if dist_info.enabled:
                dist.all_reduce(running)
            mean = running.item() / ((step + 1) * dist_info.world_size)
            if not math.isfinite(mean):
                raise NonFiniteLossError(
                    f"training loss became {mean} at epoch {epoch + 1}, step {step + 1}: "
                    f"lower --lr (now {optimizer.param_groups[0]['lr']:g}) or check the input data")
            if bar is not None:
                bar.update(step + 1 - bar.n)
                bar.set_postfix(loss=f"{mean:.5f}")
            elif dist_info.is_main and (step + 1) % max(log_interval, n_steps // 4 or 1) < log_interval:
                _logger.info("epoch %d step %d/%d loss %.5f", epoch + 1, step + 1, n_steps, mean)
        t_data = time.perf_counter()
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    steps = max(1, min(n_steps, step + 1))
    totals = torch.stack([loss_sum] + [extra_sums[k] for k in sorted(extra_sums)])
    if dist_info.enabled:
        dist.all_reduce(totals)
    totals = (totals / (steps * dist_info.world_size)).tolist()
    metrics = {"train_loss": totals[0]}
    metrics.update({f"train_{k}": v for k, v in zip(sorted(extra_sums), totals[1:])})
    metrics.update({"epoch_time_s": elapsed, "slices_per_s": seen * dist_info.world_size / elapsed,
                    "data_fraction": data_time / elapsed})
    return metrics


@torch.no_grad()
def validate(model: nn.Module, dataset: SliceDataset, *, batch_size: int, runtime: Runtime,
             noise: NoiseConfig = NoiseConfig(), seed: int = 0) -> dict[str, float]:
    """Mean per-slice MAE of ``model`` (eval mode, plain ``forward``) over ``dataset``.

    Each rank takes every ``world_size``-th slice and the sums are all-reduced, so the value is
    exact (no sampler padding) and identical on every rank. With ``input_noise`` the inputs carry
    :func:`coarse_noise` drawn from ``seed`` (the same noise every epoch) and the clean slices are
    the target: the training objective, so the best epoch is the best denoiser, not the best copier.
    """
    device, dist_info = runtime.device, runtime.dist_info
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)
    indices = range(dist_info.rank, len(dataset), dist_info.world_size)
    generator = torch.Generator().manual_seed(seed + dist_info.rank)
    for x in iter_batches(dataset, indices, batch_size):
        x = x.to(device, non_blocking=True).float()
        with runtime.amp_ctx:
            recon = model(noise.apply(x, generator))
        sums[0] += (recon.float() - x).abs().mean(dim=(1, 2, 3)).sum().double()
        sums[1] += x.shape[0]
    if dist_info.enabled:
        dist.all_reduce(sums)
    model.train(was_training)
    return {"val_loss": (sums[0] / sums[1].clamp(min=1)).item()}


# --------------------------------------------------------------------------------------------
# Preprocessing


def preprocess_options(args: argparse.Namespace, img_size: int) -> PreprocessOptions:
    """The run's preprocessing from its options; stored in the checkpoint for inference."""
    defaults = PreprocessOptions()
    upper = defaults.upper_percentile if args.upper_percentile is None else args.upper_percentile
    mm_per_px = DEFAULT_FIELD_MM / img_size if args.mm_per_px is None else args.mm_per_px
    return PreprocessOptions(upper_percentile=float(upper), mm_per_px=float(mm_per_px),
                             bias_correction=args.bias_correction == "n4")


# --------------------------------------------------------------------------------------------
# Resume state


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _gather_rng(dist_info: DistInfo) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if not dist_info.enabled:
        return {"per_rank": [state]}
    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, state)
    return {"per_rank": gathered}


def _restore_rng(rng: dict[str, Any], dist_info: DistInfo) -> None:
    per_rank = rng.get("per_rank", [])
    if len(per_rank) != dist_info.world_size:
        _logger.warning("resume state has RNG for %d process(es), now %d: continuing with fresh RNG "
                        "streams (not bitwise identical to an uninterrupted run)",
                        len(per_rank), dist_info.world_size)
        return
    state = per_rank[dist_info.rank]
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --------------------------------------------------------------------------------------------
# Logging of epochs


def _write_csv(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the CSV log is enough
        return None
    return SummaryWriter(log_dir=str(log_dir))


# --------------------------------------------------------------------------------------------
# Main


@dataclass
class _Inputs:
    train: list[Path]
    val: list[Path]
    train_lesions: list[Path | None] | None
    val_lesions: list[Path | None] | None


def _check_inputs(args: argparse.Namespace) -> _Inputs:
    """Everything that can be wrong with the command line, checked before any training."""
    out = Path(args.out)
    if not out.name.endswith(".safetensors"):
        raise InputError(f"--out {out}: must be a .safetensors file")
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder")
    if out.exists() and not args.overwrite:
        raise InputError(f"--out {out}: exists; pass --overwrite to replace it")
    state = Path(args.resume) if args.resume not in (None, "auto") else resume_path_for(out)
    if args.resume and not state.is_file():
        raise InputError(f"--resume {state}: no such resume state")
    if not args.resume and state.exists() and not args.overwrite:
        raise InputError(f"{state}: a resume state exists; pass --resume to continue it "
                         "or --overwrite to start over")
    for name in ("epochs", "batch_size", "noise_res"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.upper_percentile is not None and not 50 < args.upper_percentile <= 100:
        raise InputError(f"--upper-percentile must be in (50, 100], got {args.upper_percentile}")
    try:
        check_median_kernel(args.calib_kernel)
    except ValueError as exc:
        raise InputError(f"--calib-kernel: {exc}") from None
    if args.mm_per_px is not None and not 0 < args.mm_per_px < math.inf:
        raise InputError(f"--mm-per-px must be a positive number, got {args.mm_per_px}")
    if not 0 <= args.min_brain_fraction < 1:
        raise InputError(f"--min-brain-fraction must be in [0, 1), got {args.min_brain_fraction}")
    if not args.lr > 0:  # also rejects NaN (an infinite lr is allowed: it stops at the NaN check)
        raise InputError(f"--lr must be > 0, got {args.lr}")
    for name in ("input_noise", "noise_blobs"):
        if not 0 <= getattr(args, name) < math.inf:
            raise InputError(f"--{name.replace('_', '-')} must be a finite std >= 0, "
                             f"got {getattr(args, name)}")

    from napari_tae.models import list_models

    if args.model not in list_models():
        raise InputError(f"--model {args.model}: unknown; known models: {', '.join(list_models())}")

    data = resolve_volumes(args.data, "--data")
    if args.val_data:
        val = resolve_volumes(args.val_data, "--val-data")
        overlap = sorted(set(data) & set(val))
        if overlap:
            raise InputError(f"--val-data {overlap[0]}: also in --data (split is by volume)")
        train = data
    else:
        train, val = split_by_volume(data, args.val_fraction, args.seed)
    train_les = val_les = None
    if args.exclude_mask:
        masks = resolve_volumes([args.exclude_mask], "--exclude-mask")
        paired = pair_by_name(train + val, masks, "--exclude-mask", allow_missing=True)
        train_les, val_les = paired[: len(train)], paired[len(train):]
    return _Inputs(train, val, train_les, val_les)


def _build(args: argparse.Namespace) -> nn.Module:
    from napari_tae.models import build_model

    try:
        model = build_model(args.model, **model_overrides(args))
    except (TypeError, ValueError) as exc:
        raise InputError(f"--model {args.model}: {error_line(exc)}") from None
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError(f"--model {args.model}: has no trainable parameters (nothing to train)")
    return model


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 bad input, 1 training failure, 130 interrupted)."""
    parser, args = parse_args(argv)
    configure_logging()
    try:
        inputs = _check_inputs(args)
        model_overrides(args)
    except InputError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        run_training(args, inputs)
    except InputError as exc:  # found while loading volumes / building the model, still before training
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except NonFiniteLossError as exc:
        state = Path(args.resume) if args.resume not in (None, "auto") else resume_path_for(args.out)
        _logger.error("%s; stopped, %s not written%s", exc, args.out,
                      f" (last completed epoch's state: {state})" if state.exists() else "")
        return 1
    except KeyboardInterrupt:
        _logger.error("interrupted; continue with --resume (state: %s)",
                      Path(args.resume) if args.resume not in (None, "auto") else resume_path_for(args.out))
        return 130
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


@dataclass
class TrainingState:
    """What a run carries from epoch to epoch, and what ``--resume`` restores.

    The resume file also names the model, its config and the noise objective, so that a state is
    never continued with another model or objective (its best model was picked by validation loss
    on that objective).
    """

    start_epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    best_model: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def resume(cls, path: Path, *, model_name: str, config_json: str, noise_json: str, model: nn.Module,
               optimizer: torch.optim.Optimizer, runtime: Runtime) -> TrainingState:
        """Load ``path`` into ``model``/``optimizer``/scaler and the RNG streams; InputError if it
        belongs to another model, config or noise objective."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("model_name") != model_name or state.get("config") != config_json:
            raise InputError(f"--resume {path}: state is for model {state.get('model_name')} "
                             f"{state.get('config')}, not {model_name} {config_json}")
        if state.get("noise", noise_json) != noise_json:
            raise InputError(f"--resume {path}: state was trained with input noise "
                             f"{state['noise']}, this run asks for {noise_json}; pass the same noise "
                             "options or start a new run")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if runtime.scaler is not None and state.get("scaler"):
            runtime.scaler.load_state_dict(state["scaler"])
        _restore_rng(state["rng"], runtime.dist_info)
        resumed = cls(state["epoch"], state["best_val"], state["best_epoch"], state.get("best_model"),
                      list(state.get("history", [])))
        if runtime.dist_info.is_main:
            _logger.info("resumed from %s after epoch %d (best val %.5f at epoch %d)",
                         path, resumed.start_epoch, resumed.best_val, resumed.best_epoch + 1)
        return resumed

    def save(self, path: Path, *, epoch: int, model_name: str, config_json: str, noise_json: str,
             model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime,
             rng: dict[str, Any]) -> None:
        """Write the state after ``epoch`` (0-based) atomically: an interrupted save leaves the old."""
        _atomic_torch_save({
            "format": STATE_FORMAT, "model_name": model_name, "config": config_json, "noise": noise_json,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": runtime.scaler.state_dict() if runtime.scaler is not None else {},
            "epoch": epoch + 1, "best_val": self.best_val, "best_epoch": self.best_epoch,
            "best_model": self.best_model, "history": self.history, "rng": rng,
        }, path)


def _run_identity(model: nn.Module, noise: NoiseConfig) -> tuple[str, str]:
    """The model config and noise objective as the JSON strings a resume state is checked against."""
    return (json.dumps(model.config_dict(), sort_keys=True, default=str),
            json.dumps(noise.to_meta(), sort_keys=True))


def _configure_backends(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _load_datasets(args: argparse.Namespace, inputs: _Inputs, img_size: int,
                   options: PreprocessOptions, runtime: Runtime) -> tuple[SliceDataset, SliceDataset]:
    """Training and validation slices through the shared preprocessing, on the GPU when they fit."""
    if runtime.dist_info.is_main:
        _logger.info("loading %d training and %d validation volumes at %d x %d",
                     len(inputs.train), len(inputs.val), img_size, img_size)
    train_set = load_slices(inputs.train, img_size, min_brain_fraction=args.min_brain_fraction,
                            lesion_masks=inputs.train_lesions, options=options,
                            skull_strip=args.skull_strip)
    val_set = load_slices(inputs.val, img_size, min_brain_fraction=args.min_brain_fraction,
                          lesion_masks=inputs.val_lesions, options=options,
                          skull_strip=args.skull_strip)
    if runtime.dist_info.is_main:
        _logger.info("%d training slices (%.0f MiB), %d validation slices", len(train_set),
                     train_set.slices.numel() * 2 / 2**20, len(val_set))
    device = runtime.device
    if device.type == "cuda" and args.num_workers == 0:
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = (train_set.slices.numel() + val_set.slices.numel()) * 2
        if nbytes < 0.25 * free:  # the whole set on the GPU: batches never wait for the host
            train_set, val_set = train_set.to(device), val_set.to(device)
    return train_set, val_set


def _fit(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
         train_set: SliceDataset, val_set: SliceDataset, runtime: Runtime, noise: NoiseConfig,
         state: TrainingState, state_path: Path, log_dir: Path) -> None:
    """The epochs from ``state.start_epoch`` to ``--epochs``: train, validate, keep the best, save."""
    dist_info = runtime.dist_info
    config_json, noise_json = _run_identity(model, noise)
    train_model: nn.Module = _TrainForward(model)
    if dist_info.enabled:
        device = runtime.device
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = None
    if dist_info.is_main:
        log_dir.mkdir(parents=True, exist_ok=True)
        _write_args(log_dir / "args.yaml", args)
        writer = _tensorboard(log_dir)

    for epoch in range(state.start_epoch, args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(args.lr, epoch, args.epochs, args.sched)
        metrics = train_one_epoch(train_model, train_set, optimizer=optimizer, batch_size=args.batch_size,
                                  epoch=epoch, runtime=runtime, noise=noise, seed=args.seed,
                                  num_workers=args.num_workers, log_interval=args.log_interval)
        metrics.update(validate(model, val_set, batch_size=args.batch_size, runtime=runtime, noise=noise,
                                seed=args.seed))
        improved = metrics["val_loss"] < state.best_val
        if improved:
            state.best_val, state.best_epoch = metrics["val_loss"], epoch
            if dist_info.is_main:
                state.best_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        state.history.append({"epoch": epoch + 1, **metrics, "lr": optimizer.param_groups[0]["lr"],
                              "best": int(improved)})
        rng = _gather_rng(dist_info)  # collective: every rank takes part
        if dist_info.is_main:
            _logger.info("epoch %d/%d train %.5f val %.5f%s (%.1f slices/s)", epoch + 1, args.epochs,
                         metrics["train_loss"], metrics["val_loss"], " *" if improved else "",
                         metrics["slices_per_s"])
            state.save(state_path, epoch=epoch, model_name=args.model, config_json=config_json,
                       noise_json=noise_json, model=model, optimizer=optimizer, runtime=runtime, rng=rng)
            _write_csv(log_dir / "metrics.csv", state.history)
            if writer is not None:
                for key, value in metrics.items():
                    writer.add_scalar(key, value, epoch + 1)
        if dist_info.enabled:
            dist.barrier()
    if writer is not None:
        writer.close()


def _ship_best(model: nn.Module, state: TrainingState, dist_info: DistInfo) -> None:
    """Load the best validation weights (not the last epoch's) on every rank."""
    if dist_info.is_main and state.best_model is not None:
        model.load_state_dict(state.best_model)
    if dist_info.enabled:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    model.eval()


def _save_calibrated(args: argparse.Namespace, model: nn.Module, inputs: _Inputs, state: TrainingState,
                     options: PreprocessOptions, datasets: tuple[SliceDataset, SliceDataset],
                     runtime: Runtime, noise: NoiseConfig) -> None:
    """Calibrate the scores and label-free thresholds on the healthy validation volumes
    (:func:`training.calibrate.calibrate_detector`) and save the checkpoint."""
    from napari_tae.checkpoint import save_checkpoint
    from training.calibrate import calibrate_detector

    train_set, val_set = datasets
    _logger.info("calibrating on %d healthy validation volume(s)", len(inputs.val))
    preprocessing = {"normalisation": "per_volume", **options.to_dict(), "img_size": int(model.img_size),
                     "slice_axis": "axial", "skull_strip": args.skull_strip,
                     "min_brain_fraction": args.min_brain_fraction}
    calibration, scores = calibrate_detector(
        model, inputs.val, preprocessing=preprocessing, lesion_masks=inputs.val_lesions,
        default_score=args.default_score, calibration_kernel=args.calib_kernel,
        calibration_mode=args.calib_mode, seed=args.seed, device=runtime.device, batch_size=args.batch_size)
    history = state.history
    training = {
        "epochs": len(history), "best_epoch": state.best_epoch + 1, "best_val_loss": state.best_val,
        "loss": "mae" + "".join(f"+{k[len('train_'):]}" for k in history[-1]
                                if k.startswith("train_") and k != "train_loss"),
        "optimizer": "adam(0.9,0.999)", "lr": args.lr, "lr_schedule": args.sched,
        "batch_size": args.batch_size,
        "world_size": runtime.dist_info.world_size, "seed": args.seed, "deterministic": args.deterministic,
        "train_volumes": len(inputs.train), "val_volumes": len(inputs.val),
        "train_slices": len(train_set), "val_slices": len(val_set),
        "excluded_lesion_slices": sum(v.excluded_lesion for v in train_set.volumes + val_set.volumes),
        "calibration_kernel": args.calib_kernel, "calibration_mode": args.calib_mode,
    }
    if noise.enabled:
        training["input_noise"] = noise.to_meta()
    if args.data_note:
        training["data"] = args.data_note
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, preprocessing=preprocessing, calibration=calibration,
                    training=training, scores=scores, overwrite=args.overwrite)
    _logger.info("saved %s (best epoch %d, val %.5f, calibrated q99 = %.3f %%)", out,
                 state.best_epoch + 1, state.best_val, calibration.get("p99", float("nan")))


def run_training(args: argparse.Namespace, inputs: _Inputs | None = None) -> nn.Module:
    """Train, keep the best validation model, calibrate and save; returns the unwrapped model.

    Every process returns the same weights (the best model is broadcast from rank 0).
    """
    if inputs is None:
        inputs = _check_inputs(args)
    keep_freed_memory()  # activations and gradients reused across steps (docs/speed.md)
    dist_info = setup_distributed(args.device)
    device = dist_info.device
    out = Path(args.out)
    state_path = Path(args.resume) if args.resume not in (None, "auto") else resume_path_for(out)
    log_dir = Path(args.log_dir) if args.log_dir else out.with_name(_out_stem(out) + "_train")
    _configure_backends(args.deterministic, device)

    # same seed everywhere so every rank builds the same initial model (DDP also broadcasts it)
    torch.manual_seed(args.seed)
    model = _build(args)
    options = preprocess_options(args, int(model.img_size))
    runtime = Runtime(device, dist_info)
    datasets = _load_datasets(args, inputs, int(model.img_size), options, runtime)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    runtime.amp_ctx, runtime.scaler = amp_setup(device, args.amp)
    noise = NoiseConfig.from_args(args)
    state = TrainingState()
    if args.resume:
        config_json, noise_json = _run_identity(model, noise)
        state = TrainingState.resume(state_path, model_name=args.model, config_json=config_json,
                                     noise_json=noise_json, model=model, optimizer=optimizer, runtime=runtime)

    _fit(args, model, optimizer, *datasets, runtime, noise, state, state_path, log_dir)
    _ship_best(model, state, dist_info)
    if dist_info.is_main:
        _save_calibrated(args, model, inputs, state, options, datasets, runtime, noise)
    if dist_info.enabled:
        dist.barrier()
    return model


def _write_args(path: Path, args: argparse.Namespace) -> None:
    import yaml

    with open(path, "w") as fh:
        yaml.safe_dump(dict(vars(args)), fh, sort_keys=True)


if __name__ == "__main__":
    sys.exit(main())
