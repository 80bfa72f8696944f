"""Review logic without a viewer: edits, live post-processing, export and provenance."""

import csv
import json
import os
import socket

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_tae.export import ExportError, export_paths
from napari_tae.io import load_volume
from napari_tae.plugin.review import (
    EditRecord,
    Generation,
    PostSettings,
    ReviewState,
    compute_mask,
    export_results,
    lesion_features,
    lesion_rows,
)


def _residual(shape=(8, 24, 20), seed=0):
    rng = np.random.default_rng(seed)
    r = rng.random(shape, dtype=np.float32) * 0.02
    r[2:6, 5:12, 4:10] += 0.3    # one big lesion
    r[5, 18:20, 15:17] += 0.5    # a 4-voxel one
    return r


def _state(residual=None, **kw):
    r = _residual() if residual is None else residual
    return ReviewState(source_name="flair", residual=r, brain=None, spacing=(3.0, 1.0, 1.0),
                       origin=(0.0, -10.0, 5.0), **kw)


def test_generation():
    g = Generation()
    a = g.next()
    assert g.is_current(a)
    b = g.next()
    assert not g.is_current(a) and g.is_current(b)
    g.invalidate()
    assert not g.is_current(b)


def test_min_voxels():
    assert PostSettings(min_size=0).min_voxels((1, 1, 1)) == 0
    assert PostSettings(min_size=7).min_voxels((2, 2, 2)) == 7
    # 0.1 mL = 100 mm^3 = 12.5 voxels of 8 mm^3 -> 13
    assert PostSettings(min_size=0.1, min_size_unit="mL").min_voxels((2, 2, 2)) == 13


def test_compute_mask_matches_reference():
    r = _residual()
    post = PostSettings(kernel=3, squash=5.0)
    res = compute_mask(r, post, spacing=(3.0, 1.0, 1.0), origin=(0, 0, 0))
    # hand reference: scipy median per axial slice then threshold
    ref = ndi.median_filter(r, size=(1, 3, 3), mode="reflect") > 0.05
    np.testing.assert_array_equal(res.auto, ref)
    np.testing.assert_array_equal(res.labels > 0, ref)
    assert [les["label"] for les in res.lesions] == list(range(1, len(res.lesions) + 1))
    assert res.lesions[0]["voxels"] == int((res.labels == 1).sum())
    assert res.lesions[0]["volume_ml"] == pytest.approx(res.lesions[0]["voxels"] * 3e-3)


def test_kernel_one_is_plain_threshold():
    r = _residual()
    res = compute_mask(r, PostSettings(kernel=1, squash=2.0), spacing=(1, 1, 1), origin=(0, 0, 0))
    np.testing.assert_array_equal(res.auto, r > 0.02)


def test_squash_up_shrinks_mask():
    r = _residual()
    prev = None
    for squash in (0.5, 1, 2, 5, 10, 20):
        m = compute_mask(r, PostSettings(kernel=3, squash=squash), spacing=(1, 1, 1),
                         origin=(0, 0, 0)).auto
        if prev is not None:
            assert not (m & ~prev).any()
        prev = m
    assert not prev.any() or prev.sum() < (r > 0.01).sum()


def test_min_size_drops_small_lesion():
    r = _residual()
    small = compute_mask(r, PostSettings(kernel=1, squash=10), spacing=(1, 1, 1), origin=(0, 0, 0))
    big = compute_mask(r, PostSettings(kernel=1, squash=10, min_size=5), spacing=(1, 1, 1),
                       origin=(0, 0, 0))
    assert len(small.lesions) == 2 and len(big.lesions) == 1


def test_edit_record_paint_and_erase():
    written = np.zeros((3, 4, 4), np.int32)
    written[1, 1, 1] = 2
    rec = EditRecord(written.shape)
    layer = written.copy()
    assert rec.record(layer, written) == 0 and rec.added is None
    layer[0, 0, 0] = 5      # paint
    layer[1, 1, 1] = 0      # erase
    assert rec.record(layer, written) == 2
    assert rec.n_added == 1 and rec.n_erased == 1
    auto = np.zeros(written.shape, bool)
    auto[1, 1, 1] = auto[2, 2, 2] = True
    merged = rec.apply(auto)
    expected = auto.copy()
    expected[0, 0, 0] = True
    expected[1, 1, 1] = False
    np.testing.assert_array_equal(merged, expected)
    np.testing.assert_array_equal(rec.apply(auto[1], index=1), expected[1])
    # painting back over an erased voxel flips it from erased to added
    written2 = np.where(merged, 1, 0)
    layer2 = written2.copy()
    layer2[1, 1, 1] = 1
    rec.record(layer2, written2, index=1)
    assert rec.apply(auto)[1, 1, 1] and rec.n_erased == 0


def test_manual_edit_survives_settings_change():
    st = _state()
    layer = st.accept(st.compute(PostSettings(kernel=3, squash=5)))
    layer = layer.copy()
    layer[0, 0, 0:3] = 7                 # paint a lesion outside the automatic mask
    big = layer == 1
    erase_at = tuple(np.argwhere(big)[0])
    layer[erase_at] = 0                  # erase one voxel of the big lesion
    assert st.record_edits(layer) == 4
    for post in (PostSettings(kernel=5, squash=1), PostSettings(kernel=1, squash=15)):
        res = st.finish(st.compute(post))
        new = st.accept(res)
        assert (new[0, 0, 0:3] > 0).all()
        assert new[erase_at] == 0
        # everything else follows the automatic mask
        auto = res.auto.copy()
        auto[0, 0, 0:3] = True
        auto[erase_at] = False
        np.testing.assert_array_equal(new > 0, auto)


