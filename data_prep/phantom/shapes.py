"""Smooth geometric primitives that the phantom's anatomy is built from.

Every primitive lives in patient millimetres of the reference (non-contrast) scan: x towards the patient's
left (image columns), y towards the back (image rows), z towards the head. A primitive knows its bounding box,
so that it is only ever evaluated on the few voxels that can belong to it, and it evaluates on broadcastable
coordinate arrays: ``x`` and ``y`` of shape ``(1, h, w)`` or ``(n, h, w)``, ``z`` of shape ``(n, 1, 1)``.
"""

import dataclasses

import numpy as np

Box = tuple[float, float, float, float, float, float]  # x0, x1, y0, y1, z0, z1 in mm


@dataclasses.dataclass(frozen=True)
class Blob:
  """A stack of warped ellipses: an ellipsoid-like solid with a smooth, case-specific outline.

  The cross-section at height ``z`` is an ellipse with centre ``(cx, cy) + drift * t + bend * t**2`` and semi-axes
  ``(a, b) * profile(t) * (1 + taper * t)``, where ``t = (z - zc) / hz`` runs over [-1, 1] and
  ``profile(t) = (1 - |t|**p) ** (1 / p)`` (p = 2 gives an ellipsoid, large p a capped cylinder). The outline
  is warped by low-order harmonics whose amplitudes vary smoothly with ``t``, and ``square`` makes it boxier.
  """
  cx: float
  cy: float
  zc: float
  hz: float
  a: float
  b: float
  angle: float = 0.0  # in-plane rotation of the (a, b) axes, radians
  p: float = 2.0
  taper: float = 0.0
  drift: tuple[float, float] = (0.0, 0.0)
  bend: tuple[float, float] = (0.0, 0.0)
  square: float = 0.0
  harmonics: tuple[float, ...] = (0.0,) * 8  # (c1, s1, c2, s2) at t = 0 and their slopes in t

  def box(self, margin: float = 2.0) -> Box:
    reach = max(self.a, self.b) * (1 + abs(self.taper)) * 1.35 + margin
    dx = abs(self.drift[0]) + abs(self.bend[0])
    dy = abs(self.drift[1]) + abs(self.bend[1])
    return (self.cx - reach - dx, self.cx + reach + dx, self.cy - reach - dy, self.cy + reach + dy,
            self.zc - self.hz - margin, self.zc + self.hz + margin)

  def axes(self, z: np.ndarray):
    """Per-slice centre and semi-axes, each ``(n, 1, 1)`` float32; zero axes outside the solid."""
    t = ((z - self.zc) / self.hz).astype(np.float32)
    inside = np.abs(t) < 1
    prof = np.where(inside, (1 - np.minimum(np.abs(t), 1) ** self.p) ** (1 / self.p), 0).astype(np.float32)
    scale = prof * (1 + self.taper * t)
    cx = self.cx + self.drift[0] * t + self.bend[0] * t * t
    cy = self.cy + self.drift[1] * t + self.bend[1] * t * t
    return t, cx, cy, np.maximum(self.a * scale, 1e-3), np.maximum(self.b * scale, 1e-3), inside

  def local(self, x, y, z):
    """Normalised in-plane coordinates (u, v) and the per-slice mean semi-axis."""
    t, cx, cy, a, b, _ = self.axes(z)
    dx, dy = x - cx, y - cy
    if self.angle:
      c, s = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
      dx, dy = dx * c + dy * s, dy * c - dx * s
    return dx / a, dy / b, (a + b) / 2, t

  def level(self, x, y, z) -> np.ndarray:
    """Implicit function: < 1 inside, about ``(1 - d / r)**2`` at depth d below the surface (r: mean axis)."""
    u, v, _, t = self.local(x, y, z)
    h = self.harmonics
    c1, s1, c2, s2 = (np.float32(h[i]) + np.float32(h[i + 4]) * t for i in range(4))
    uu, vv = u * u, v * v
    q = uu + vv - (c1 * u + s1 * v + c2 * (uu - vv) + s2 * 2 * u * v)
    if self.square:
      q = q - np.float32(self.square) * uu * vv
    _, _, _, _, _, inside = self.axes(z)
    return np.where(inside, q, np.float32(9.0))

  def depth(self, x, y, z) -> np.ndarray:
    """Approximate depth below the surface in mm (> 0 inside), scaled by the slice's mean semi-axis."""
    _, _, _, a, b, _ = self.axes(z)
    q = self.level(x, y, z)
    return ((a + b) * np.float32(0.5)) * (1 - np.sqrt(np.maximum(q, 0)))


