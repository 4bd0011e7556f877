"""Patient motion between the non-contrast scan and each contrast scan, and its bookkeeping.

Conventions (``docs/data_contracts.md`` §1): the in-plane rigid motion maps a pixel ``p = (column, row)`` of the
non-contrast series to ``R(r) (p - centre) + centre + (dx, dy)`` in the contrast series, with
``R = [[cos, sin], [-sin, cos]]`` (counter-clockwise as displayed). ``table_shift_mm`` moves the whole patient
towards the head; ``respiratory_shift_mm`` moves the liver, spleen and kidneys towards the feet on top of it.
The bowel gets a smooth local displacement field. Rendering needs the inverse maps, which live here as well.
"""

import dataclasses

import numpy as np

CONTRAST_PHASES = ('arterial', 'portal', 'delayed')
RESPIRATORY_GROUPS = ('liver', 'spleen', 'kidneys')
KIDNEY_FACTOR = 0.65  # kidneys move about 0.6-0.7x the diaphragm
LARGE_SHIFT_PX = (7.0, 10.0)  # the converter drops pairs misaligned by more than 6 px
CONVERTER_LIMIT_PX = 6.0
SMALL_SHIFT_PX = 5.0
MAX_ROTATION_DEG = 2.0
LARGE_MISALIGNMENT_RATE = 0.2


