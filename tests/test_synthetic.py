"""Synthetic FLAIR generator: determinism, contrast, anomalies, geometry and dataset files."""

import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, replace

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


# ----------------------------------------------------------------------------- domain randomisation

#: every randomisation off: what is left is the anatomy and the FLAIR contrast
QUIET = syn.DomainRandomisation(
    texture=(0.0, 0.0), fine_texture=(0.0, 0.0), bias=(0.0, 0.0), noise=(0.0, 0.0), blur_mm=(0.0, 0.0),
    thick_slice_probability=0.0, log_gamma=(0.0, 0.0), deformation_mm=(0.0, 0.0), ventricle_rim=(0.0, 0.0),
)


def _clean(sub):
    """Noise-free image from the subject's own tissue maps and drawn contrast (gamma 1, no bias)."""
    c = sub.params["contrast"]
    return sub.wm_level * (c["gm"] * sub.gm + c["wm"] * sub.wm + c["csf"] * sub.csf) * sub.brain


def test_randomised_subject_is_reproducible_and_differs_from_the_default():
    dr = syn.DomainRandomisation()
    a = syn.healthy_subject(3, shape=SHAPE, randomisation=dr)
    b = syn.healthy_subject(3, shape=SHAPE, randomisation=dr)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.params == b.params and set(a.params["randomisation"]) >= {"gm_wm", "noise", "thick"}
    c = syn.healthy_subject(4, shape=SHAPE, randomisation=dr)
    assert a.params["randomisation"] != c.params["randomisation"]
    plain = syn.healthy_subject(3, shape=SHAPE)
    assert "randomisation" not in plain.params
    assert not np.array_equal(plain.data, a.data)


def test_randomised_contrast_ordering_per_subject():
    """CSF < WM < GM on every randomised subject (means over confident tissue voxels)."""
    for seed in range(4):
        s = syn.healthy_subject(seed, shape=SHAPE, randomisation=syn.DomainRandomisation())
        m = [s.data[(p > 0.8) & s.brain].mean() for p in (s.csf, s.wm, s.gm)]
        assert m[0] < 0.6 * m[1] < m[1] < m[2], (seed, m)
        assert np.all(s.data[~s.brain] == 0) and np.all(s.data >= 0) and np.isfinite(s.data).all()


def test_gaussian_noise_std_matches_the_parameter():
    dr = replace(QUIET, noise=(0.04, 0.04), rician_probability=0.0)
    sub = syn.healthy_subject(5, shape=SHAPE, randomisation=dr)
    clean = _clean(sub)
    flat = sub.brain & (clean > 0.5 * sub.wm_level)  # away from 0, where the clipping would bias it
    resid = (sub.data - clean)[flat]
    assert abs(resid.mean()) < 0.1 * sub.noise
    assert resid.std() == pytest.approx(0.04 * sub.wm_level, rel=0.05)
    assert sub.noise == pytest.approx(0.04 * sub.wm_level)


def test_rician_noise_second_moment():
    """Magnitude of signal + complex Gaussian noise: E[m^2] = A^2 + 2 sigma^2 (exact)."""
    dr = replace(QUIET, noise=(0.1, 0.1), rician_probability=1.0)
    sub = syn.healthy_subject(6, shape=SHAPE, randomisation=dr)
    clean = _clean(sub)
    excess = (sub.data ** 2 - clean ** 2)[sub.brain]
    assert excess.mean() == pytest.approx(2 * (0.1 * sub.wm_level) ** 2, rel=0.05)


def test_bias_field_is_smooth_and_within_its_range():
    dr = replace(QUIET, bias=(0.05, 0.05), bias_every_mm=(100.0, 100.0))
    sub = syn.healthy_subject(7, shape=SHAPE, randomisation=dr)
    clean = _clean(sub)
    inside = sub.brain & (clean > 0.2 * sub.wm_level)
    log_bias = np.log(sub.data[inside] / clean[inside])
    assert log_bias.std() == pytest.approx(0.05, rel=0.05)  # the std over the brain is the parameter
    assert abs(log_bias.mean()) < 0.01 and np.abs(log_bias).max() < 4 * 0.05
    # smooth: neighbouring voxels (3 mm apart) differ by a small fraction of the field's spread
    field = np.zeros(SHAPE)
    field[inside] = np.log(sub.data[inside] / clean[inside])
    pair = inside[1:] & inside[:-1]
    step = np.abs(np.diff(field, axis=0)[pair])
    assert np.median(step) < 0.1 * log_bias.std()