@dataclasses.dataclass(frozen=True)
class Capsule:
  """A tapered tube between two points: vessel segments, bowel loop segments, ureters."""
  p0: tuple[float, float, float]
  p1: tuple[float, float, float]
  r0: float
  r1: float

  def box(self, margin: float = 2.0) -> Box:
    r = max(self.r0, self.r1) + margin
    lo = np.minimum(self.p0, self.p1) - r
    hi = np.maximum(self.p0, self.p1) + r
    return (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])

  def depth(self, x, y, z) -> np.ndarray:
    """Depth below the tube's surface in mm (> 0 inside)."""
    e = np.subtract(self.p1, self.p0).astype(np.float32)
    dx, dy, dz = x - np.float32(self.p0[0]), y - np.float32(self.p0[1]), z - np.float32(self.p0[2])
    t = np.clip((dx * e[0] + dy * e[1] + dz * e[2]) / max(float(e @ e), 1e-6), 0, 1)
    d2 = (dx - t * e[0]) ** 2 + (dy - t * e[1]) ** 2 + (dz - t * e[2]) ** 2
    return np.float32(self.r0) + t * np.float32(self.r1 - self.r0) - np.sqrt(d2)


def chain(points, radii) -> list[Capsule]:
  """Capsules joining consecutive points: a smooth-looking tube along a polyline."""
  return [Capsule(tuple(map(float, points[i])), tuple(map(float, points[i + 1])), float(radii[i]),
                  float(radii[i + 1])) for i in range(len(points) - 1)]


@dataclasses.dataclass(frozen=True)
class Union:
  """Several primitives painted as one solid (inner layers are painted after every member's outer layer)."""
  members: tuple

  def box(self, margin: float = 2.0) -> Box:
    boxes = np.array([m.box(margin) for m in self.members])
    return (boxes[:, 0].min(), boxes[:, 1].max(), boxes[:, 2].min(), boxes[:, 3].max(), boxes[:, 4].min(),
            boxes[:, 5].max())


@dataclasses.dataclass(frozen=True)
class Periodic:
  """A shape kept only in bands of ``width`` mm repeating every ``pitch`` mm along z (intervertebral discs)."""
  shape: Blob
  pitch: float
  width: float
  z0: float

  def box(self, margin: float = 2.0) -> Box:
    return self.shape.box(margin)

  def depth(self, x, y, z) -> np.ndarray:
    gate = self.width / 2 - np.abs(np.mod(z - self.z0, self.pitch) - self.width / 2)
    return np.minimum(self.shape.depth(x, y, z), gate.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class RibCage:
  """Rib cross-sections: arcs in a band under the body wall, gated by angle, sliding round with z."""
  body: Blob
  depth_mm: float
  thickness: float
  z_low: float
  z_high: float
  count: int
  phase: float
  twist: float  # radians of sliding per mm of z

  def box(self, margin: float = 2.0) -> Box:
    b = self.body.box(margin)
    return (b[0], b[1], b[2], b[3], self.z_low, self.z_high)

  def depth(self, x, y, z) -> np.ndarray:
    d = self.body.depth(x, y, z)
    ring = self.thickness / 2 - np.abs(d - (self.depth_mm + self.thickness / 2))
    u, v, _, _ = self.body.local(x, y, z)
    theta = np.arctan2(v, u)
    gate = np.cos(self.count * theta + np.float32(self.phase) + np.float32(self.twist) * z) - np.float32(0.45)
    # No ribs over the spine and at the front, where the costal cartilages meet the sternum.
    lateral = np.abs(np.cos(theta)) - np.float32(0.3)
    return np.minimum(np.minimum(ring, gate * 8), lateral * 20)
