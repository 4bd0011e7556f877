"""The phantom's abdominal anatomy: label names and one case's organs as smooth, randomly varied solids.

Coordinates are reference-frame patient millimetres (x to the patient's left, y to the back, z to the head).
Craniocaudal landmarks are placed on a normalised axis ``s`` (0 near the liver dome, 1 at the pelvic floor)
that is stretched over the scanned length, so that every case covers liver dome to pelvis whatever the
number of slices.
"""

import dataclasses

import numpy as np

from data_prep.phantom import shapes
from data_prep.phantom.render import Part

LABEL_NAMES = (
    'background', 'body', 'fat', 'muscle', 'bone', 'cancellous_bone', 'lung', 'aorta', 'ivc', 'portal_vein',
    'hepatic_veins', 'liver', 'gallbladder', 'spleen', 'pancreas', 'kidney_cortex', 'kidney_medulla',
    'collecting_system', 'ureter', 'bladder', 'bowel_wall', 'bowel_lumen_air', 'bowel_lumen_fluid', 'psoas')
LABEL_IDS = {name: i for i, name in enumerate(LABEL_NAMES)}
BOWEL_OVER = ('fat', 'bowel_wall', 'bowel_lumen_air', 'bowel_lumen_fluid')

MIN_FIELD_OF_VIEW_MM = 360.0  # the widest body (about 346 mm) must fit in size * pixel_spacing


@dataclasses.dataclass(frozen=True)
class Extent:
  """Where the scan lies on the anatomy: ``z(s) = z_s0 - s * length`` (mm)."""
  z_s0: float
  length: float

  def z(self, s: float) -> float:
    return self.z_s0 - s * self.length


