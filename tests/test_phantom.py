"""Tests of the synthetic paired CT phantom (``data_prep.phantom``)."""

import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage
from skimage.registration import phase_cross_correlation

from data_prep import phantom
from data_prep.phantom import motion as motion_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(size=128, slices=12, slice_thickness=20.0, pixel_spacing=3.0)
MEDIUM = dict(size=256, slices=24, slice_thickness=10.0, pixel_spacing=1.5)

# Mean HU inside each label per phase: shared/REFERENCE.md section 3, widened for the per-case +-25% enhancement
# variation, partial volume and noise.
EXPECTED_HU = {
    'aorta': [(25, 55), (230, 420), (120, 260), (85, 150)],
    'portal_vein': [(25, 55), (95, 190), (120, 235), (80, 140)],
    'ivc': [(25, 55), (50, 100), (115, 220), (80, 140)],
    'liver': [(45, 75), (70, 105), (85, 125), (70, 100)],
    'spleen': [(35, 65), (80, 200), (100, 160), (75, 110)],
    'pancreas': [(30, 60), (85, 160), (60, 105), (55, 90)],
    'kidney_cortex': [(25, 55), (150, 290), (125, 215), (90, 155)],
    'kidney_medulla': [(25, 60), (60, 135), (105, 195), (90, 155)],
    'fat': [(-120, -80)] * 4,
    'muscle': [(35, 75)] * 4,
    'bowel_lumen_air': [(-1024, -900)] * 4,
}
NON_ENHANCING = ('fat', 'bone', 'lung', 'bowel_lumen_air', 'gallbladder')
ENHANCING = ('aorta', 'portal_vein', 'liver', 'spleen', 'kidney_cortex', 'kidney_medulla')


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp('phantom')
  folders = phantom.generate(out, cases=1, seed=3, preview=True, **SMALL)
  return out, folders[0], phantom.synthesize_case(0, 3, **SMALL)


@pytest.fixture(scope='module')
def medium_case():
  return phantom.synthesize_case(0, 11, **MEDIUM)


def _core_means(case, phase):
  """Mean HU per label over voxels whose 3x3x3 neighbourhood has the same label (away from partial volume)."""
  labels, hu = case.labels[phase], case.hu[phase].astype(np.float64)
  means = {}
  for name, i in case.label_names.items():
    core = ndimage.binary_erosion(labels == i, np.ones((3, 3, 3), bool))
    if core.sum() >= 20:
      means[name] = hu[core].mean()
  return means


def _read_sitk_series(folder):
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
  return reader.Execute()


def test_series_read_with_pydicom_and_simpleitk_with_matching_geometry(written):
  _, folder, case = written
  study_uids, series_uids = set(), set()
  for phase in phantom.PHASES:
    files = sorted((folder / phase).glob('*.dcm'))
    assert len(files) == SMALL['slices']
    datasets = [pydicom.dcmread(f) for f in files]
    assert all(ds.SOPClassUID == pydicom.uid.CTImageStorage for ds in datasets)
    positions = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert positions != sorted(positions) and positions != sorted(positions, reverse=True)  # names not in slice order
    datasets.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    np.testing.assert_array_equal(hu, case.hu[phase])
    np.testing.assert_allclose(np.diff([float(ds.ImagePositionPatient[2]) for ds in datasets]),
                               -SMALL['slice_thickness'])
    assert {tuple(map(float, ds.ImageOrientationPatient)) for ds in datasets} == {(1, 0, 0, 0, 1, 0)}
    study_uids |= {ds.StudyInstanceUID for ds in datasets} | {ds.FrameOfReferenceUID for ds in datasets}
    series_uids |= {ds.SeriesInstanceUID for ds in datasets}
    description = datasets[0].SeriesDescription
    assert {'non_contrast': 'NON-CONTRAST', 'arterial': 'ARTERIAL', 'portal': 'PORTAL VENOUS',
            'delayed': 'DELAYED'}[phase] in description
    assert ('ContrastBolusAgent' in datasets[0]) == (phase != 'non_contrast')
    assert datasets[0].RescaleIntercept in (-1024, 0) and datasets[0].RescaleSlope == 1
    for keyword in ('PatientName', 'PatientID', 'PatientBirthDate', 'AccessionNumber', 'InstitutionName',
                    'ReferringPhysicianName', 'StudyDate', 'SeriesDate'):
      assert str(datasets[0].data_element(keyword).value)

    image = _read_sitk_series(folder / phase)
    labels = sitk.ReadImage(str(folder / 'labels' / f'{phase}.nii.gz'))
    assert image.GetSize() == (SMALL['size'], SMALL['size'], SMALL['slices'])
    assert labels.GetSize() == image.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(labels.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), (3.0, 3.0, 20.0), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[::-1], case.hu[phase])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels)[::-1], case.labels[phase])
  assert len(study_uids) == 2 and len(series_uids) == 4
  names = json.loads((folder / 'labels.json').read_text())
  for required in ('body', 'fat', 'muscle', 'bone', 'aorta', 'ivc', 'portal_vein', 'hepatic_veins', 'liver', 'spleen',
                   'pancreas', 'kidney_cortex', 'kidney_medulla', 'collecting_system', 'ureter', 'bladder',
                   'bowel_wall', 'bowel_lumen_air', 'bowel_lumen_fluid'):
    assert required in names
  assert json.loads((folder / 'motion.json').read_text()) == case.motion


