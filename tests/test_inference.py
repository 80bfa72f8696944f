"""Inference: batching, progress, cancel, OOM fallback, device choice and the headless pipeline,
with tiny random-weight models on CPU."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from napari_tae import inference
from napari_tae.inference import iter_reconstruct, reconstruct, segment, select_device
from napari_tae.models import build_model
from napari_tae.postprocess import anomaly_mask, lesion_table
from napari_tae.preprocess import fit_normalisation, prepare_volume

SHAPE = (7, 40, 52)  # (Z, Y, X), non-square slices, padded to a square before resizing


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """A bright ellipsoid 'brain' on a zero background; first and last slices empty."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    brain = ((zz - 3) / 3.2) ** 2 + ((yy - 20) / 17) ** 2 + ((xx - 26) / 22) ** 2 < 1
    data = (rng.normal(300, 40, SHAPE) * brain).astype(np.float32)
    data[2:4, 15:20, 20:26] += 400  # a hyperintense "lesion"
    data[0] = data[-1] = 0
    assert brain[1:-1].any(axis=(1, 2)).all()
    return data


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("b_tae", img_size=64, depth=1, embed_dim=32, num_heads=2)


class CountingModel(nn.Module):
    """Wraps a model; records batch sizes; raises CUDA OOM above ``max_batch`` (on any device)."""

    def __init__(self, inner: nn.Module, max_batch: int | None = None, error: Exception | None = None):
        super().__init__()
        self.inner = inner
        self.img_size = inner.img_size
        self.max_batch = max_batch
        self.error = error
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if self.error is not None:
            raise self.error
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.inner(x)


def _run(gen):
    """Consume a generator, returning (yields, return value)."""
    yields = []
    while True:
        try:
            yields.append(next(gen))
        except StopIteration as stop:
            return yields, stop.value


def test_shapes_progress_and_residual(volume, model):
    yields, rec = _run(iter_reconstruct(model, volume, device="cpu", batch_size=2))
    total = SHAPE[0]
    assert yields[-1] == (total, total)
    assert all(t == total for _, t in yields)
    done = [d for d, _ in yields]
    assert done == sorted(done) and len(yields) == 3  # 5 brain slices in batches of 2
    for arr in (rec.normalised, rec.reconstruction, rec.residual):
        assert arr.shape == SHAPE and arr.dtype == np.float32
    assert rec.brain.shape == SHAPE and rec.brain.dtype == bool
    assert rec.device == "cpu" and rec.batch_size == 2

    np.testing.assert_array_equal(
        rec.residual, rec.brain * np.maximum(rec.normalised - rec.reconstruction, 0)
    )
    # independent path: the same prepared slices through the model, mapped back to the native grid
    prepared = prepare_volume(volume, 64)
    np.testing.assert_array_equal(rec.normalised, prepared.normalised)
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(prepared.slices[1:-1, None]))[:, 0].numpy()
    expected = prepared.grid.to_native(np.concatenate([np.zeros_like(out[:1]), out, np.zeros_like(out[:1])]))
    np.testing.assert_allclose(rec.reconstruction, expected, atol=1e-5)
    assert not rec.reconstruction[0].any() and not rec.reconstruction[-1].any()  # brainless slices skipped


def test_batch_size_does_not_change_the_result(volume, model):
    a = reconstruct(model, volume, device="cpu", batch_size=1)
    b = reconstruct(model, volume, device="cpu", batch_size=16)
    np.testing.assert_allclose(a.reconstruction, b.reconstruction, atol=1e-5)


def test_cpu_batches_are_split_over_the_torch_threads_with_the_same_result(volume, model, two_torch_threads):
    seen: list[tuple[int, int]] = []
    hook = model.register_forward_hook(
        lambda _module, inputs, _output: seen.append((threading.get_ident(), inputs[0].shape[0])))
    try:
        split = reconstruct(model, volume, device="cpu", batch_size=4)
        split_bf16 = reconstruct(model, volume, device="cpu", batch_size=4, precision="bfloat16")
    finally:
        hook.remove()
    # 5 brain slices in batches of 4: chunks of 2 and 2 on two threads, then the last slice alone
    assert sorted(n for _, n in seen[:3]) == [1, 2, 2] and len({ident for ident, _ in seen[:3]}) == 2
    assert split.batch_size == 4 and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    whole = reconstruct(model, volume, device="cpu", batch_size=4)
    np.testing.assert_allclose(split.reconstruction, whole.reconstruction, atol=1e-5)
    # autocast is entered on each chunk's own thread: every brain slice is bfloat16's, none float32's
    difference = np.abs(split_bf16.reconstruction - split.reconstruction).max(axis=(1, 2))
    assert (difference[1:-1] > 1e-3).all()