def test_finish_remerges_edits_made_during_compute():
    st = _state()
    st.accept(st.compute(PostSettings(kernel=3, squash=5)))
    pending = st.compute(PostSettings(kernel=3, squash=2))     # "worker" started
    layer = st.written.copy()
    layer[7, 0, 0] = 1                                         # user paints meanwhile
    st.record_edits(layer)
    assert pending.edit_version != st.edits.version
    done = st.finish(pending)
    assert done.labels[7, 0, 0] > 0 and done.edit_version == st.edits.version


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_preview_slice_equals_volume(mode):
    st = _state()
    st.accept(st.compute(PostSettings(kernel=3, squash=5, mode=mode)))
    post = PostSettings(kernel=5, squash=2, mode=mode)
    full = compute_mask(st.residual, post, spacing=st.spacing, origin=st.origin).auto
    for z in (0, 3, 7):
        prev = st.preview_slice(z, post)
        np.testing.assert_array_equal(prev > 0, full[z])
        np.testing.assert_array_equal(st.written[z], prev)   # written tracks the preview


def _nifti(tmp_path, shape=(20, 24, 8)):
    # oblique, anisotropic, LPS-like affine: the round trip must keep it exactly
    rot = np.array([[-0.98, 0.17, 0.0], [-0.17, -0.98, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.1, 0.9, 3.0])
    aff[:3, 3] = [90.0, 120.0, -40.0]
    data = np.random.default_rng(1).random(shape).astype(np.float32)
    img = nib.Nifti1Image(data, aff)
    img.header.set_qform(aff, code=1)
    img.header.set_sform(aff, code=2)
    path = tmp_path / "input.nii.gz"
    nib.save(img, path)
    return path


def test_export_round_trip_and_refusals(tmp_path):
    src = _nifti(tmp_path)
    vol = load_volume(src)
    g = vol.geometry
    r = _residual(g.shape)
    st = ReviewState(source_name="input", residual=r, brain=None, spacing=g.spacing,
                     origin=g.origin, geometry=g)
    labels = st.accept(st.compute(PostSettings(kernel=3, squash=5)))
    out = tmp_path / "out"
    out.mkdir()
    paths = export_results(out, "case1", mask=labels, state=st, input_file=str(src))
    src_img = nib.load(src)
    for kind in ("mask", "residual"):
        img = nib.load(paths[kind])
        np.testing.assert_allclose(img.affine, src_img.affine, atol=1e-6)
        np.testing.assert_allclose(img.get_qform(), src_img.get_qform(), atol=1e-6)
        np.testing.assert_allclose(img.get_sform(), src_img.get_sform(), atol=1e-6)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
        assert img.shape == src_img.shape
    back = load_volume(paths["mask"]).data
    np.testing.assert_array_equal(back > 0, labels > 0)
    assert nib.load(paths["mask"]).get_data_dtype().kind in "ui"
    np.testing.assert_allclose(load_volume(paths["residual"]).data, r, atol=1e-6)

    rows = list(csv.DictReader(open(paths["lesions"])))
    assert len(rows) == len(st.lesions) and "centroid_mm_z" in rows[0]
    assert float(rows[0]["volume_ml"]) == pytest.approx(st.lesions[0]["volume_ml"])
    prov = json.loads(paths["provenance"].read_text())
    assert prov["input"] == str(src.resolve()) and len(prov["input_sha256"]) == 64
    assert prov["settings"]["median_kernel"] == 3 and prov["lesions"] == len(rows)
    assert prov["software"]["napari_tae"] and prov["date"]
    assert prov["outputs"]["mask"] == str(paths["mask"].resolve())
    # committed as one set, as the CLI's: the record lists the other files with their hashes
    from napari_tae.export import file_sha256

    assert {k: v["sha256"] for k, v in prov["files"].items()} == {
        k: file_sha256(paths[k]) for k in ("mask", "residual", "lesions")}
    assert prov["lesion_volume_ml"] == pytest.approx(sum(float(r["volume_ml"]) for r in rows))
    assert sorted(os.listdir(out)) == sorted(p.name for p in paths.values())  # no temporary, no lock
    # a batch writing this case right now holds its lock: the export waits for nothing and says so
    (out / ".case2.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                 "taken": "now"}))
    with pytest.raises(ExportError, match="being written by pid"):
        export_results(out, "case2", mask=labels, state=st, input_file=str(src))
    assert not (out / "case2_mask.nii.gz").exists()

    with pytest.raises(ExportError, match="exists"):
        export_results(out, "case1", mask=labels, state=st, input_file=str(src))
    # base name that would land on the input file
    with pytest.raises(ExportError):
        export_paths(out, "a/b")
    # an input file named like one of the outputs is never written over
    with pytest.raises(ExportError, match="input"):
        export_results(tmp_path, "x", mask=labels, state=st,
                       input_file=str(tmp_path / "x_mask.nii.gz"))
    assert not (tmp_path / "x_residual.nii.gz").exists()


def test_lesion_rows_and_features():
    st = _state()
    res = st.compute(PostSettings(kernel=1, squash=10))
    rows = lesion_rows(res.lesions)
    feats = lesion_features(res.lesions)
    assert len(rows) == 2 and rows[0][0] == "1" and len(rows[0]) == 6
    assert list(feats["index"]) == [0, 1, 2]
    assert feats["voxels"][1] == (res.labels == 1).sum() and feats["voxels"][2] == 4
