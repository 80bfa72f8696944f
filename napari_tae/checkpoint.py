"""Model checkpoints: one ``.safetensors`` file holding the weights and, in its metadata header,
everything needed to rebuild and use the model (name, full config, input size, preprocessing,
calibration, training summary, a short SHA-256 of the weights).

Nothing is ever unpickled: pickle / ``torch.save`` files are recognised by their magic bytes and
refused. Loading validates the metadata, rebuilds the model from the registry and checks tensor
names, shapes and the weights' hash before loading them. Every refusal is a one-line
:class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from ._atomic import atomic_path, write_text_atomic
from .models._base import ReconstructionModel

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointMeta",
    "save_checkpoint",
    "read_metadata",
    "load_checkpoint",
    "DEFAULT_CHECKPOINT",
    "bundled_checkpoints",
    "default_checkpoint",
    "load_model",
    "resolve_checkpoint",
    "weights_sha256",
    "INTENSITY_METADATA",
    "intensity_metadata",
    "write_metadata_json",
]

FORMAT_VERSION = 1
_META_KEY = "napari_tae"  # key of the JSON blob in the safetensors ``__metadata__``
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_SHA_LEN = 12
BUNDLED_DIR = Path(__file__).parent / "checkpoints"


class CheckpointError(ValueError):
    """A file that is not a usable napari-tae checkpoint; the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line
        super().__init__(f"{self.path}: {self.problem}")