def test_closing_a_split_run_ends_its_threads(volume, model, two_torch_threads):
    def slice_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("napari-tae-slices")]

    gen = iter_reconstruct(model, volume, device="cpu", batch_size=2)
    next(gen)
    assert len(slice_threads()) == 1
    gen.close()
    assert not slice_threads() and torch.get_num_threads() == 2


def test_close_mid_run_stops_and_leaves_nothing_behind(volume, model):
    wrapped = CountingModel(model)
    wrapped.train()  # the run switches to eval; closing must restore the caller's mode
    gen = iter_reconstruct(wrapped, volume, device="cpu", batch_size=1)
    assert wrapped.calls == []  # nothing runs before the first next()
    assert next(gen) == (2, SHAPE[0])
    assert not wrapped.training and not wrapped.inner.training
    # the grad mode is not left switched off for the consumer between yields
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    gen.close()
    assert wrapped.calls == [1]
    assert wrapped.training and wrapped.inner.training
    with pytest.raises(StopIteration):
        next(gen)
    model.eval()
    # a fresh run after a cancelled one gives the full, normal result
    np.testing.assert_array_equal(
        reconstruct(wrapped, volume, device="cpu").reconstruction,
        reconstruct(model, volume, device="cpu").reconstruction,
    )


def test_out_of_memory_halves_batch_and_retries(volume, model):
    wrapped = CountingModel(model, max_batch=2)
    rec = reconstruct(wrapped, volume, device="cpu", batch_size=8)
    assert rec.batch_size == 2
    assert wrapped.calls == [5, 2, 2, 1]  # the 5 brain slices fail as one batch, then halves
    reference = reconstruct(model, volume, device="cpu", batch_size=2)
    np.testing.assert_array_equal(rec.reconstruction, reference.reconstruction)
    np.testing.assert_array_equal(rec.residual, reference.residual)