def test_thick_slices_average_the_thin_slices_they_cover():
    rng = np.random.default_rng(0)
    vol = rng.random((5, 4, 30)).astype(np.float32)
    thick, index_affine = syn.thick_slices(vol, 1.0, 3.0)
    assert thick.shape == (5, 4, 10)
    np.testing.assert_allclose(thick, vol.reshape(5, 4, 10, 3).mean(-1), rtol=1e-5)
    # fractional slabs (2.5 voxels): integrate a 10x finer piecewise-constant copy instead
    thick, index_affine = syn.thick_slices(vol, 1.2, 3.0)
    fine = np.repeat(vol, 10, axis=-1)
    ref = fine[..., : 12 * 25].reshape(5, 4, 12, 25).mean(-1)
    np.testing.assert_allclose(thick, ref, rtol=1e-5)
    # slab j is centred on thin index 2.5 j + 0.75 (the middle of thin voxels -0.5 .. 2.0)
    np.testing.assert_allclose(index_affine @ [0, 0, 1, 1], [0, 0, 2.5 + 0.75, 1])
    with pytest.raises(ValueError, match="below the voxel size"):
        syn.thick_slices(vol, 2.0, 1.0)


def test_thick_slice_grid_has_the_right_affine_and_zooms(tmp_path):
    dr = replace(QUIET, thick_slice_probability=1.0, slice_thickness_mm=(4.0, 4.0), thick_grid=True)
    thin = syn.healthy_subject(8, shape=SHAPE, randomisation=QUIET)
    sub = syn.healthy_subject(8, shape=SHAPE, randomisation=dr)
    assert sub.params["slice_thickness_mm"] == 4.0
    n_thick = int(SHAPE[2] * thin.spacing[2] // 4.0)
    assert sub.data.shape == (*SHAPE[:2], n_thick)
    np.testing.assert_allclose(sub.spacing, (*thin.spacing[:2], 4.0))
    # the first slab's centre is 2 mm above the lower edge of the first thin slice
    lower_edge = thin.affine @ [0, 0, -0.5, 1]
    np.testing.assert_allclose(sub.affine @ [0, 0, 0, 1], lower_edge + [0, 0, 2.0, 0], atol=1e-6)
    path = syn._save_nifti(sub.data, sub.affine, tmp_path / "thick.nii.gz")
    np.testing.assert_allclose(nib.load(path).header.get_zooms(), sub.spacing, rtol=1e-5)
    # without noise the thick volume is the slab average of the thin one (same anatomy and draws)
    ref, _ = syn.thick_slices(thin.data / thin.wm_level, thin.spacing[2], 4.0)
    np.testing.assert_allclose((sub.data / sub.wm_level)[sub.brain], ref[sub.brain], rtol=1e-4, atol=1e-5)
    # resampled back (the training default) the shape and affine stay those of the thin grid
    back = syn.healthy_subject(8, shape=SHAPE, randomisation=replace(dr, thick_grid=False))
    assert back.data.shape == SHAPE
    np.testing.assert_array_equal(back.affine, thin.affine)


def test_deformation_is_invertible_and_keeps_tissue_volumes():
    """The displacement at the largest default amplitude and finest control grid does not fold."""
    dr = syn.DomainRandomisation()
    spacing = np.array([1.5, 1.5, 1.5])
    shape = (100, 120, 100)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ctrl = syn._ctrl(shape, spacing, dr.deformation_every_mm[0])
        disp = [syn._smooth_field(rng, shape, ctrl) * dr.deformation_mm[1] / spacing[d] for d in range(3)]
        jac = np.empty(shape + (3, 3))
        for d in range(3):
            for e, g in enumerate(np.gradient(disp[d])):
                jac[..., d, e] = (d == e) + g
        assert np.linalg.det(jac).min() > 0.2
    still = syn.healthy_subject(9, shape=SHAPE, randomisation=QUIET)
    moved = syn.healthy_subject(9, shape=SHAPE, randomisation=replace(QUIET, deformation_mm=(3.5, 3.5)))
    assert not np.array_equal(still.brain, moved.brain)
    for name in ("brain", "gm", "wm", "csf"):
        a, b = getattr(still, name).sum(), getattr(moved, name).sum()
        # a smooth warp without a volume constraint changes local volumes a little
        assert b == pytest.approx(a, rel=0.08), name


def test_brain_scale_sets_the_brain_volume():
    small = syn.healthy_subject(2, shape=SHAPE, randomisation=replace(QUIET, brain_scale=(0.85, 0.85)))
    large = syn.healthy_subject(2, shape=SHAPE, randomisation=replace(QUIET, brain_scale=(1.0, 1.0)))
    ratio = small.brain.sum() / large.brain.sum()
    assert ratio == pytest.approx(0.85 ** 3, rel=0.06)


def test_gamma_changes_contrast_relative_to_white_matter():
    a = syn.healthy_subject(4, shape=SHAPE, randomisation=QUIET)
    b = syn.healthy_subject(4, shape=SHAPE, randomisation=replace(QUIET, log_gamma=(0.3, 0.3)))
    inside = a.brain & (a.data > 0)
    np.testing.assert_allclose(b.data[inside] / b.wm_level, (a.data[inside] / a.wm_level) ** np.exp(0.3),
                               rtol=1e-4)


def test_sharpening_and_sulci_keep_the_tissue_partition():
    s = syn.healthy_subject(1, shape=SHAPE, randomisation=syn.DomainRandomisation())
    total = s.gm + s.wm + s.csf
    np.testing.assert_allclose(total[s.brain], 1.0, atol=1e-4)
    assert s.gm.min() >= -1e-6 and s.csf.min() >= -1e-6
    blunt = syn.healthy_subject(1, shape=SHAPE, randomisation=replace(
        syn.DomainRandomisation(), sharpness=(1.0, 1.0), sulci=(0.0, 0.0)))
    # sharper maps: fewer voxels of mixed tissue
    def mixed(sub):
        return np.mean((sub.wm[sub.brain] > 0.2) & (sub.wm[sub.brain] < 0.8))

    assert mixed(s) < mixed(blunt)


def test_generated_statistics_within_the_measured_real_ranges():
    """Same statistics as docs/synthetic.md, on a few randomised subjects at the training grid."""
    names = ("gm_wm", "wm_spread", "noise", "edge", "bias", "median")
    stats = [syn.flair_statistics(s.data, s.brain, s.spacing) for s in (
        syn.healthy_subject(seed, shape=(132, 156, 126), randomisation=syn.DomainRandomisation())
        for seed in range(3))]
    for name in names:
        lo, hi = syn.REAL_FLAIR_RANGES[name]
        values = [getattr(st, name) for st in stats]
        # randomisation spreads subjects on purpose, a real range's width either side of five
        # scans' range; the typical subject sits in it
        span = hi - lo
        assert all(lo - span <= v <= hi + span for v in values), (name, values, (lo, hi))
        assert lo - span / 4 <= np.median(values) <= hi + span / 4, (name, values, (lo, hi))


def test_flair_statistics_against_hand_cases():
    """Two-tissue phantom: known class ratio, noise and a flat bias; a quadratic bias is found."""
    rng = np.random.default_rng(0)
    shape = (60, 60, 40)
    i = np.arange(shape[0])[:, None, None]
    base = np.where(i < 30, 1.0, 1.3) * np.ones(shape)
    base[:, :, :5] = 0.3  # a dark third class
    brain = np.ones(shape, bool)
    noisy = base + 0.02 * rng.standard_normal(shape)
    st = syn.flair_statistics(noisy, brain, (1.0, 1.0, 1.0))
    lo, hi = np.percentile(noisy, [0.5, 99.5])  # the preprocessing's window
    for value, level in ((st.csf, 0.3), (st.wm, 1.0), (st.gm, 1.3)):
        assert value == pytest.approx((level - lo) / (hi - lo), abs=0.01)
    assert st.gm_wm == pytest.approx((1.3 - lo) / (1.0 - lo), rel=0.02)
    assert st.noise == pytest.approx(0.02, rel=0.1)  # relative to the raw white-matter level
    assert st.wm_spread == pytest.approx(0.02 / (1.0 - lo), rel=0.15)
    assert st.bias < 0.005
    z = (np.arange(shape[2]) - 20.0)[None, None, :] / 20.0
    st2 = syn.flair_statistics(noisy * np.exp(0.05 * z), brain, (1.0, 1.0, 1.0))
    assert st2.bias == pytest.approx(0.05 * np.std(np.broadcast_to(z, shape)), rel=0.1)
    assert st.brain_ml == pytest.approx(np.prod(shape) / 1000)


def test_clinical_ms_lesions_sizes_and_sites():
    sub = syn.healthy_subject(3, shape=(96, 112, 96))  # 2 mm voxels
    spacing = np.array(sub.spacing)
    model = syn.MSLesions()
    sites = {"periventricular": syn.MSLesions(periventricular=1.0, juxtacortical=0.0),
             "juxtacortical": syn.MSLesions(periventricular=0.0, juxtacortical=1.0)}
    extents, contrast = [], []
    wm_level = np.median(sub.data[sub.wm > 0.9])
    for seed in range(12):
        data, labels = syn.add_anomalies(sub, seed, ("ms",), counts={"ms": 1}, ms_lesions=model)
        idx = np.argwhere(labels == syn.KIND_LABELS["ms"])
        assert len(idx), seed
        extents.append(((idx.max(0) - idx.min(0) + 1) * spacing).max())
        contrast.append(np.max(ndi.uniform_filter(data, 3)[labels > 0]) / wm_level)  # noise-averaged core
    assert min(extents) >= 3.0 - spacing.max() and max(extents) <= 15.0 + spacing.max(), extents
    # cores at 1.2-1.7 x white matter (the bias field moves the local level by a few percent)
    assert min(contrast) > 1.05 and max(contrast) < 1.85, contrast
    assert max(extents) > 10.0, "the clinical model reaches beyond the original 10 mm"
    vent = (sub.csf > 0.5) & (ndi.distance_transform_edt(sub.brain, sampling=spacing) > 15.0)
    cortex = (sub.gm > 0.5) & (ndi.distance_transform_edt(sub.brain, sampling=spacing) < 12.0)
    d_vent = ndi.distance_transform_edt(~vent, sampling=spacing)
    d_cortex = ndi.distance_transform_edt(~cortex, sampling=spacing)
    dist = {}
    for name, m in sites.items():
        _, labels = syn.add_anomalies(sub, 1, ("ms",), counts={"ms": 6}, ms_lesions=m)
        les = labels > 0
        dist[name] = np.median(d_vent[les]), np.median(d_cortex[les])
    assert dist["periventricular"][0] < 0.7 * dist["juxtacortical"][0], dist
    assert dist["juxtacortical"][1] < 0.5 * dist["periventricular"][1], dist


def test_healthy_randomised_datasets_have_no_lesions(tmp_path):
    paths = syn.write_dataset(tmp_path / "dr", 2, 1, 3, seed=1, shape=(48, 56, 48), kinds=("ms", "tumour", "foreign_patch"),
                              randomisation=syn.DomainRandomisation())
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["randomisation"] == json.loads(json.dumps(asdict(syn.DomainRandomisation())))
    assert manifest["ms_lesions"] == json.loads(json.dumps(asdict(syn.MSLesions())))
    # training volumes are the healthy subjects of their seeds, nothing inserted
    for entry, p in zip(manifest["train"], paths["train"]):
        sub = syn.healthy_subject(entry["seed"], shape=(48, 56, 48), randomisation=syn.DomainRandomisation())
        np.testing.assert_array_equal(np.asarray(nib.load(p).dataobj), sub.data)
        assert entry["randomisation"] == sub.params["randomisation"]
    for case, lab in zip(manifest["test"], paths["test_kinds"]):
        kinds = np.asarray(nib.load(lab).dataobj)
        assert set(np.unique(kinds)) == {0, syn.KIND_LABELS[case["anomaly_kinds"][0]]}


def test_synth_command_line_options(tmp_path, capsys):
    from training import synth

    common = ["--n-train", "1", "--n-val", "0", "--n-test", "1", "--n-test-healthy", "0", "--kinds", "ms"]
    grid = ["--shape", "48", "56", "48"]
    # about 2 mm slices, so that 4 mm thick ones are a real change
    assert synth.main(["--out", str(tmp_path / "dr"), *common, "--shape", "48", "56", "96", "--thick-slice-probability", "1",
                       "--slice-thickness", "4", "4", "--thick-grid"]) == 0
    manifest = json.loads((tmp_path / "dr" / "manifest.json").read_text())
    assert manifest["randomisation"]["thick_grid"] is True
    assert manifest["ms_lesions"] == json.loads(json.dumps(asdict(syn.MSLesions())))
    img = nib.load(tmp_path / "dr" / "train" / "healthy_000.nii.gz")
    assert img.header.get_zooms()[2] == pytest.approx(4.0)
    assert synth.main(["--out", str(tmp_path / "plain"), *common, *grid, "--no-domain-randomisation"]) == 0
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert manifest["randomisation"] is None
    assert manifest["ms_lesions"] == json.loads(json.dumps(asdict(syn.SAMPLE_MS_LESIONS)))
    plain = syn.healthy_subject(manifest["train"][0]["seed"], shape=(48, 56, 48))
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "plain" / "train" / "healthy_000.nii.gz").dataobj),
                                  plain.data)
    for bad, message in (
        (["--no-domain-randomisation", "--thick-grid"], "need domain randomisation"),
        (["--slice-thickness", "5", "2"], "MIN <= MAX"),
        (["--thick-slice-probability", "1.5"], r"in \[0, 1\]"),
    ):
        with pytest.raises(SystemExit) as exc:
            synth.main(["--out", str(tmp_path / "bad"), *common, *grid, *bad])
        assert exc.value.code == 2
        assert re.search(message, capsys.readouterr().err), bad