def test_acquisition_times_ordered_by_phase(written):
  _, folder, _ = written
  times = [pydicom.dcmread(next((folder / phase).glob('*.dcm'))).AcquisitionTime for phase in phantom.PHASES]
  assert times == sorted(times) and len(set(times)) == 4


@pytest.mark.parametrize('phase_index', range(4))
def test_mean_hu_inside_labels_in_expected_range(medium_case, phase_index):
  phase = phantom.PHASES[phase_index]
  means = _core_means(medium_case, phase)
  checked = 0
  for name, ranges in EXPECTED_HU.items():
    if name in means:
      low, high = ranges[phase_index]
      assert low <= means[name] <= high, (phase, name, means[name])
      checked += 1
  assert checked >= 9
  if phase == 'delayed':  # excreted contrast (small structures: the whole label, partial volume included)
    labels, hu = medium_case.labels[phase], medium_case.hu[phase]
    assert hu[labels == medium_case.label_names['collecting_system']].mean() > 250
    assert hu[labels == medium_case.label_names['bladder']].mean() > 100


def test_contrast_difference_concentrated_in_enhancing_organs(medium_case):
  reference = _core_means(medium_case, 'non_contrast')
  for phase in ('arterial', 'portal', 'delayed'):
    means = _core_means(medium_case, phase)
    for name in NON_ENHANCING:
      if name in means and name in reference:
        assert abs(means[name] - reference[name]) < 12, (phase, name)
    gains = [means[name] - reference[name] for name in ENHANCING if name in means and name in reference]
    assert len(gains) >= 4 and min(gains) > 15, (phase, gains)
  # Summed over voxels, most of the arterial and portal change sits in the enhancing organs and vessels (each
  # label's change read away from partial volume, where a voxel also holds some of its enhancing neighbour).
  enhancing = {'aorta', 'ivc', 'portal_vein', 'hepatic_veins', 'liver', 'spleen', 'pancreas', 'kidney_cortex',
               'kidney_medulla', 'bowel_wall'}
  for phase in ('arterial', 'portal'):
    labels, means = medium_case.labels[phase], _core_means(medium_case, phase)
    change = {name: abs(means[name] - reference[name]) * (labels == medium_case.label_names[name]).sum()
              for name in means if name in reference}
    share = sum(v for name, v in change.items() if name in enhancing) / sum(change.values())
    assert share > 0.6, (phase, share)  # seed 11: arterial 0.80, portal 0.70 (muscle's ~10 HU over its volume: 0.19)


def test_same_seed_same_bytes_and_different_seed_different_case(tmp_path):
  args = dict(cases=1, size=128, slices=6, slice_thickness=40.0, pixel_spacing=3.0)

  def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}

  phantom.generate(tmp_path / 'a', seed=5, **args)
  phantom.generate(tmp_path / 'b', seed=5, **args)
  phantom.generate(tmp_path / 'c', seed=6, **args)
  a, b, c = digest(tmp_path / 'a'), digest(tmp_path / 'b'), digest(tmp_path / 'c')
  assert a == b and len(a) == 4 * 6 + 4 + 2 + 1  # + the settings stamp .phantom.json
  assert a['case_0000/labels/arterial.nii.gz'] != c['case_0000/labels/arterial.nii.gz']
  assert set(a) != set(c)  # file names derive from the seed's UIDs
  del args['cases']
  assert not np.array_equal(phantom.synthesize_case(0, 5, **args).labels['portal'],
                            phantom.synthesize_case(0, 6, **args).labels['portal'])


