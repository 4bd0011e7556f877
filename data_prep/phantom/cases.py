"""Synthesises phantom cases in memory (:func:`synthesize_case`) and writes them as case folders (:func:`generate`).

A case is: one anatomy, rendered once per phase on that phase's own grid with that phase's motion, turned into
HU by the phase's enhancement, blurred (partial volume) and given its own noise.
"""

import dataclasses
import json
import pathlib
import re
import shutil

import numpy as np
from pydicom.uid import JPEG2000Lossless, RLELossless

from data_prep.phantom import acquisition, anatomy, dicom_writer, enhancement, identity, labels_io
from data_prep.phantom import motion as motion_lib
from data_prep.phantom import preview as preview_lib
from data_prep.phantom import render

PHASES = enhancement.PHASES
_STREAMS = {'anatomy': 0, 'motion': 1, 'enhancement': 2, 'identity': 3, 'scan': 4}
_NOISE_STREAM = 10
# Series with pixels larger than this (mm) are rendered on 3 x 3 sub-pixels per pixel (`supersampling`).
SUPERSAMPLE_ABOVE_MM = 1.0
MIN_SIZE = 16
MIN_SLICES = 4
# What a phantom folder was made with (hidden: the converter's scan skips it), so that writing into it again can
# tell the same phantom (rewritten identically) from another one (refused, or replaced with overwrite).
SETTINGS_FILE = '.phantom.json'
_CASE_FOLDER = re.compile(r'case_\d{4,}')


@dataclasses.dataclass
class Case:
  """One synthetic case in memory.

  Attributes:
    case_id: folder name, ``case_0000`` style.
    hu: per phase, int16 ``(S, H, W)`` HU (rows = posterior direction, slice 0 = most cranial).
    labels: per phase, uint8 ``(S, H, W)`` organ labels on the same grid as ``hu[phase]``.
    motion: the motion.json dict.
    label_names: the labels.json dict, name -> id.
    slice_z: per phase, float64 ``(S,)`` table position (ImagePositionPatient z) of each slice, mm.
    pixel_spacing: mm.
    slice_thickness: mm.
    identity: fake patient and study identifiers and the UID factory.
    rescale_intercept: -1024 or 0, how the DICOM files store the values.
    noise_sd: per phase, the noise SD drawn for that series.
  """
  case_id: str
  hu: dict
  labels: dict
  motion: dict
  label_names: dict
  slice_z: dict
  pixel_spacing: float
  slice_thickness: float
  identity: dict
  rescale_intercept: int
  noise_sd: dict


def _rng(seed: int, case_index: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(case_index), stream])


def check_geometry(size: int, slices: int, slice_thickness: float, pixel_spacing: float) -> None:
  """Raises ValueError with what to fix when the grid cannot hold the phantom."""
  if size < MIN_SIZE:
    raise ValueError(f'size must be at least {MIN_SIZE} pixels, got {size}')
  if slices < MIN_SLICES:
    raise ValueError(f'slices must be at least {MIN_SLICES}, got {slices}')
  if not slice_thickness > 0 or not pixel_spacing > 0:
    raise ValueError('slice_thickness and pixel_spacing must be positive')
  if size * pixel_spacing < anatomy.MIN_FIELD_OF_VIEW_MM:
    raise ValueError(
        f'field of view size * pixel_spacing = {size * pixel_spacing:g} mm is too small for the body; it must be at '
        f'least {anatomy.MIN_FIELD_OF_VIEW_MM:g} mm (e.g. --size 128 --pixel_spacing 3.0, or --size 512 '
        f'--pixel_spacing 0.75)')


def supersampling(pixel_spacing: float) -> int:
  """Sub-samples per pixel side with which a series of ``pixel_spacing`` mm pixels is rendered (odd, so that the
  middle sub-sample sits on the pixel's centre): 1 up to `SUPERSAMPLE_ABOVE_MM`, else 3."""
  return 1 if pixel_spacing <= SUPERSAMPLE_ABOVE_MM else 3