def sample_anatomy(rng: np.random.Generator, scan_top_z: float, scan_length: float) -> list[Part]:
  """One case's anatomy as an ordered list of parts (later parts are painted over earlier ones).

  Args:
    rng: the case's anatomy stream.
    scan_top_z: table position (mm) of the first (most cranial) slice of the reference series.
    scan_length: slices * slice thickness of the reference series (mm).
  """
  u = rng.uniform
  s_top = u(-0.02, 0.03)
  length = scan_length / u(0.93, 1.0)
  ext = Extent(scan_top_z + s_top * length, length)
  z = ext.z

  def wobble(scale):
    return tuple(u(-scale, scale, 8))

  # Body wall: skin, subcutaneous fat, muscle; visceral fat inside.
  size = u(0.86, 1.08)
  body_a, body_b = 158 * size, 114 * size * u(0.92, 1.04)
  body_cy = -8.0
  fat = u(8, 30) * size
  wall = u(6, 10)
  body = shapes.Blob(0.0, body_cy, z(0.5), 0.75 * length, body_a, body_b, p=12, taper=u(-0.08, 0.04),
                     square=u(0.15, 0.35), harmonics=(0, u(-0.05, 0.0), u(0.0, 0.04), 0) + wobble(0.03))
  parts = [Part('body', body, inner=((2.5, 'fat'), (2.5 + fat, 'muscle'), (2.5 + fat + wall, 'fat')))]
  ca, cb = body_a - fat - wall, body_b - fat - wall  # cavity semi-axes
  y_post = body_cy + body_b

  # Spine and the muscles around it.
  r_vb = 19 * size
  y_vb = y_post - fat - 62 * size
  y_canal = y_vb + r_vb + 9
  spine_z, spine_h = z(0.45), 0.9 * length
  for side in (-1, 1):
    parts.append(Part('muscle', shapes.Blob(side * 30 * size, y_canal + 17, spine_z, spine_h, 26 * size, 20 * size,
                                            p=12, harmonics=wobble(0.05))))
    psoas = shapes.Blob(side * (r_vb + 10), y_vb - 2, z(0.73), 0.36 * length, 20 * size, 17 * size, p=3,
                        taper=-0.55, drift=(-side * 14, 12), harmonics=wobble(0.05))
    parts.append(Part('psoas', psoas))
  column = shapes.Blob(0.0, y_vb, spine_z, spine_h, r_vb * 1.1, r_vb * 0.9, p=12, harmonics=wobble(0.03))
  parts.append(Part('bone', column, inner=((2.5, 'cancellous_bone'),)))
  pitch = 34 / 380 * length
  parts.append(Part('body', shapes.Periodic(column, pitch, 0.26 * pitch, u(0, pitch))))
  parts.append(Part('bone', shapes.Blob(0.0, y_canal, spine_z, spine_h, 15, 13, p=12), inner=((3.5, 'body'),)))
  parts.append(Part('bone', shapes.Blob(0.0, y_canal + 22, spine_z, spine_h, 4.5, 15, p=12),
                    inner=((1.5, 'cancellous_bone'),)))
  parts += [Part('bone', shapes.Blob(side * 22, y_canal + 2, spine_z, spine_h, 14, 4.5, p=12)) for side in (-1, 1)]

  # Lung bases behind the liver dome, then the ribs.
  for side in (-1, 1):
    parts.append(Part('lung', shapes.Blob(side * 0.55 * ca, body_cy + 0.38 * cb, z(-0.1), 0.19 * length, 0.3 * ca,
                                          0.4 * cb, harmonics=wobble(0.06)), over=('fat',)))
  parts.append(Part('bone', shapes.RibCage(body, depth_mm=fat + 2.5 + 0.5 * wall, thickness=9.0, z_low=z(0.36),
                                           z_high=z(-0.1), count=int(rng.integers(12, 16)), phase=u(0, 6.3),
                                           twist=2 * np.pi / (14 * 45)), inner=((1.8, 'cancellous_bone'),)))

  # Pelvis: iliac wings with the iliacus and gluteal muscles.
  for side in (-1, 1):
    wing = dict(cx=side * 0.55 * ca, zc=z(0.84), hz=0.12 * length, angle=-side * u(0.45, 0.7), p=3)
    parts.append(Part('muscle', shapes.Blob(cy=y_vb - 14, a=0.33 * ca, b=15, **wing)))
    parts.append(Part('muscle', shapes.Blob(side * 0.62 * ca, y_post - fat - 28, z(0.9), 0.12 * length, 0.3 * ca,
                                            24, p=3)))
    parts.append(Part('bone', shapes.Blob(cy=y_vb + 6, a=0.36 * ca, b=8, **wing), inner=((2.5, 'cancellous_bone'),)))

  # Kidneys (the right one lower), with sinus fat and collecting system.
  kidneys = {}
  for side in (-1, 1):
    s_k = u(0.36, 0.41) + (0.03 if side < 0 else 0.0)
    k = dict(cx=side * u(0.47, 0.53) * ca, cy=y_vb + u(0, 10), zc=z(s_k), hz=u(0.09, 0.11) * length)
    a, b = u(24, 29) * size, u(19, 23) * size
    angle = side * u(0.4, 0.7)
    parts.append(Part('kidney_cortex', shapes.Blob(a=a, b=b, angle=angle, harmonics=wobble(0.05), **k),
                      group='kidneys', inner=((u(6, 8), 'kidney_medulla'),)))
    hilum = (k['cx'] - side * 0.45 * a, k['cy'] - 0.25 * b, k['zc'])
    sinus = dict(cx=k['cx'] - side * 0.3 * a, cy=k['cy'] - 0.15 * b, zc=k['zc'], angle=angle)
    parts.append(Part('fat', shapes.Blob(a=0.42 * a, b=0.5 * b, hz=0.6 * k['hz'], **sinus), group='kidneys'))
    parts.append(Part('collecting_system', shapes.Blob(a=0.26 * a, b=0.32 * b, hz=0.45 * k['hz'], **sinus),
                      group='kidneys'))
    kidneys[side] = hilum, s_k

  # Liver (right and left lobes), gallbladder, spleen, pancreas.
  liver_hz = u(0.17, 0.2) * length
  parts.append(Part('liver', shapes.Blob(-0.4 * ca, body_cy - 0.05 * cb, z(0.03) - liver_hz, liver_hz,
                                         0.56 * ca * u(0.92, 1.05), 0.8 * cb * u(0.92, 1.02), p=2.4, taper=0.25,
                                         drift=(12, 0), harmonics=wobble(0.07)), group='liver'))
  parts.append(Part('liver', shapes.Blob(0.08 * ca, body_cy - 0.42 * cb, z(0.15), 0.1 * length, 0.42 * ca,
                                         0.3 * cb, angle=u(-0.2, 0.1), harmonics=wobble(0.06)), group='liver'))
  parts.append(Part('gallbladder', shapes.Blob(-0.38 * ca, body_cy - 0.48 * cb, z(0.3), 0.06 * length, 13, 19,
                                               angle=0.5), group='liver'))
  spleen = shapes.Blob(0.66 * ca, body_cy + 0.42 * cb, z(u(0.15, 0.2)), u(0.1, 0.13) * length, 0.17 * ca * u(0.85, 1.1),
                       0.42 * cb * u(0.85, 1.1), angle=-u(0.5, 0.8), harmonics=wobble(0.06))
  parts.append(Part('spleen', spleen, group='spleen'))
  y_ant_vessels = y_vb - r_vb
  conf = (-6.0, y_ant_vessels - 32, z(0.33))  # portal confluence, behind the pancreatic neck
  pancreas = [(-0.28 * ca, y_ant_vessels - 30, z(0.37)), (-0.05 * ca, conf[1] - 12, z(0.33)),
              (0.3 * ca, y_ant_vessels - 28, z(0.3)), (0.52 * ca, body_cy + 0.3 * cb, z(0.27))]
  parts.append(Part('pancreas', shapes.Union(tuple(shapes.chain(pancreas, [15, 11, 10, 8])))))

  # Bowel: stomach, duodenum, colon and small-bowel loops (walls, air and fluid).
  def bowel(shape, wall_mm, air_fraction):
    level = None
    if air_fraction > 0:
      box = shape.box(0)
      level = box[2] + air_fraction * (box[3] - box[2])
    label = 'bowel_lumen_air' if air_fraction >= 1 else 'bowel_lumen_fluid'
    return Part('bowel_wall', shape, group='bowel', inner=((wall_mm, label),),
                fluid_level_y=None if air_fraction >= 1 or level is None else level, over=BOWEL_OVER + ('liver',))

  stomach = shapes.Blob(0.32 * ca, body_cy - 0.3 * cb, z(0.18), 0.11 * length, 0.3 * ca, 0.3 * cb,
                        angle=0.4, harmonics=wobble(0.08))
  parts.append(bowel(stomach, 4.0, u(0.25, 0.6)))
  duodenum = [(-0.1 * ca, body_cy - 0.4 * cb, z(0.27)), (-0.4 * ca, body_cy - 0.15 * cb, z(0.31)),
              (-0.38 * ca, y_ant_vessels - 25, z(0.42)), (0.05 * ca, y_ant_vessels - 22, z(0.45))]
  parts.append(bowel(shapes.Union(tuple(shapes.chain(duodenum, [11] * 4))), 2.5, 0.0))
  colon = [[(-0.66 * ca, body_cy + 0.1 * cb, z(0.78)), (-0.68 * ca, body_cy - 0.05 * cb, z(0.45)),
            (-0.45 * ca, body_cy - 0.55 * cb, z(0.4)), (0.1 * ca, body_cy - 0.72 * cb, z(0.46)),
            (0.6 * ca, body_cy - 0.3 * cb, z(0.3)), (0.72 * ca, body_cy + 0.15 * cb, z(0.35)),
            (0.7 * ca, body_cy + 0.1 * cb, z(0.75)), (0.35 * ca, body_cy - 0.2 * cb, z(0.85)),
            (0.0, y_vb + 5, z(0.95)), (0.0, y_vb + 10, z(1.1))]]
  for points in colon:
    jitter = np.asarray(points) + u(-6, 6, (len(points), 3))
    parts.append(bowel(shapes.Union(tuple(shapes.chain(jitter, [u(17, 22)] * 4 + [15] * 6))), 3.0, u(0.55, 1.0)))
  for _ in range(int(rng.integers(5, 8))):
    p = np.array([u(-0.4, 0.4) * ca, body_cy + u(-0.6, 0.0) * cb, z(u(0.48, 0.8))])
    points = [p]
    for _ in range(int(rng.integers(3, 6))):
      step = rng.normal(size=3)
      p = p + 30 * step / np.linalg.norm(step)
      p[0] = np.clip(p[0], -0.45 * ca, 0.45 * ca)
      p[1] = np.clip(p[1], body_cy - 0.7 * cb, body_cy + 0.1 * cb)
      points.append(p)
    air = 0.0 if rng.random() < 0.6 else u(0.2, 1.0)
    parts.append(bowel(shapes.Union(tuple(shapes.chain(points, [u(10, 13)] * len(points)))), 2.5, air))

  # Vessels: aorta and branches, IVC and its tributaries, portal system, hepatic veins.
  r_ao = u(10, 12.5) * size
  aorta_xy = (u(8, 16), y_ant_vessels - r_ao - 3)
  s_bif = u(0.62, 0.68)
  bif = (aorta_xy[0], aorta_xy[1], z(s_bif))
  parts.append(Part('aorta', shapes.Blob(aorta_xy[0], aorta_xy[1], z((s_bif - 0.2) / 2), (s_bif + 0.2) / 2 * length,
                                         r_ao, r_ao, p=16, taper=0.1)))
  arteries = []
  for side in (-1, 1):
    arteries += shapes.chain([bif, (side * 0.3 * ca, y_vb - 8, z(0.82)), (side * 0.45 * ca, y_vb - 30, z(1.1))],
                             [0.65 * r_ao, 0.55 * r_ao, 0.5 * r_ao])
    hilum, s_k = kidneys[side]
    arteries.append(shapes.Capsule((aorta_xy[0], aorta_xy[1], z(s_k - 0.02)), hilum, 3.2, 2.8))
  celiac = (aorta_xy[0] + 2, aorta_xy[1] - r_ao - 18, z(0.245))
  arteries.append(shapes.Capsule((aorta_xy[0], aorta_xy[1], z(0.24)), celiac, 3.5, 3.0))
  arteries.append(shapes.Capsule(celiac, (-0.3 * ca, body_cy - 0.1 * cb, z(0.25)), 2.8, 2.5))
  arteries.append(shapes.Capsule(celiac, (0.5 * ca, body_cy + 0.3 * cb, z(0.23)), 2.8, 2.5))
  arteries += shapes.chain([(aorta_xy[0], aorta_xy[1], z(0.29)), (aorta_xy[0] - 4, aorta_xy[1] - 30, z(0.34)),
                            (aorta_xy[0] - 15, aorta_xy[1] - 45, z(0.6))], [4.0, 3.5, 2.5])
  parts.append(Part('aorta', shapes.Union(tuple(arteries))))

  ivc_xy = (-u(22, 28) * size, y_ant_vessels - 10)
  s_conf = s_bif + 0.03
  parts.append(Part('ivc', shapes.Blob(ivc_xy[0], ivc_xy[1], z((s_conf - 0.2) / 2), (s_conf + 0.2) / 2 * length,
                                       13 * size, 9 * size, p=16)))
  veins = []
  ivc_end = (ivc_xy[0], ivc_xy[1], z(s_conf))
  for side in (-1, 1):
    veins += shapes.chain([ivc_end, (side * 0.27 * ca, y_vb - 2, z(0.84)), (side * 0.43 * ca, y_vb - 22, z(1.1))],
                          [8, 7, 7])
    hilum, s_k = kidneys[side]
    via = [(aorta_xy[0], aorta_xy[1] - r_ao - 5, z(s_k - 0.01))] if side > 0 else []
    veins += shapes.chain([hilum] + via + [(ivc_xy[0], ivc_xy[1], z(s_k - 0.01))], [4.5] * (2 + len(via)))
  parts.append(Part('ivc', shapes.Union(tuple(veins))))

  porta = (-0.32 * ca, body_cy - 0.1 * cb, z(0.24))
  portal = shapes.chain([conf, porta, (-0.62 * ca, body_cy, z(0.19))], [7, 6, 4])
  portal.append(shapes.Capsule(porta, (0.05 * ca, body_cy - 0.45 * cb, z(0.19)), 5, 3.5))
  parts.append(Part('portal_vein', shapes.Union(tuple(portal)), group='liver'))
  mesenteric = shapes.chain([(0.52 * ca, body_cy + 0.36 * cb, z(0.22)), (0.3 * ca, y_ant_vessels - 18, z(0.3)), conf],
                            [4.5, 4.5, 5])
  mesenteric.append(shapes.Capsule(conf, (-8, conf[1] - 20, z(0.55)), 5.5, 4))
  parts.append(Part('portal_vein', shapes.Union(tuple(mesenteric))))
  top = (ivc_xy[0] + 3, ivc_xy[1] - 4, z(0.06))
  hepatic = [shapes.Capsule(top, (-0.8 * ca, body_cy - 0.1 * cb, z(0.15)), 5.5, 3),
             shapes.Capsule(top, (-0.35 * ca, body_cy - 0.6 * cb, z(0.13)), 5, 3),
             shapes.Capsule(top, (0.15 * ca, body_cy - 0.5 * cb, z(0.1)), 4.5, 2.5)]
  parts.append(Part('hepatic_veins', shapes.Union(tuple(hepatic)), group='liver', over=('liver', 'hepatic_veins')))

  # Urinary tract: ureters down the psoas to the bladder.
  bladder_a = 0.28 * ca * u(0.7, 1.15)
  bladder = shapes.Blob(0.0, body_cy - 0.3 * cb, z(0.97), u(0.07, 0.1) * length, bladder_a, 0.7 * bladder_a,
                        harmonics=wobble(0.05))
  for side in (-1, 1):
    hilum, s_k = kidneys[side]
    ureter = [hilum, (side * (r_vb + 12), y_vb - 18, z(0.62)), (side * 0.28 * ca, y_vb - 10, z(0.82)),
              (side * 0.35 * bladder_a, body_cy - 0.3 * cb + 0.5 * bladder.b, z(0.95))]
    parts.append(Part('ureter', shapes.Union(tuple(shapes.chain(ureter, [3.5] * 4)))))
  parts.append(Part('body', bladder, inner=((3.0, 'bladder'),)))
  return parts