def test_in_plane_shift_recoverable_by_phase_correlation(medium_case):
  case, size = medium_case, MEDIUM['size']
  z_ref = case.slice_z['non_contrast']
  k = len(z_ref) // 2
  reference = ndimage.binary_fill_holes(case.hu['non_contrast'][k] > -500).astype(np.float32)
  centre = ((size - 1) / 2, (size - 1) / 2)
  for phase in ('arterial', 'portal', 'delayed'):
    entry = case.motion['phases'][phase]
    k_c = int(np.argmin(np.abs(case.slice_z[phase] - z_ref[k])))
    moving = ndimage.binary_fill_holes(case.hu[phase][k_c] > -500).astype(np.float32)
    # Undo the recorded rotation about the centre; what is left is the shift R^T d.
    r = np.deg2rad(entry['rotation_deg'])
    c, s = np.cos(r), np.sin(r)
    rotation = np.array([[c, s], [-s, c]])  # acts on (column, row)
    inverse = rotation.T
    # ndimage.affine_transform maps output (row, col) -> input (row, col): input = R p_out(col,row) ...
    matrix_rc = np.array([[rotation[1, 1], rotation[1, 0]], [rotation[0, 1], rotation[0, 0]]])
    centre_rc = np.array(centre[::-1])
    derotated = ndimage.affine_transform(moving, matrix_rc, offset=centre_rc - matrix_rc @ centre_rc, order=1)
    expected = inverse @ np.array(entry['in_plane_shift_px'])  # (dx, dy)
    shift, _, _ = phase_cross_correlation(derotated, reference, upsample_factor=20, normalization=None)
    np.testing.assert_allclose(shift[::-1], expected, atol=0.5, err_msg=phase)


def test_labels_overlay_their_images(medium_case):
  case = medium_case
  ids = case.label_names
  means = _core_means(case, 'arterial')
  assert means['aorta'] > 200
  for phase in phantom.PHASES:
    body = np.stack([ndimage.binary_fill_holes(s > -500) for s in case.hu[phase]])
    labelled = case.labels[phase] > 0
    dice = 2 * (body & labelled).sum() / (body.sum() + labelled.sum())
    assert dice > 0.98, (phase, dice)
    # Bright voxels are bone or contrast-filled structures, not fat.
    fat = ndimage.binary_erosion(case.labels[phase] == ids['fat'], np.ones((1, 3, 3), bool))
    assert np.mean(case.hu[phase][fat] > 100) < 0.01


def test_motion_statistics_follow_the_spec():
  large = 0
  for seed in range(100):
    motions = motion_lib.sample_motion(np.random.default_rng([seed, 0, 1]))
    flagged = [m for m in motions.values() if m.large_misalignment]
    large += bool(flagged)
    for m in motions.values():
      magnitude = float(np.hypot(*m.shift_px))
      if m.large_misalignment:
        assert magnitude > 6
      else:
        assert magnitude <= 5
      assert abs(m.rotation_deg) <= 2
      resp = dict(m.respiratory_mm)
      assert abs(resp['liver']) <= 10
      assert resp['kidneys'] == pytest.approx(0.65 * resp['liver'], abs=1e-3)
  assert 10 <= large <= 32


def test_preview_png_written(written):
  out, _, _ = written
  image = Image.open(out / 'preview.png')
  assert image.size == (4 * SMALL['size'], 2 * SMALL['size'])
  assert np.asarray(image).std() > 10


def test_compressed_cases_read_back_losslessly(tmp_path):
  args = dict(size=128, slices=5, slice_thickness=48.0, pixel_spacing=3.0)
  folders = phantom.generate(tmp_path, cases=2, seed=2, compress=True, **args)
  syntaxes = []
  for index, folder in enumerate(folders):
    case = phantom.synthesize_case(index, 2, **args)
    datasets = sorted((pydicom.dcmread(f) for f in (folder / 'portal').glob('*.dcm')),
                      key=lambda ds: -float(ds.ImagePositionPatient[2]))
    syntaxes.append(datasets[0].file_meta.TransferSyntaxUID)
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    np.testing.assert_array_equal(hu, case.hu['portal'])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_read_sitk_series(folder / 'portal'))[::-1], case.hu['portal'])
  assert syntaxes == [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless]