def test_out_of_memory_at_batch_one_and_other_errors_propagate(volume, model):
    always = CountingModel(model, max_batch=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        reconstruct(always, volume, device="cpu", batch_size=4)
    assert always.calls == [4, 2, 1]
    broken = CountingModel(model, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        reconstruct(broken, volume, device="cpu", batch_size=4)
    assert broken.calls == [4]  # not mistaken for an out-of-memory error


def test_intensity_baseline_residual_is_normalised_input(volume):
    intensity = build_model("intensity", img_size=64)
    rec = reconstruct(intensity, volume, device="cpu")
    assert not rec.reconstruction.any()
    np.testing.assert_array_equal(rec.residual, rec.normalised)
    assert rec.normalised.max() == pytest.approx(1.0) and rec.normalised.min() == 0.0


def test_segment_headless_pipeline(volume, model):
    geometry = SimpleNamespace(spacing=(2.0, 1.0, 0.5), origin=(-5.0, 10.0, 3.0))
    vol = SimpleNamespace(data=volume, geometry=geometry)
    meta = SimpleNamespace(
        model_name="b_tae",
        sha256="abc123",
        calibration={"p99": 3.5, "p99.5": 5.0, "p99.9": 9.0, "default": 3.5},
        preprocessing={"normalisation": "per_volume", "upper_percentile": 99.0},
    )
    seg = segment(vol, model, meta, kernel=3, min_size=2, device="cpu")
    assert seg.settings["squash"] == 3.5 and seg.settings["squash_source"] == "calibrated"
    brain = volume != 0
    assert seg.norm == fit_normalisation(volume, brain, 99.0)
    rec = reconstruct(model, volume, brain=brain, norm=seg.norm, device="cpu")
    np.testing.assert_array_equal(seg.residual, rec.residual)
    expected = anomaly_mask(rec.residual, kernel=3, squash=3.5, min_size=2, brain=rec.brain)
    np.testing.assert_array_equal(seg.mask, expected)
    assert seg.lesions == lesion_table(expected, rec.residual, geometry.spacing, geometry.origin)
    json.dumps(seg.settings)  # provenance must be JSON-serialisable
    assert seg.settings["checkpoint_sha256"] == "abc123" and seg.settings["median_kernel"] == 3

    # no calibration: a robust threshold of this scan's own score (the uncalibrated intensity
    # baseline takes the same path)
    from napari_tae.scores import robust_squash

    plain = segment(volume, build_model("intensity", img_size=64), None, device="cpu")
    expected_squash = robust_squash(plain.normalised, plain.brain)
    assert plain.settings["squash"] == expected_squash and plain.settings["squash_source"] == "per-scan robust"
    np.testing.assert_array_equal(plain.score, plain.normalised)
    np.testing.assert_array_equal(plain.mask, anomaly_mask(plain.normalised, squash=expected_squash,
                                                           brain=plain.brain))
    assert plain.lesions and plain.lesions[0]["volume_ml"] == pytest.approx(plain.lesions[0]["voxels"] / 1000)
    user = segment(volume, build_model("intensity", img_size=64), meta, squash=0.5 * expected_squash,
                   device="cpu")
    assert user.settings["squash_source"] == "user" and user.mask.sum() > plain.mask.sum()


def test_segment_with_fused_and_prior_scores(volume, model):
    from napari_tae.scores import anomaly_score

    meta = SimpleNamespace(
        model_name="b_tae", sha256="abc123", calibration={"p99": 3.5, "default": 3.5},
        preprocessing={"normalisation": "per_volume", "upper_percentile": 99.0},
        scores={"default": "fused", "fused": {"weight": 0.5}, "prior": {"threshold": 0.4},
                "table": [{"score": "fused", "kernel": 3, "mode": "2d", "p99": 60.0, "p99.5": 70.0, "p99.9": 80.0}]})
    fused = segment(volume, model, meta, kernel=3, device="cpu")  # the checkpoint's default score
    x, r, brain = fused.normalised, fused.residual, fused.brain
    np.testing.assert_array_equal(fused.score, anomaly_score("fused", x, r, brain, weight=0.5))
    np.testing.assert_allclose(fused.score[brain], (x + 0.5 * r)[brain], rtol=1e-6)
    assert fused.settings["score"] == "fused" and fused.settings["score_params"] == {"name": "fused", "weight": 0.5}
    assert (fused.settings["squash"], fused.settings["squash_source"]) == (60.0, "calibrated")
    np.testing.assert_array_equal(fused.mask, anomaly_mask(fused.score, kernel=3, squash=60.0, brain=brain))
    # the prior: the residual where the FLAIR is above 0.4; no calibrated value -> per scan
    prior = segment(volume, model, meta, kernel=3, score="prior", device="cpu")
    np.testing.assert_array_equal(prior.score, np.where(brain & (x > 0.4), r, 0).astype(np.float32))
    assert prior.settings["squash_source"] == "per-scan robust"
    with pytest.raises(ValueError, match="no calibrated 'fused' score"):
        segment(volume, model, SimpleNamespace(model_name="b_tae", calibration={}), score="fused", device="cpu")


def _availability(monkeypatch, cuda: bool, mps: bool, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if cuda else 0)
    monkeypatch.setattr(inference, "_mps_available", lambda: mps)


@pytest.mark.parametrize(
    "cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_select_device_auto_order(monkeypatch, cuda, mps, expected):
    _availability(monkeypatch, cuda, mps)
    assert select_device("auto") == torch.device(expected)
    assert select_device("cpu") == torch.device("cpu")


def test_select_device_explicit(monkeypatch):
    _availability(monkeypatch, cuda=True, mps=False, count=2)
    assert select_device("cuda:1") == torch.device("cuda:1")
    assert select_device(" CUDA ") == torch.device("cuda")
    with pytest.raises(ValueError, match="only 2 CUDA"):
        select_device("cuda:2")
    with pytest.raises(ValueError, match="MPS is not available"):
        select_device("mps")
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        select_device("tpu")
    _availability(monkeypatch, cuda=False, mps=False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda")


def test_precision_resolved_per_device():
    from napari_tae.inference import resolve_precision

    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert resolve_precision("auto", cpu) == "float32" and resolve_precision("auto", cuda) == "bfloat16"
    assert resolve_precision("auto", mps) == "float32" and resolve_precision("bfloat16", cpu) == "bfloat16"
    with pytest.raises(ValueError, match="bfloat16 runs on CUDA or the CPU, not on mps"):
        resolve_precision("bfloat16", mps)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        resolve_precision("half", cpu)


@pytest.mark.parametrize("has_bfloat16", [False, True])
def test_cpu_bfloat16_without_its_instructions_is_warned_of_once(monkeypatch, caplog, has_bfloat16):
    from napari_tae.inference import resolve_precision

    inference._warn_emulated_bfloat16.cache_clear()
    monkeypatch.setattr(inference, "_cpu_has_bfloat16", lambda: has_bfloat16)
    with caplog.at_level("WARNING", logger="napari_tae.inference"):
        for _ in range(3):  # as a batch run resolves it for each volume
            assert resolve_precision("bfloat16", torch.device("cpu")) == "bfloat16"
        resolve_precision("auto", torch.device("cpu"))
        resolve_precision("float32", torch.device("cpu"))
    warned = [r.getMessage() for r in caplog.records if "no bfloat16 instructions" in r.getMessage()]
    assert len(warned) == (0 if has_bfloat16 else 1)
    inference._warn_emulated_bfloat16.cache_clear()
    # the widget shows the same note before a run; only bfloat16 on such a CPU has one
    notes = {(p, d): inference.precision_note(p, torch.device(d))
             for p in ("auto", "float32", "bfloat16") for d in ("cpu", "cuda")}
    assert notes.pop(("bfloat16", "cpu")) == ("" if has_bfloat16 else inference.EMULATED_BFLOAT16)
    assert set(notes.values()) == {""}


def test_bad_batch_size(volume, model):
    with pytest.raises(ValueError, match="batch_size"):
        reconstruct(model, volume, device="cpu", batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_close_to_cpu(volume, model):
    cpu = reconstruct(model, volume, device="cpu")
    gpu = reconstruct(model, volume, device="cuda", precision="auto")
    assert gpu.settings["precision"] == "bfloat16"
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.reconstruction, cpu.reconstruction, atol=0.05)
    model.to("cpu")


def test_segment_with_saved_checkpoint(volume, model, tmp_path):
    from napari_tae.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(
        tmp_path / "tiny.safetensors",
        model,
        preprocessing={"normalisation": "per_volume", "upper_percentile": 99.5},
        calibration={"p99": 2.0, "p99.5": 3.0, "p99.9": 4.0, "default": 2.0},
    )
    loaded, meta = load_checkpoint(path)
    seg = segment(volume, loaded, meta, device="cpu")
    assert seg.settings["squash"] == 2.0 and seg.settings["checkpoint_sha256"] == meta.sha256
    direct = segment(volume, model, None, squash=2.0, device="cpu")
    np.testing.assert_array_equal(seg.residual, direct.residual)
    np.testing.assert_array_equal(seg.mask, direct.mask)


def test_preprocess_options_from_meta_and_default_squash(volume):
    from napari_tae.inference import default_squash
    from napari_tae.preprocess import NormParams, PreprocessOptions

    assert PreprocessOptions.from_meta(None) == PreprocessOptions()
    per_volume = SimpleNamespace(preprocessing={"normalisation": "per_volume", "upper_percentile": 98.0})
    options = PreprocessOptions.from_meta(per_volume)
    assert options.upper_percentile == 98.0 and options.fixed_norm is None
    fixed = SimpleNamespace(preprocessing={"normalisation": "fixed", "low": 10.0, "high": 500.0})
    assert PreprocessOptions.from_meta(fixed).fixed_norm == NormParams(10.0, 500.0, 99.5, 0.5)
    assert default_squash(None) == (1.0, "paper default")
    assert default_squash(SimpleNamespace(calibration={})) == (1.0, "paper default")
    assert default_squash(SimpleNamespace(calibration={"default": 2.5})) == (2.5, "calibrated")


def test_reconstruct_uses_the_checkpoints_normalisation(volume, model):
    from napari_tae.inference import reconstruct

    brain = volume != 0
    meta = SimpleNamespace(preprocessing={"normalisation": "per_volume", "upper_percentile": 90.0})
    with_meta = reconstruct(model, volume, meta=meta, device="cpu")
    explicit = reconstruct(model, volume, brain=brain, norm=fit_normalisation(volume, brain, 90.0),
                           device="cpu")
    assert with_meta.norm == explicit.norm and with_meta.norm.upper_percentile == 90.0
    np.testing.assert_array_equal(with_meta.residual, explicit.residual)
    assert reconstruct(model, volume, device="cpu").norm.upper_percentile == 99.5