@dataclasses.dataclass(frozen=True)
class SeriesMotion:
  """The motion of one series relative to the non-contrast reference.

  Attributes:
    shift_px: in-plane translation (dx, dy) in pixels of the written series.
    rotation_deg: in-plane rotation, counter-clockwise as displayed.
    table_shift_mm: rigid craniocaudal shift of the patient, positive towards the head.
    respiratory_mm: extra shift of each respiratory group, positive towards the feet.
    bowel_amplitude_mm: amplitudes (ax, ay) of the smooth bowel displacement field.
    bowel_phases: four phases (radians) of that field.
    bowel_wavelength_mm: in-plane and craniocaudal wavelengths of that field.
    slice_offset: first slice of this series, in slices, relative to the reference (positive = cranial).
  """
  shift_px: tuple[float, float] = (0.0, 0.0)
  rotation_deg: float = 0.0
  table_shift_mm: float = 0.0
  respiratory_mm: tuple[tuple[str, float], ...] = tuple((g, 0.0) for g in RESPIRATORY_GROUPS)
  bowel_amplitude_mm: tuple[float, float] = (0.0, 0.0)
  bowel_phases: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
  bowel_wavelength_mm: tuple[float, float] = (120.0, 90.0)
  slice_offset: int = 0
  large_misalignment: bool = False

  def reference_xy(self, size: int, pixel_spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference-frame millimetres (x, y) seen by every pixel of this series, each ``(size, size)`` float32.

    Inverts the rigid map: ``p = R^T (p' - centre - d) + centre``; millimetres are relative to the image centre.
    """
    centre = (size - 1) / 2
    grid = np.arange(size, dtype=np.float64) - centre
    u = grid[None, :] - self.shift_px[0]
    v = grid[:, None] - self.shift_px[1]
    r = np.deg2rad(self.rotation_deg)
    c, s = np.cos(r), np.sin(r)
    x = (c * u - s * v) * pixel_spacing
    y = (s * u + c * v) * pixel_spacing
    return x.astype(np.float32), y.astype(np.float32)

  def forward_px(self, col, row, size: int):
    """Where reference pixel(s) ``(col, row)`` land in this series."""
    centre = (size - 1) / 2
    r = np.deg2rad(self.rotation_deg)
    c, s = np.cos(r), np.sin(r)
    u, v = np.asarray(col, float) - centre, np.asarray(row, float) - centre
    return c * u + s * v + centre + self.shift_px[0], -s * u + c * v + centre + self.shift_px[1]

  def reference_z(self, z: np.ndarray, group: str) -> np.ndarray:
    """Reference-frame z of this series' slices ``z`` for the anatomy of ``group``."""
    resp = dict(self.respiratory_mm).get(group, 0.0)
    return z - self.table_shift_mm + resp

  def bowel_offset(self, x, y, z):
    """Displacement (ux, uy) in mm of the bowel at reference point(s) (x, y, z); broadcasts."""
    ax, ay = self.bowel_amplitude_mm
    if not ax and not ay:
      return np.float32(0), np.float32(0)
    k = np.float32(2 * np.pi / self.bowel_wavelength_mm[0])
    kz = np.float32(2 * np.pi / self.bowel_wavelength_mm[1])
    f = self.bowel_phases
    ux = np.float32(ax) * np.sin(k * y + f[0]) * np.sin(kz * z + f[1])
    uy = np.float32(ay) * np.sin(k * x + f[2]) * np.sin(kz * z + f[3])
    return ux, uy

  def scaled(self, scale: float) -> 'SeriesMotion':
    """This motion with every displacement times ``scale`` (0: the series lies exactly where the reference does; 1:
    unchanged). The slice offset is rounded to whole slices (half rounds to even: +-1 slice x 0.5 is 0), and a series
    stays flagged as largely misaligned only while its scaled in-plane shift is still above 6 px (the converter's limit)."""
    if scale == 1.0:
      return self
    times = lambda v: round(float(v) * scale, 4)  # rounded as motion.json records them  # noqa: E731
    shift = (times(self.shift_px[0]), times(self.shift_px[1]))
    return dataclasses.replace(
        self, shift_px=shift, rotation_deg=times(self.rotation_deg), table_shift_mm=times(self.table_shift_mm),
        respiratory_mm=tuple((g, times(v)) for g, v in self.respiratory_mm),
        bowel_amplitude_mm=(times(self.bowel_amplitude_mm[0]), times(self.bowel_amplitude_mm[1])),
        slice_offset=int(round(self.slice_offset * scale)),
        large_misalignment=self.large_misalignment and float(np.hypot(*shift)) > CONVERTER_LIMIT_PX)

  def on_finer_grid(self, factor: int) -> 'SeriesMotion':
    """This motion for a grid with ``factor`` x as many pixels per side over the same field of view (the in-plane
    shift is in pixels; every other quantity is in mm or degrees, or a flag)."""
    if factor == 1:
      return self
    return dataclasses.replace(self, shift_px=(self.shift_px[0] * factor, self.shift_px[1] * factor))

  def max_displacement_px(self, body_mask_2d: np.ndarray) -> float:
    """Largest displacement of any body pixel under the rigid in-plane motion."""
    rows, cols = np.nonzero(body_mask_2d)
    if rows.size == 0:
      return float(np.hypot(*self.shift_px))
    size = body_mask_2d.shape[0]
    c2, r2 = self.forward_px(cols, rows, size)
    return float(np.max(np.hypot(c2 - cols, r2 - rows)))

  def to_json(self, body_mask_2d: np.ndarray, pixel_spacing: float) -> dict:
    """The motion.json entry of this series."""
    resp = dict(self.respiratory_mm)
    return {
        'in_plane_shift_px': [round(float(self.shift_px[0]), 4), round(float(self.shift_px[1]), 4)],
        'rotation_deg': round(float(self.rotation_deg), 4),
        'table_shift_mm': round(float(self.table_shift_mm), 4),
        'respiratory_shift_mm': {g: round(float(resp[g]), 4) for g in RESPIRATORY_GROUPS},
        'bowel_max_deformation_mm': round(float(np.hypot(*self.bowel_amplitude_mm)), 4),
        'max_in_plane_displacement_px': round(self.max_displacement_px(body_mask_2d), 4),
        'large_misalignment': bool(self.large_misalignment),
    }


def sample_motion(rng: np.random.Generator, scale: float = 1.0) -> dict[str, SeriesMotion]:
  """Draws the motion of each contrast series of one case (the values are rounded as motion.json records them).

  About one case in five gets one contrast series with an in-plane shift above 6 px. With ``scale`` (in [0, 1]) the
  same draws are scaled (`SeriesMotion.scaled`): 0 gives contrast series aligned with the non-contrast one, pairs
  that differ only by their enhancement and noise.
  """
  if not 0.0 <= scale <= 1.0:
    raise ValueError(f'motion scale must be in [0, 1], got {scale}')
  large_phase = rng.choice(CONTRAST_PHASES) if rng.random() < LARGE_MISALIGNMENT_RATE else None
  motions = {'non_contrast': SeriesMotion()}
  for phase in CONTRAST_PHASES:
    large = phase == large_phase
    magnitude = rng.uniform(*LARGE_SHIFT_PX) if large else SMALL_SHIFT_PX * np.sqrt(rng.random())
    direction = rng.uniform(0, 2 * np.pi)
    liver = rng.uniform(0, 10) * rng.choice([-1.0, 1.0])
    motions[phase] = SeriesMotion(
        shift_px=(round(magnitude * np.cos(direction), 4), round(magnitude * np.sin(direction), 4)),
        rotation_deg=round(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG), 4),
        table_shift_mm=round(rng.uniform(-4, 4), 4),
        respiratory_mm=(('liver', round(liver, 4)), ('spleen', round(liver * rng.uniform(0.8, 1.0), 4)),
                        ('kidneys', round(KIDNEY_FACTOR * liver, 4))),
        bowel_amplitude_mm=(round(rng.uniform(1, 4), 4), round(rng.uniform(1, 4), 4)),
        bowel_phases=tuple(float(round(v, 4)) for v in rng.uniform(0, 2 * np.pi, 4)),
        slice_offset=int(rng.choice([-1, 0, 0, 1])),
        large_misalignment=large).scaled(scale)
  return motions
