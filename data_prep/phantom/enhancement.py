"""Contrast enhancement: HU of every label in every phase, varied per case, with the phase-specific patterns.

Mean values follow ``shared/REFERENCE.md`` §3. The enhancement (contrast minus unenhanced HU) of a case is
scaled by a dose factor drawn in [0.78, 1.22] and a per-phase timing factor in [0.93, 1.07], so a case's
values move by about ±25% around the reference means. Patterns: a "zebra" spleen and corticomedullary
kidneys in the arterial phase, nephrographic kidneys in the portal phase, and excreted contrast in the
collecting systems, ureters and (layering) bladder in the delayed phase.
"""

import numpy as np

from data_prep.phantom.anatomy import LABEL_IDS, LABEL_NAMES

PHASES = ('non_contrast', 'arterial', 'portal', 'delayed')

# Mean HU per label: (non-contrast, arterial, portal venous, delayed).
MEAN_HU = {
    'background': (-1000, -1000, -1000, -1000),
    'body': (40, 44, 50, 47),  # skin, discs, spinal canal and other soft tissue
    'fat': (-100, -100, -100, -100),
    'muscle': (50, 54, 60, 57),
    'psoas': (50, 54, 60, 57),
    'bone': (700, 700, 700, 700),  # cortical
    'cancellous_bone': (200, 210, 215, 210),
    'lung': (-870, -870, -870, -870),
    'aorta': (38, 325, 190, 115),
    'ivc': (38, 75, 170, 110),
    'portal_vein': (38, 145, 180, 110),
    'hepatic_veins': (38, 70, 170, 110),
    'liver': (60, 85, 105, 85),
    'gallbladder': (10, 10, 10, 10),
    'spleen': (50, 140, 130, 95),
    'pancreas': (45, 120, 85, 70),
    'kidney_cortex': (40, 225, 172, 122),
    'kidney_medulla': (40, 90, 150, 122),
    'collecting_system': (12, 12, 20, 700),
    'ureter': (15, 15, 20, 450),
    'bladder': (12, 12, 12, 12),  # the delayed phase layers contrast, see below
    'bowel_wall': (40, 120, 110, 80),
    'bowel_lumen_air': (-1000, -1000, -1000, -1000),
    'bowel_lumen_fluid': (10, 10, 10, 10),
}
ENHANCING = ('aorta', 'ivc', 'portal_vein', 'hepatic_veins', 'liver', 'spleen', 'pancreas', 'kidney_cortex',
             'kidney_medulla', 'collecting_system', 'ureter', 'bladder', 'bowel_wall')
DOSE_RANGE = (0.78, 1.22)
TIMING_RANGE = (0.93, 1.07)
BLADDER_CONTRAST_HU = 600.0
ZEBRA_AMPLITUDE_HU = 55.0
ZEBRA_Z_MM = 5.0  # the bands turn by one radian per this many mm along z


def sample_enhancement(rng: np.random.Generator) -> dict:
  """A case's enhancement parameters: per-phase factors and small per-organ offsets of the unenhanced HU."""
  dose = rng.uniform(*DOSE_RANGE)
  return {
      'factor': {phase: (1.0 if phase == 'non_contrast' else dose * rng.uniform(*TIMING_RANGE)) for phase in PHASES},
      'offset': {name: float(rng.uniform(-4, 4)) for name in LABEL_NAMES},
      'zebra': (rng.uniform(0, np.pi), rng.uniform(9, 14), rng.uniform(0, 2 * np.pi)),
      'bladder_fill': rng.uniform(0.3, 0.7),
  }


def lookup_table(phase: str, params: dict) -> np.ndarray:
  """HU of each label id in ``phase``: float32 ``(256,)``."""
  column = PHASES.index(phase)
  lut = np.full(256, -1000, np.float32)
  for name, values in MEAN_HU.items():
    base = values[0] + (params['offset'][name] if values[0] > -500 else 0.0)
    lut[LABEL_IDS[name]] = base + (values[column] - values[0]) * params['factor'][phase]
  return lut


def hu_volume(labels: np.ndarray, phase: str, params: dict, spleen_xyz: tuple) -> np.ndarray:
  """Noise-free HU of a label volume ``(S, H, W)`` uint8 in ``phase``: float32 of the same shape.

  ``spleen_xyz``: ``(x (H, W), y (H, W), z (S,))``, the reference-frame millimetres at which each voxel sees the
  spleen (`motion.SeriesMotion.reference_xy`, `reference_z`), so that its arterial pattern moves with it.
  """
  hu = lookup_table(phase, params)[labels]
  if phase == 'arterial':
    _zebra_spleen(hu, labels, params, spleen_xyz)
  if phase == 'delayed':
    _layered_bladder(hu, labels, params)
  return hu


def _zebra_spleen(hu, labels, params, spleen_xyz):
  """Arterial-phase spleen: wavy alternating bands around the phase's mean, fixed to the organ (they move with it)."""
  k, r, c = np.nonzero(labels == LABEL_IDS['spleen'])
  if k.size == 0:
    return
  angle, wavelength, phase0 = params['zebra']
  x_ref, y_ref, z_ref = spleen_xyz
  x, y = x_ref[r, c].astype(np.float64), y_ref[r, c].astype(np.float64)
  along = x * np.cos(angle) + y * np.sin(angle) + 6 * np.sin(2 * np.pi * (y * np.cos(angle) - x * np.sin(angle)) / 40)
  bands = np.sin(2 * np.pi * along / wavelength + phase0 + np.asarray(z_ref, np.float64)[k] / ZEBRA_Z_MM)
  hu[k, r, c] += (ZEBRA_AMPLITUDE_HU * params['factor']['arterial'] * bands).astype(np.float32)


def _layered_bladder(hu, labels, params):
  """Delayed-phase bladder: excreted contrast settles in the dependent (posterior) part."""
  k, r, c = np.nonzero(labels == LABEL_IDS['bladder'])
  if k.size == 0:
    return
  level = np.quantile(r, 1 - params['bladder_fill'])
  hu[k[r >= level], r[r >= level], c[r >= level]] = BLADDER_CONTRAST_HU * params['factor']['delayed']