@dataclasses.dataclass
class CheckpointMeta:
    """Metadata stored with the weights.

    Attributes:
        format_version: Checkpoint format (:data:`FORMAT_VERSION`).
        model_name: Registry name (``napari_tae.models.list_models()``).
        config: Full model config (``model.config_dict()``); ``build_model(model_name, **config)`` rebuilds it.
        img_size: Model input size.
        preprocessing: NormParams settings and anything else about the input pipeline.
        calibration: Thresholds in percent of the intensity range ({"p99": q, ..., "default": q}) or {}.
        training: Training summary (free-form, JSON).
        sha256: Short hex SHA-256 of the weights (see :func:`weights_sha256`).
        scores: The anomaly scores it offers, their parameters, its default score and the
            calibration table per score, median kernel and mode (:mod:`napari_tae.scores`); {}
            in checkpoints written before scores existed (their ``calibration`` still applies).
    """

    format_version: int
    model_name: str
    config: dict[str, Any]
    img_size: int
    preprocessing: dict[str, Any]
    calibration: dict[str, float]
    training: dict[str, Any]
    sha256: str
    scores: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointMeta:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Short hex SHA-256 of tensors (names, dtypes, shapes and bytes, in sorted-name order)."""
    # safetensors serialisation is canonical (sorted names, fixed layout) and metadata-free here
    return hashlib.sha256(save({k: v.detach().cpu().contiguous() for k, v in state.items()})).hexdigest()[:_SHA_LEN]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / DataParallel keep the model in .module; torch.compile in ._orig_mod
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return _unwrap(inner)
    return model


def _json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serialisable (finite numbers, str, list, dict): {e}") from None


def save_checkpoint(
        path: str | os.PathLike,
        model: ReconstructionModel,
        *,
        preprocessing: dict[str, Any],
        calibration: dict[str, float] | None = None,
        training: dict[str, Any] | None = None,
        scores: dict[str, Any] | None = None,
        overwrite: bool = False,
) -> Path:
    """Write ``model`` and its metadata to ``path`` (``.safetensors``), atomically.

    Re-saving a loaded checkpoint's model with new metadata (e.g. a recalibration) keeps its
    weights and their sha256.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: wrong suffix, a model without a registry name, or metadata that is not JSON.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoint files must end in .safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; not replaced (--overwrite, or overwrite=True from Python, replaces it)")
    model = _unwrap(model)
    name = getattr(model, "model_name", "")
    if not name:
        raise ValueError("model has no registry name; build it with napari_tae.models.build_model")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = CheckpointMeta(
        format_version=FORMAT_VERSION,
        model_name=name,
        config=model.config_dict(),
        img_size=int(model.img_size),
        preprocessing=dict(preprocessing),
        calibration={k: float(v) for k, v in (calibration or {}).items()},
        training=dict(training or {}),
        sha256=weights_sha256(state),
        scores=dict(scores or {}),
    )
    header = {"format": "pt", _META_KEY: _json(meta.to_dict(), "checkpoint metadata")}
    _check_calibration(path, meta.calibration)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)
    return path


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header, after refusing pickles and non-safetensors files by their bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == b"PK\x03\x04":
                raise CheckpointError(path, "a zip archive (PyTorch torch.save / pickle file), not a safetensors "
                                            "checkpoint; refused: pickles can run code and are never loaded")
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                raise CheckpointError(path, "a Python pickle (e.g. legacy torch.save), not a safetensors "
                                            "checkpoint; refused: pickles can run code and are never loaded")
            if len(head) < 8:
                raise CheckpointError(path, f"not a napari-tae checkpoint (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(path, "not a napari-tae checkpoint (not a safetensors file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(path, "no permission to read the file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(path, "not a napari-tae checkpoint (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "not a napari-tae checkpoint (not a safetensors file)")
    return header


def _check_calibration(path: Path, calibration: dict[str, Any]) -> None:
    for k, v in calibration.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise CheckpointError(path, f"calibration value {k!r} is not a number: {v!r}")
        # a squash is a percentage of the residual range [0, 1]: anything else thresholds nothing
        # or everything, and a NaN would fail every input later under the input's name
        if not 0.0 <= v <= 100.0:
            raise CheckpointError(path, f"calibration value {k!r} = {v!r} is not a percentage in [0, 100]")


def _validate_meta(path: Path, d: Any) -> CheckpointMeta:
    if not isinstance(d, dict):
        raise CheckpointError(path, "napari-tae metadata is not a JSON object")
    version = d.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(path, f"invalid checkpoint format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(path, f"checkpoint format version {version} is newer than this napari-tae "
                                    f"supports ({FORMAT_VERSION}); update napari-tae")
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"unsupported checkpoint format version {version} (expected {FORMAT_VERSION})")
    missing = [f.name for f in dataclasses.fields(CheckpointMeta)
               if f.name not in d and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CheckpointError(path, f"metadata lacks {', '.join(missing)}")
    types = {"model_name": str, "config": dict, "img_size": int, "preprocessing": dict, "calibration": dict,
             "training": dict, "sha256": str}
    for key, typ in types.items():
        if not isinstance(d[key], typ) or isinstance(d[key], bool):
            raise CheckpointError(path, f"metadata field {key!r} should be {typ.__name__}, got {type(d[key]).__name__}")
    _check_calibration(path, d["calibration"])
    from .models import list_models
    from .scores import check_score_meta

    problem = check_score_meta(d.get("scores", {}))
    if problem:
        raise CheckpointError(path, problem)
    if d["model_name"] not in list_models():
        raise CheckpointError(path, f"unknown model {d['model_name']!r} (known: {', '.join(list_models())})")
    if d["config"].get("img_size", d["img_size"]) != d["img_size"]:
        raise CheckpointError(path, f"img_size {d['img_size']} disagrees with config img_size {d['config']['img_size']}")
    from .preprocess import PreprocessOptions

    try:  # refused here, naming the file, rather than at the first volume
        PreprocessOptions.from_dict(d["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid preprocessing metadata: {exc}") from None
    return CheckpointMeta.from_dict(d)


def read_metadata(path: str | os.PathLike) -> CheckpointMeta:
    """Validated metadata of a checkpoint, without building the model or reading the weights."""
    path = Path(path)
    header = _read_header(path)
    user = header.get("__metadata__")
    if not isinstance(user, dict) or _META_KEY not in user:
        raise CheckpointError(path, "a safetensors file without napari-tae metadata, not a napari-tae checkpoint")
    try:
        d = json.loads(user[_META_KEY])
    except (TypeError, json.JSONDecodeError):
        raise CheckpointError(path, "napari-tae metadata is not valid JSON") from None
    return _validate_meta(path, d)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ReconstructionModel, CheckpointMeta]:
    """Rebuild the model from the metadata, check the weights fit it, load them; model in eval mode."""
    from .models import build_model

    path = Path(path)
    meta = read_metadata(path)
    try:
        model = build_model(meta.model_name, **meta.config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"config does not build model {meta.model_name!r}: {e}") from None
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"corrupt tensor data: {e}") from None

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {found[k]} vs {expected[k]})")
        raise CheckpointError(path, f"weights do not fit the {meta.model_name} config: " + "; ".join(parts))
    sha = weights_sha256(state)
    if sha != meta.sha256:
        raise CheckpointError(path, f"weights sha256 {sha} differs from the recorded {meta.sha256} (file altered or corrupt)")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def bundled_checkpoints() -> dict[str, Path]:
    """Checkpoints shipped in ``napari_tae/checkpoints/``, by file stem ({} when there are none)."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.safetensors"))}


#: The bundled checkpoint offered first (the widget on a fresh install, ``napari-tae demo``):
#: the best of the bundled models on the bundled sample (see ``checkpoints/README.md``).
DEFAULT_CHECKPOINT = "h_tae_s_synthetic"


def default_checkpoint() -> str:
    """:data:`DEFAULT_CHECKPOINT` if bundled, else the first bundled name, else ``"intensity"``."""
    bundled = bundled_checkpoints()
    if DEFAULT_CHECKPOINT in bundled:
        return DEFAULT_CHECKPOINT
    return min(bundled) if bundled else "intensity"


#: Calibration of the parameter-free ``intensity`` baseline: checkpoint metadata without weights
#: (see ``checkpoints/README.md`` for the command that writes it).
INTENSITY_METADATA = BUNDLED_DIR / "intensity.json"


def write_metadata_json(path: str | os.PathLike, meta: CheckpointMeta) -> Path:
    """Write the metadata of a weightless model (the ``intensity`` baseline) as JSON, atomically."""
    path = Path(path)
    write_text_atomic(path, json.dumps(meta.to_dict(), allow_nan=False, indent=1, sort_keys=True) + "\n")
    return path


def intensity_metadata(path: str | os.PathLike = INTENSITY_METADATA) -> CheckpointMeta | None:
    """The ``intensity`` baseline's calibration metadata; None when the file is not installed."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"unreadable intensity metadata: {e}") from None
    meta = _validate_meta(path, d)
    if meta.model_name != "intensity" or meta.sha256 != weights_sha256({}):
        raise CheckpointError(path, f"not the intensity baseline's metadata (model {meta.model_name})")
    return meta


def resolve_checkpoint(spec: str | os.PathLike) -> Path | None:
    """Path of a checkpoint given as a file or a bundled name; None for the ``intensity`` baseline.

    Raises
    ------
    CheckpointError
        Neither an existing file nor a bundled name (the message lists the bundled names).
    """
    if os.fspath(spec) == "intensity":
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    bundled = bundled_checkpoints()
    if os.fspath(spec) in bundled:
        return bundled[os.fspath(spec)]
    known = ", ".join(["intensity", *sorted(bundled)])
    raise CheckpointError(spec, f"no such checkpoint file or bundled name (bundled: {known})")


def load_model(spec: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple[ReconstructionModel, CheckpointMeta | None]:
    """``(model, meta)`` for a checkpoint file, a bundled name, or ``"intensity"``.

    The intensity baseline's meta is its bundled calibration (:func:`intensity_metadata`), None
    when that file is not installed.
    """
    path = resolve_checkpoint(spec)
    if path is None:
        from .models import build_model

        meta = intensity_metadata()
        config = meta.config if meta is not None else {}
        return build_model("intensity", **config).to(device), meta
    return load_checkpoint(path, device=device)
