"""Synthetic FLAIR generator: determinism, contrast, anomalies, geometry and dataset files."""

import json
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_tae import synthetic as syn

SHAPE = (64, 80, 64)  # ~3 mm voxels: a fraction of a second per volume


@pytest.fixture(scope="module")
def subject():
    return syn.healthy_subject(7, shape=SHAPE)


@pytest.fixture(scope="module")
def anomalous(subject):
    data, labels = syn.add_anomalies(subject, 11)
    return data, labels


def test_template_files_are_bundled():
    paths = syn.template_paths()
    assert set(paths) == {"t1", "gm", "wm"}
    assert all(p.is_file() for p in paths.values())


def test_import_is_light_and_lazy():
    code = (
        "import sys, napari_tae.synthetic as s;"
        "assert s._template.cache_info().currsize == 0;"
        "assert 'torch' not in sys.modules and 'napari' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_same_seed_same_volume_different_seed_differs(subject):
    a, aff_a = syn.healthy_volume(7, shape=SHAPE)
    np.testing.assert_array_equal(a, subject.data)
    np.testing.assert_array_equal(aff_a, subject.affine)
    b, _ = syn.healthy_volume(8, shape=SHAPE)
    assert a.shape == b.shape == SHAPE
    assert np.mean(np.abs(a - b)) > 0.05 * np.mean(a[a > 0])


def test_healthy_volume_contents(subject):
    d, brain = subject.data, subject.brain
    assert d.dtype == np.float32 and d.shape == SHAPE and np.isfinite(d).all()
    assert np.all(d[~brain] == 0), "not skull-stripped"
    assert np.all(d[brain] >= 0)
    assert 0.03 < brain.mean() < 0.5
    ndi_label, n = ndi.label(brain)
    assert n == 1
    # brain fully inside the field of view (no tissue on the borders)
    for ax in range(3):
        assert not brain.take(0, axis=ax).any() and not brain.take(-1, axis=ax).any()


def test_flair_contrast_ordering(subject):
    """FLAIR: CSF dark, white matter intermediate, grey matter brightest."""
    d = subject.data

    def mean_in(prob):
        sel = (prob > 0.8) & subject.brain
        assert sel.sum() > 30
        return d[sel].mean()

    csf, wm, gm = mean_in(subject.csf), mean_in(subject.wm), mean_in(subject.gm)
    assert csf < 0.6 * wm
    assert wm < gm
    # same ordering on every seed, not just one lucky draw
    for seed in (1, 2):
        s = syn.healthy_subject(seed, shape=SHAPE)
        m = [s.data[(p > 0.8) & s.brain].mean() for p in (s.csf, s.wm, s.gm)]
        assert m[0] < m[1] < m[2]


def test_affine_and_grid(subject):
    aff = subject.affine
    assert aff.shape == (4, 4)
    np.testing.assert_array_equal(aff[3], [0, 0, 0, 1])
    assert np.linalg.det(aff[:3, :3]) > 0  # RAS+, no flip
    np.testing.assert_allclose(np.diag(aff)[:3], subject.spacing)
    # the world origin of MNI space (near the anterior commissure) lies inside the grid and brain
    ijk = np.round(np.linalg.solve(aff, [0, 0, 0, 1])[:3]).astype(int)
    assert np.all(ijk >= 0) and np.all(ijk < SHAPE)
    assert subject.brain[tuple(ijk)]
    with pytest.raises(ValueError, match="shape"):
        syn.healthy_volume(0, shape=(4, 80, 64))


def test_default_grid_is_realistic_and_fast_enough():
    t = time.perf_counter()
    flair, mask, aff = syn.sample_case(3)
    elapsed = time.perf_counter() - t
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(0))
    assert np.all(spacing >= 1.0 - 1e-9) and np.all(spacing <= 1.3 + 1e-9)
    assert all(140 <= n <= 240 for n in flair.shape)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert np.all(flair[mask > 0] > 0)
    assert elapsed < 15.0  # a few seconds on one core; generous for a loaded CI machine


def test_small_volume_speed():
    syn.healthy_volume(0, shape=SHAPE)  # warm the template cache
    t = time.perf_counter()
    syn.healthy_volume(1, shape=SHAPE)
    assert time.perf_counter() - t < 3.0


def test_anomalies_deterministic_and_inside_brain(subject, anomalous):
    data, labels = anomalous
    d2, l2 = syn.add_anomalies(subject, 11)
    np.testing.assert_array_equal(data, d2)
    np.testing.assert_array_equal(labels, l2)
    d3, l3 = syn.add_anomalies(subject, 12)
    assert not np.array_equal(l3, labels)
    assert labels.dtype == np.uint8 and labels.shape == SHAPE
    assert set(np.unique(labels)) == {0, *syn.KIND_LABELS.values()}, "every kind inserted"
    assert not np.any(labels[~subject.brain])
    assert np.all(data[~subject.brain] == 0)
    assert np.isfinite(data).all() and data.min() >= 0
    # the input is not modified
    np.testing.assert_array_equal(subject.data, syn.healthy_volume(7, shape=SHAPE)[0])