def test_periventricular_rim_brightens_only_the_ventricle_walls():
    plain = syn.healthy_subject(3, shape=(96, 112, 96), randomisation=QUIET)
    rim = syn.healthy_subject(3, shape=(96, 112, 96), randomisation=replace(QUIET, ventricle_rim=(0.3, 0.3)))
    inside = plain.data > 0
    ratio = rim.data[inside] / plain.data[inside]
    assert ratio.min() > 1 - 1e-5 and ratio.max() < 1.3 + 1e-4
    # a 1.5 mm band seen on 2 mm voxels: the first tissue voxel is about one voxel from the wall
    assert ratio.max() > 1 + 0.3 * np.exp(-((max(plain.spacing) / 1.5) ** 2)) - 0.01
    near_csf = ndi.distance_transform_edt(plain.csf < 0.5, sampling=plain.spacing) <= 4.0
    assert np.all(near_csf[inside][ratio > 1.01])


def test_randomisation_rejects_inverted_ranges():
    with pytest.raises(ValueError, match="noise: low 0.05 > high 0.01"):
        syn.healthy_subject(0, shape=SHAPE, randomisation=syn.DomainRandomisation(noise=(0.05, 0.01)))
    with pytest.raises(ValueError, match="exceeds the field of view"):
        syn.thick_slices(np.zeros((2, 2, 3), np.float32), 1.0, 4.0)