def _render_phase(parts, size: int, pixel_spacing: float, slice_z: np.ndarray, series_motion, phase: str,
                  params: dict) -> tuple[np.ndarray, np.ndarray]:
  """(labels uint8, ideal HU float32), each ``(S, size, size)``, of one series.

  A CT voxel's value is the mean over its footprint (partial volume), not the value at its centre: a point-sampled
  outline moved by a fraction of a pixel changes which pixels it covers, which no resampling of the moved image can
  undo (an aorta at 3-mm pixels kept 28 HU of mean error after its exact rigid motion was undone, RESULTS.md). So
  coarse series are rendered on `supersampling` x finer sub-pixels and their HU averaged over each pixel; the labels
  are the middle sub-samples, the pixel centres (what a point-sampled render gives).
  """
  k = supersampling(pixel_spacing)
  motion = series_motion.on_finer_grid(k)
  fine = render.render(parts, render.Grid(size * k, pixel_spacing / k, slice_z), motion, anatomy.LABEL_IDS)
  x_ref, y_ref = motion.reference_xy(size * k, pixel_spacing / k)
  ideal = enhancement.hu_volume(fine, phase, params, (x_ref, y_ref, motion.reference_z(slice_z, 'spleen')))
  if k == 1:
    return fine, ideal
  n = len(slice_z)
  return (np.ascontiguousarray(fine[:, k // 2::k, k // 2::k]),
          ideal.reshape(n, size, k, size, k).mean(axis=(2, 4), dtype=np.float32))


def synthesize_case(case_index: int, seed: int, size: int = 512, slices: int = 48, slice_thickness: float = 5.0,
                    pixel_spacing: float = 0.75, motion_scale: float = 1.0, noise: bool = True) -> Case:
  """The case ``case_index`` of the dataset drawn with ``seed``, in memory (same arguments, same arrays).

  ``motion_scale`` scales the patient's motion between the scans (`motion.sample_motion`): 1 (default) the phantom's
  breathing, table and in-plane motion; 0 contrast series on the non-contrast one's grid and anatomy, so that a pair
  differs only by enhancement and noise (a test set that measures what a model learned, not the pairs' misalignment).
  The anatomy, enhancement and noise draws do not depend on it.
  ``noise=False`` leaves the scanner noise out (``noise_sd`` then 0): the truth that benchmarks compare pairs with
  (`benchmarks/align_bench.py`); every other draw is the same.
  """
  check_geometry(size, slices, slice_thickness, pixel_spacing)
  scan_rng = _rng(seed, case_index, _STREAMS['scan'])
  top_z = round(float(scan_rng.uniform(-150.0, 50.0)), 1)
  rescale_intercept = -1024 if scan_rng.random() < 0.75 else 0
  parts = anatomy.sample_anatomy(_rng(seed, case_index, _STREAMS['anatomy']), top_z, slices * slice_thickness)
  motions = motion_lib.sample_motion(_rng(seed, case_index, _STREAMS['motion']), motion_scale)
  params = enhancement.sample_enhancement(_rng(seed, case_index, _STREAMS['enhancement']))
  hu, labels, slice_z, noise_sd = {}, {}, {}, {}
  for i, phase in enumerate(PHASES):
    series_motion = motions[phase]
    first = top_z + series_motion.slice_offset * slice_thickness
    slice_z[phase] = np.round(first - slice_thickness * np.arange(slices), 4)
    labels[phase], ideal = _render_phase(parts, size, pixel_spacing, slice_z[phase], series_motion, phase, params)
    blurred = acquisition.partial_volume(ideal, pixel_spacing)
    if noise:
      blurred, noise_sd[phase] = acquisition.add_noise(blurred, _rng(seed, case_index, _NOISE_STREAM + i),
                                                       pixel_spacing)
    else:
      noise_sd[phase] = 0.0
    hu[phase] = acquisition.quantise(blurred)
  body_2d = np.any(labels['non_contrast'] > 0, axis=0)
  motion_json = {
      'reference': 'non_contrast',
      'pixel_spacing_mm': pixel_spacing,
      'slice_thickness_mm': slice_thickness,
      'phases': {phase: motions[phase].to_json(body_2d, pixel_spacing) for phase in motion_lib.CONTRAST_PHASES},
  }
  if motion_scale != 1.0:
    motion_json['motion_scale'] = float(motion_scale)
  return Case(case_id=f'case_{case_index:04d}', hu=hu, labels=labels, motion=motion_json,
              label_names=dict(anatomy.LABEL_IDS), slice_z=slice_z, pixel_spacing=pixel_spacing,
              slice_thickness=slice_thickness, identity=identity.sample_identity(
                  _rng(seed, case_index, _STREAMS['identity']), seed, case_index),
              rescale_intercept=rescale_intercept, noise_sd=noise_sd)


def transfer_syntax_for(case_index: int, compress: bool):
  """With ``compress``, cases alternate RLE Lossless, JPEG 2000 Lossless and uncompressed; else uncompressed."""
  if not compress:
    return None
  return (RLELossless, JPEG2000Lossless, None)[case_index % 3]


def write_case(case: Case, case_dir: pathlib.Path, transfer_syntax=None) -> None:
  """Writes the case folder: four DICOM series, label volumes, labels.json and motion.json."""
  for phase in PHASES:
    dicom_writer.write_series(case_dir / phase, phase, case.hu[phase], case.slice_z[phase], case.pixel_spacing,
                              case.slice_thickness, case.identity, case.rescale_intercept, transfer_syntax)
    labels_io.write_label_volume(case_dir / 'labels' / f'{phase}.nii.gz', case.labels[phase], case.slice_z[phase],
                                 case.pixel_spacing)
  labels_io.write_json(case_dir / 'labels.json', case.label_names)
  labels_io.write_json(case_dir / 'motion.json', case.motion)


def generate(out_dir, cases: int, seed: int, size: int = 512, slices: int = 48, slice_thickness: float = 5.0,
             pixel_spacing: float = 0.75, compress: bool = False, preview: bool = False, overwrite: bool = False,
             progress=None, motion_scale: float = 1.0) -> list[pathlib.Path]:
  """Writes ``cases`` case folders under ``out_dir`` (and ``preview.png`` of the first case with ``preview``).

  Args:
    motion_scale: the patient's motion between the scans, scaled (`synthesize_case`; 0: aligned pairs).
    overwrite: replace the cases of an earlier phantom made with other settings in ``out_dir`` (else refused).
    progress: called as ``progress(cases done)`` after each case.

  Returns:
    The case folders, in case order.

  Raises:
    ValueError: invalid settings.
    FileExistsError: ``out_dir`` holds another phantom (without ``overwrite``) or files that are not a phantom's.
  """
  if cases < 1:
    raise ValueError(f'cases must be at least 1, got {cases}')
  if seed < 0:
    raise ValueError(f'seed must be non-negative, got {seed}')
  check_geometry(size, slices, slice_thickness, pixel_spacing)
  out_dir = pathlib.Path(out_dir)
  settings = {'cases': cases, 'seed': seed, 'size': size, 'slices': slices, 'slice_thickness': slice_thickness,
              'pixel_spacing': pixel_spacing, 'compress': compress}
  if motion_scale != 1.0:
    if not 0.0 <= motion_scale <= 1.0:
      raise ValueError(f'motion_scale must be in [0, 1], got {motion_scale}')
    settings['motion_scale'] = float(motion_scale)
  _clear_for(out_dir, settings, overwrite)
  out_dir.mkdir(parents=True, exist_ok=True)
  folders = []
  for index in range(cases):
    case = synthesize_case(index, seed, size, slices, slice_thickness, pixel_spacing, motion_scale)
    folder = out_dir / case.case_id
    write_case(case, folder, transfer_syntax_for(index, compress))
    if preview and index == 0:
      preview_lib.write_preview(out_dir / 'preview.png', case.hu)
    folders.append(folder)
    if progress is not None:
      progress(index + 1)
  (out_dir / SETTINGS_FILE).write_text(json.dumps(settings))
  return folders


def _clear_for(out_dir: pathlib.Path, settings: dict, overwrite: bool) -> None:
  """Makes ``out_dir`` ready for the phantom of ``settings``: nothing to do when it is new, empty, or holds the same
  phantom; an earlier phantom with other settings is refused, or removed with ``overwrite``."""
  if not out_dir.exists():
    return
  if not out_dir.is_dir():
    raise FileExistsError(f'{out_dir} is a file: choose a folder for the phantom')
  entries = list(out_dir.iterdir())
  ours = [p for p in entries if (p.is_dir() and _CASE_FOLDER.fullmatch(p.name)) or p.name in ('preview.png',
                                                                                                  SETTINGS_FILE)]
  foreign = sorted(p.name for p in entries if p not in ours)
  if foreign:
    raise FileExistsError(f'{out_dir} holds files that are not a phantom\'s ({", ".join(foreign[:3])}'
                          f'{", ..." if len(foreign) > 3 else ""}): choose a new or empty folder')
  if not ours:
    return
  stamp = out_dir / SETTINGS_FILE
  old = json.loads(stamp.read_text()) if stamp.exists() else None
  if old == json.loads(json.dumps(settings)):
    return  # the same phantom: rewritten byte for byte
  if not overwrite:
    what = ('phantom cases of unknown settings' if old is None else 'a phantom made with other settings (' +
            ', '.join(f'{k} {old.get(k)} -> {settings.get(k)}' for k in {**old, **settings}
                      if old.get(k) != settings.get(k)) + ')')
    raise FileExistsError(f'{out_dir} already holds {what}: pass --overwrite to replace them, or choose another '
                          'folder')
  for path in ours:
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink()