def _ring(mask, brain, width=2):
    return ndi.binary_dilation(mask, iterations=width) & ~mask & brain


def test_ms_lesions_hyperintense_in_white_matter(subject):
    data, labels = syn.add_anomalies(subject, 5, ("ms",), counts={"ms": 8})
    les = labels == syn.KIND_LABELS["ms"]
    assert les.sum() >= 8
    assert set(np.unique(labels)) == {0, syn.KIND_LABELS["ms"]}
    assert subject.wm[les].mean() > 0.6, "lesions sit in white matter"
    surround_wm = _ring(les, subject.brain) & (subject.wm > 0.8)
    assert data[les].mean() > 1.25 * data[surround_wm].mean()
    assert data[les].mean() > 1.25 * subject.data[les].mean()
    # outside the lesions and their soft edge nothing changes
    far = ~ndi.binary_dilation(les, iterations=2)
    np.testing.assert_array_equal(data[far], subject.data[far])


def test_dark_regions_are_darker(subject):
    data, labels = syn.add_anomalies(subject, 3, ("dark",))
    m = labels == syn.KIND_LABELS["dark"]
    assert m.sum() > 5
    assert data[m].mean() < 0.75 * subject.data[m].mean()
    assert data[m].mean() < data[_ring(m, subject.brain)].mean()


def test_tumour_deformation_patch_change_the_image(subject):
    for kind in ("tumour", "deformation", "foreign_patch"):
        data, labels = syn.add_anomalies(subject, 4, (kind,))
        m = labels == syn.KIND_LABELS[kind]
        assert m.sum() > 5, kind
        assert np.mean(np.abs(data[m] - subject.data[m])) > 0.02 * subject.wm_level, kind
    data, labels = syn.add_anomalies(subject, 4, ("tumour",))
    m = labels == syn.KIND_LABELS["tumour"]
    assert m.sum() > 200  # a mass, not a speck
    # oedema rim: the outer half of the mass is hyperintense relative to where it was
    outer = m & ~ndi.binary_erosion(m, iterations=2)
    assert data[outer].mean() > subject.data[outer].mean()


def test_anomalies_on_plain_array_estimates_tissue(subject):
    """Real skull-stripped data comes without tissue maps: the intensity fallback must work."""
    data, labels = syn.add_anomalies(subject.data, 2, ("ms", "dark"), affine=subject.affine)
    assert (labels == syn.KIND_LABELS["ms"]).any() and (labels == syn.KIND_LABELS["dark"]).any()
    assert not np.any(labels[subject.data == 0])
    with pytest.raises(ValueError, match="unknown anomaly kind"):
        syn.add_anomalies(subject, 0, ("glioma",))


def test_write_dataset_reads_back(tmp_path):
    shape = (48, 56, 48)
    paths = syn.write_dataset(tmp_path / "ds", 2, 1, 2, seed=3, shape=shape, n_test_healthy=1)
    assert len(paths["train"]) == 2 and len(paths["val"]) == 1 and len(paths["test_healthy"]) == 1
    assert [p.name for p in paths["test_images"]] == [p.name for p in paths["test_labels"]]
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["kind_labels"] == syn.KIND_LABELS
    assert [c["anomaly_kinds"] for c in manifest["test"]] == [["ms"], ["tumour"]]
    for p in paths["train"] + paths["val"] + paths["test_images"]:
        img = nib.load(p)
        assert img.shape == shape
        assert img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.get_qform(), img.get_sform())
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert img.header.get_xyzt_units()[0] == "mm"
        np.testing.assert_allclose(img.header.get_zooms(), np.sqrt((img.affine[:3, :3] ** 2).sum(0)), rtol=1e-5)
    for img_p, lab_p, kind_p, mask_p, case in zip(
        paths["test_images"], paths["test_labels"], paths["test_kinds"], paths["test_masks"], manifest["test"]
    ):
        img = nib.load(img_p)
        lab = np.asarray(nib.load(lab_p).dataobj)
        kinds = np.asarray(nib.load(kind_p).dataobj)
        mask = np.asarray(nib.load(mask_p).dataobj)
        np.testing.assert_allclose(nib.load(lab_p).affine, img.affine)
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1} and lab.sum() > 0
        np.testing.assert_array_equal(lab, kinds > 0)
        assert not np.any(lab & (mask == 0))
        np.testing.assert_array_equal(mask > 0, np.asarray(img.dataobj) > 0)
        assert case["anomaly_voxels"] == {case["anomaly_kinds"][0]: int(lab.sum())}
    # the same seed writes the same data; an existing dataset is not overwritten by accident
    again = syn.write_dataset(tmp_path / "ds2", 2, 1, 2, seed=3, shape=shape, n_test_healthy=1)
    for a, b in zip(paths["test_images"], again["test_images"]):
        np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    with pytest.raises(FileExistsError, match="manifest.json"):
        syn.write_dataset(tmp_path / "ds", 1, 0, 0, shape=shape)


def test_plain_array_without_geometry_warns(subject):
    with pytest.warns(UserWarning, match="assuming 1 mm"):
        syn.add_anomalies(subject.data, 0, ("ms",), counts={"ms": 1})