@pytest.mark.parametrize('bad', [['--cases', '0'], ['--seed', '-1'], ['--size', '64'], ['--slice_thickness', '-2'],
                                 ['--pixel_spacing', 'abc']])
def test_invalid_arguments_exit_non_zero_with_message(tmp_path, bad):
  args = {'--out': str(tmp_path), '--cases': '1', '--seed': '0'}
  argv = [a for k, v in args.items() if k not in bad for a in (k, v)] + bad
  result = subprocess.run([sys.executable, '-m', 'data_prep.phantom', *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode != 0
  assert 'error' in result.stderr and 'Traceback' not in result.stderr
  assert not list(tmp_path.glob('case_*'))


def test_a_folder_with_another_phantom_is_refused_unless_overwrite(tmp_path, capsys):
  from data_prep.phantom import __main__ as cli

  args = ['--out', str(tmp_path / 'p'), '--seed', '0', '--size', '32', '--slices', '4', '--pixel_spacing', '12']
  assert cli.main(args + ['--cases', '3']) == 0
  assert cli.main(args + ['--cases', '3', '--quiet']) == 0  # the same phantom again: rewritten identically
  capsys.readouterr()
  assert cli.main(args + ['--cases', '2']) == 2
  err = capsys.readouterr().err
  assert 'cases 3 -> 2' in err and '--overwrite' in err and 'Traceback' not in err
  assert sorted(p.name for p in (tmp_path / 'p').iterdir() if not p.name.startswith('.')) == [
      'case_0000', 'case_0001', 'case_0002']
  assert cli.main(args + ['--cases', '2', '--overwrite']) == 0
  assert sorted(p.name for p in (tmp_path / 'p').iterdir() if not p.name.startswith('.')) == ['case_0000', 'case_0001']
  out = capsys.readouterr()
  assert 'phantom: 2/2 cases (100%)' in out.err and f"to {tmp_path / 'p'}" in out.out
  (tmp_path / 'q').mkdir()
  (tmp_path / 'q' / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not a phantom'):
    phantom.generate(tmp_path / 'q', cases=1, seed=0, size=32, slices=4, pixel_spacing=12.0, overwrite=True)



def test_motion_scale_zero_gives_aligned_pairs_and_keeps_everything_else():
  """`motion_scale=0`: every contrast series on the non-contrast grid and anatomy (labels equal voxel for voxel),
  the same anatomy, enhancement and noise draws otherwise; 1 (default) unchanged."""
  args = dict(size=64, slices=6, slice_thickness=20.0, pixel_spacing=6.0)
  moving = phantom.synthesize_case(1, 7, **args)
  still = phantom.synthesize_case(1, 7, **args, motion_scale=0.0)
  assert still.motion['motion_scale'] == 0.0 and 'motion_scale' not in moving.motion
  np.testing.assert_array_equal(still.labels['non_contrast'], moving.labels['non_contrast'])
  np.testing.assert_array_equal(still.hu['non_contrast'], moving.hu['non_contrast'])
  for phase in ('arterial', 'portal', 'delayed'):
    np.testing.assert_array_equal(still.labels[phase], still.labels['non_contrast'], err_msg=phase)
    np.testing.assert_array_equal(still.slice_z[phase], still.slice_z['non_contrast'])
    entry = still.motion['phases'][phase]
    assert entry['in_plane_shift_px'] == [0.0, 0.0] and entry['table_shift_mm'] == 0.0
    assert not entry['large_misalignment'] and entry['bowel_max_deformation_mm'] == 0.0
    assert not np.array_equal(moving.labels[phase], moving.labels['non_contrast'])   # the default does move
  # A half scale halves every recorded displacement.
  half = phantom.synthesize_case(1, 7, **args, motion_scale=0.5)
  for phase in ('arterial', 'portal', 'delayed'):
    full, scaled = moving.motion['phases'][phase], half.motion['phases'][phase]
    np.testing.assert_allclose(scaled['in_plane_shift_px'], np.multiply(full['in_plane_shift_px'], 0.5), atol=1e-4)
    assert scaled['respiratory_shift_mm']['liver'] == pytest.approx(full['respiratory_shift_mm']['liver'] / 2,
                                                                    abs=1e-4)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    phantom.synthesize_case(1, 7, **args, motion_scale=1.5)


def test_motion_scale_is_part_of_a_phantom_folders_settings(tmp_path):
  args = dict(size=64, slices=4, slice_thickness=20.0, pixel_spacing=6.0)
  phantom.generate(tmp_path, cases=1, seed=2, **args, motion_scale=0.0)
  motion = json.loads((tmp_path / 'case_0000' / 'motion.json').read_text())
  assert motion['motion_scale'] == 0.0
  with pytest.raises(FileExistsError, match='motion_scale 0.0 -> None'):
    phantom.generate(tmp_path, cases=1, seed=2, **args)


def _rendered(motion, size=64, pixel_spacing=6.0, seed=5):
  """One arterial series of a phantom anatomy (noise-free ideal HU and labels) with `motion`."""
  from data_prep.phantom import acquisition, anatomy, cases, enhancement  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  slice_z = -40.0 - 10.0 * np.arange(6)
  parts = anatomy.sample_anatomy(rng, float(slice_z[0]), 60.0)
  params = enhancement.sample_enhancement(rng)
  render_phase = cases._render_phase  # pylint: disable=protected-access
  labels, ideal = render_phase(parts, size, pixel_spacing, slice_z, motion, 'arterial', params)
  return labels, acquisition.partial_volume(ideal, pixel_spacing)


def test_coarse_series_average_each_pixel_so_a_sub_pixel_motion_can_be_undone():
  """A voxel holds the mean of its footprint (partial volume): a series moved by a fraction of a pixel, moved back
  by the exact inverse (bicubic), matches the unmoved one at the aorta's edge to a small fraction of its contrast.
  A point-sampled render flips whole edge pixels between blood and fat, which no resampling undoes."""
  import cv2  # pylint: disable=import-outside-toplevel
  from data_prep.phantom import anatomy, cases  # pylint: disable=import-outside-toplevel
  assert cases.supersampling(6.0) == 3 and cases.supersampling(0.75) == 1
  still_labels, still = _rendered(motion_lib.SeriesMotion())
  moved_labels, moved = _rendered(motion_lib.SeriesMotion(shift_px=(0.45, -0.3)))
  back = np.stack([cv2.warpAffine(s, np.float32([[1, 0, 0.45], [0, 1, -0.3]]), s.shape[::-1],
                                  flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
                   for s in moved])
  aorta = still_labels == anatomy.LABEL_IDS['aorta']
  assert aorta.sum() > 20 and not np.array_equal(still_labels, moved_labels)
  contrast = still[aorta].mean() - still[ndimage.binary_dilation(aorta, iterations=2) & ~aorta].mean()
  edge = ndimage.binary_dilation(aorta) & ~ndimage.binary_erosion(aorta)
  # Supersampled: 0.14 of the contrast at 6-mm pixels; point-sampled (no supersampling): 0.27.
  assert np.abs(back - still)[edge].mean() < 0.2 * contrast, (np.abs(back - still)[edge].mean(), contrast)
  # The labels stay the pixel centres' (a point-sampled render of the same anatomy, as before supersampling).
  fine_labels, _ = _rendered(motion_lib.SeriesMotion(), size=64 * 3, pixel_spacing=2.0)
  assert np.array_equal(still_labels, fine_labels[:, 1::3, 1::3])


def test_arterial_spleen_pattern_moves_with_the_spleen():
  """The spleen's arterial bands are fixed to the organ: a series shifted by whole pixels shows them shifted."""
  from data_prep.phantom import anatomy  # pylint: disable=import-outside-toplevel
  labels, hu = _rendered(motion_lib.SeriesMotion())
  labels2, hu2 = _rendered(motion_lib.SeriesMotion(shift_px=(2.0, 1.0)))
  spleen = ndimage.binary_erosion(labels == anatomy.LABEL_IDS['spleen'], np.ones((1, 3, 3), bool))
  assert spleen.sum() > 20 and hu[spleen].std() > 10   # the bands
  k, r, c = np.nonzero(spleen)
  np.testing.assert_allclose(hu2[k, r + 1, c + 2], hu[k, r, c], atol=1e-3)
