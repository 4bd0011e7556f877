"""Finding and reading CT series from a folder of DICOM files.

The job of this module ends at a checked, sorted volume in Hounsfield units:

* ``scan(root)`` finds DICOM files recursively whatever their names, skips what is not a readable CT image (with
  a reason), and groups slices into series (SeriesInstanceUID) and series into studies (StudyInstanceUID).
* ``check_geometry(series)`` sorts slices by ImagePositionPatient projected on the slice normal and rejects a
  series with missing or duplicate positions, mixed spacing, mixed orientation or gantry tilt.
* ``read_volume(series)`` decodes the pixels and converts them to HU with slope and intercept, masking pixel
  padding.

Compressed pixel data: JPEG 2000 (pylibjpeg-openjpeg) and RLE (pydicom) are decoded. JPEG Lossless and JPEG-LS
are decoded only by a non-GPL decoder (python-gdcm, or pyjpegls for JPEG-LS); without one, the series is skipped
with a reason that names the package to install. pylibjpeg-libjpeg (GPLv3) is never used.

Identifiers (names, IDs, UIDs, dates) stay in memory; they are never part of a reason string.
"""

import dataclasses
import importlib.util
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

CT_MODALITY = "CT"

# Transfer syntaxes whose only common decoders are GPL (pylibjpeg-libjpeg) or need an extra package.
JPEG_LOSSLESS = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
# Non-GPL pydicom decoding plugins allowed for them, in order of preference.
_SAFE_PLUGINS = {
    **{uid: ("gdcm",) for uid in JPEG_LOSSLESS},
    **{uid: ("gdcm", "pyjpegls") for uid in JPEG_LS},
}
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
# Native little-endian syntaxes (implicit, explicit VR) whose pixels are read straight from the file.
_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_PLUGIN_MODULE = {"gdcm": "gdcm", "pyjpegls": "jpeg_ls"}

# Tolerances of the geometry checks.
_ORIENTATION_ATOL = 1e-4
_TILT_DEG = 0.5
_SPACING_RTOL = 0.1
_DUPLICATE_MM = 0.01
MIN_SLICES = 3


class SeriesRejected(Exception):
  """A series cannot be used; the message is the reason recorded in the manifest (no identifiers)."""


@dataclasses.dataclass
class SliceHeader:
  """What the converter needs from one file's header (identifiers stay in memory only)."""

  path: pathlib.Path
  study_uid: str
  series_uid: str
  modality: str
  series_description: str
  protocol_name: str
  series_number: int | None
  patient_id: str
  patient_name: str
  patient_birth_date: str
  transfer_syntax: str
  rows: int
  columns: int
  ipp: tuple[float, float, float] | None
  iop: tuple[float, ...] | None
  pixel_spacing: tuple[float, float] | None
  slice_thickness: float | None
  gantry_tilt: float
  slope: float
  intercept: float
  padding: tuple[int, int] | None  # inclusive range of stored values that are padding
  # Where the pixels of a native little-endian monochrome file lie: (byte offset, numpy dtype, unused high bits).
  # ``read_volume`` then reads them directly (as pydicom would decode them) instead of parsing the file again.
  native_pixels: tuple[int, str, int] | None = None


@dataclasses.dataclass
class Series:
  """The slices of one SeriesInstanceUID (unsorted until ``check_geometry``)."""

  uid: str
  study_uid: str
  slices: list[SliceHeader]

  @property
  def description(self) -> str:
    return self.slices[0].series_description

  @property
  def protocol_name(self) -> str:
    return self.slices[0].protocol_name

  @property
  def folder(self) -> pathlib.Path:
    """The common parent folder of the series' files."""
    return pathlib.Path(os.path.commonpath([str(s.path.parent) for s in self.slices]))


@dataclasses.dataclass
class Study:
  """The series of one StudyInstanceUID."""

  uid: str
  series: list[Series]

  @property
  def identity(self) -> tuple[str, str, str]:
    """(PatientID, PatientName, PatientBirthDate) of the study's first slice."""
    s = self.series[0].slices[0]
    return s.patient_id, s.patient_name, s.patient_birth_date

  @property
  def folder(self) -> pathlib.Path:
    return pathlib.Path(os.path.commonpath([str(x.folder) for x in self.series]))


@dataclasses.dataclass
class Geometry:
  """A checked series: slices sorted cranial to caudal, and where they are."""

  slices: list[SliceHeader]
  table_z_mm: np.ndarray  # (S,) position along the (cranially oriented) slice normal, decreasing
  normal: np.ndarray  # (3,) unit slice normal with a non-negative patient-z component
  slice_spacing_mm: float
  pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing)
  shape: tuple[int, int]  # (rows, columns)


@dataclasses.dataclass
class Volume:
  """A series in HU: ``hu`` int16 (S, H, W), slice 0 the most cranial; ``padding`` bool (S, H, W) or None."""

  geometry: Geometry
  hu: np.ndarray
  padding: np.ndarray | None


@dataclasses.dataclass
class Skipped:
  """A file or series left out, with a reason. ``what`` is a path relative to the input root."""

  what: str
  reason: str


def _str(ds: pydicom.Dataset, keyword: str) -> str:
  value = ds.get(keyword, "")
  return "" if value is None else str(value).strip()


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
  value = ds.get(keyword)
  if value is None:
    return None
  try:
    out = tuple(float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]))
  except (TypeError, ValueError):
    return None
  return out if len(out) == n else None


def _looks_like_dicom(path: pathlib.Path) -> bool:
  """Cheap check before parsing: the 'DICM' magic, or a plausible first group-0008 tag (files without preamble)."""
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  if len(head) >= 132 and head[128:132] == b"DICM":
    return True
  return len(head) >= 8 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[2:4] in (b"\x05\x00", b"\x08\x00", b"\x10\x00", b"\x16\x00", b"\x00\x00", b"\x01\x00", b"\x12\x00")


def read_header(path: pathlib.Path) -> SliceHeader:
  """Parses one file's header.

  Raises:
    SeriesRejected: the file is not DICOM, unreadable, truncated, has no pixel data or is multi-frame; the message
      is the reason.
  """
  if not _looks_like_dicom(path):
    raise SeriesRejected("not a DICOM file")
  try:
    # Defer large values (the pixels): their presence and length are known without reading them.
    ds = pydicom.dcmread(path, defer_size=4096, force=True)
    ds.get("Modality")  # parse errors in the header surface here
  except InvalidDicomError:
    raise SeriesRejected("not a DICOM file") from None
  except Exception as e:  # pylint: disable=broad-except  # any parse failure is a data problem
    raise SeriesRejected(f"unreadable or truncated DICOM file ({type(e).__name__})") from None
  if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
    raise SeriesRejected("no pixel data")
  try:
    tsyntax = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else ""
    elem = ds.get_item("PixelData") if "PixelData" in ds else None
    tell = getattr(elem, "file_tell", None) or getattr(elem, "value_tell", None)
    if tsyntax in _NATIVE and tell is not None:
      expected = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("SamplesPerPixel", 1) or 1)
                  * int(ds.get("NumberOfFrames", 1) or 1) * (int(ds.get("BitsAllocated", 16) or 16) // 8))
      if tell + expected > path.stat().st_size:
        raise SeriesRejected("truncated file (pixel data shorter than declared)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
      raise SeriesRejected("multi-frame image (enhanced CT) is not supported")
    padding = None
    if "PixelPaddingValue" in ds:
      lo = int(ds.PixelPaddingValue)
      hi = int(ds.get("PixelPaddingRangeLimit", lo))
      padding = (min(lo, hi), max(lo, hi))
    number = ds.get("SeriesNumber")
    native = None
    if tsyntax in _NATIVE_LITTLE_ENDIAN and tell is not None and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
      allocated = int(ds.get("BitsAllocated", 0) or 0)
      stored = int(ds.get("BitsStored", allocated) or allocated)
      signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
      if allocated in (8, 16, 32) and 0 < stored <= allocated:
        native = (int(tell), f"<{'i' if signed else 'u'}{allocated // 8}", allocated - stored)
    return SliceHeader(
        path=path,
        study_uid=_str(ds, "StudyInstanceUID"),
        series_uid=_str(ds, "SeriesInstanceUID"),
        modality=_str(ds, "Modality").upper(),
        series_description=_str(ds, "SeriesDescription"),
        protocol_name=_str(ds, "ProtocolName"),
        series_number=int(number) if number not in (None, "") else None,
        patient_id=_str(ds, "PatientID"),
        patient_name=_str(ds, "PatientName"),
        patient_birth_date=_str(ds, "PatientBirthDate"),
        transfer_syntax=tsyntax,
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        ipp=_floats(ds, "ImagePositionPatient", 3),
        iop=_floats(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_floats(ds, "PixelSpacing", 2),
        slice_thickness=(_floats(ds, "SliceThickness", 1) or (None,))[0],
        gantry_tilt=float((_floats(ds, "GantryDetectorTilt", 1) or (0.0,))[0]),
        slope=float((_floats(ds, "RescaleSlope", 1) or (1.0,))[0]),
        intercept=float((_floats(ds, "RescaleIntercept", 1) or (0.0,))[0]),
        padding=padding,
        native_pixels=native,
    )
  except SeriesRejected:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SeriesRejected(f"unreadable DICOM header ({type(e).__name__})") from None


def find_files(root: str | os.PathLike) -> list[pathlib.Path]:
  """All regular files under ``root``, recursively, sorted, hidden files and folders excluded."""
  out = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    out.extend(pathlib.Path(folder) / f for f in sorted(files) if not f.startswith("."))
  return out


def _rel(path: pathlib.Path, root: pathlib.Path) -> str:
  try:
    return str(path.relative_to(root))
  except ValueError:
    return path.name


def scan(root: str | os.PathLike) -> tuple[list[Study], list[Skipped]]:
  """Finds the CT studies under ``root``.

  Returns:
    The studies (sorted by folder), and the files left out with their reasons (paths relative to ``root``).
  """
  root = pathlib.Path(root)
  skipped: list[Skipped] = []
  series: dict[tuple[str, str], Series] = {}
  for path in find_files(root):
    try:
      header = read_header(path)
    except SeriesRejected as e:
      skipped.append(Skipped(_rel(path, root), str(e)))
      continue
    if header.modality != CT_MODALITY:
      skipped.append(Skipped(_rel(path, root), f"modality {header.modality or 'missing'} is not CT"))
      continue
    if not header.series_uid or not header.study_uid:
      skipped.append(Skipped(_rel(path, root), "missing StudyInstanceUID or SeriesInstanceUID"))
      continue
    key = (header.study_uid, header.series_uid)
    if key not in series:
      series[key] = Series(header.series_uid, header.study_uid, [])
    series[key].slices.append(header)
  studies: dict[str, Study] = {}
  for (study_uid, _), s in series.items():
    studies.setdefault(study_uid, Study(study_uid, [])).series.append(s)
  ordered = sorted(studies.values(), key=lambda st: str(st.folder))
  for st in ordered:
    st.series.sort(key=lambda s: (str(s.folder), s.slices[0].series_number or 0))
  return ordered, skipped


def slice_normal(iop: Sequence[float]) -> np.ndarray:
  """Unit normal of an ImageOrientationPatient, oriented towards the head (non-negative patient z)."""
  row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
  n = np.cross(row, col)
  n /= np.linalg.norm(n)
  if n[2] < 0 or (n[2] == 0 and n.sum() < 0):
    n = -n
  return n


def check_geometry(series: Series, normal: np.ndarray | None = None) -> Geometry:
  """Sorts a series cranial to caudal and checks that it is a regular stack.

  Args:
    series: the slices.
    normal: project positions on this normal instead of the series' own (to compare two series in one frame).

  Raises:
    SeriesRejected: missing or duplicate positions, mixed spacing, mixed orientation or matrix, gantry tilt.
  """
  slices = series.slices
  if len(slices) < MIN_SLICES:
    raise SeriesRejected(f"too few slices ({len(slices)} < {MIN_SLICES})")
  if any(s.ipp is None for s in slices):
    raise SeriesRejected("missing ImagePositionPatient on some slices")
  if any(s.iop is None for s in slices):
    raise SeriesRejected("missing ImageOrientationPatient on some slices")
  if any(s.pixel_spacing is None for s in slices):
    raise SeriesRejected("missing PixelSpacing on some slices")
  iops = np.array([s.iop for s in slices])
  if np.abs(iops - iops[0]).max() > _ORIENTATION_ATOL:
    raise SeriesRejected("mixed orientation (ImageOrientationPatient differs between slices)")
  if len({(s.rows, s.columns) for s in slices}) > 1:
    raise SeriesRejected("inconsistent geometry (image matrix differs between slices)")
  spacings = np.array([s.pixel_spacing for s in slices])
  if np.abs(spacings - spacings[0]).max() > 1e-4:
    raise SeriesRejected("inconsistent geometry (PixelSpacing differs between slices)")
  if max(abs(s.gantry_tilt) for s in slices) > 0.01:
    raise SeriesRejected("gantry tilt (GantryDetectorTilt is not zero)")
  n = slice_normal(iops[0]) if normal is None else np.asarray(normal, float)
  ipp = np.array([s.ipp for s in slices])
  z = ipp @ n
  order = np.argsort(-z, kind="stable")
  z, ipp = z[order], ipp[order]
  steps = -np.diff(z)
  if np.any(steps < _DUPLICATE_MM):
    raise SeriesRejected("duplicate slice positions")
  # Slices must stack along the normal: a sideways drift of the positions means a tilted gantry.
  span = ipp[0] - ipp[-1]
  cos = abs(span @ n) / max(np.linalg.norm(span), 1e-9)
  if np.degrees(np.arccos(min(1.0, cos))) > _TILT_DEG:
    raise SeriesRejected("gantry tilt (slice positions do not stack along the slice normal)")
  step = float(np.median(steps))
  bad = np.abs(steps - step) > max(_SPACING_RTOL * step, 0.01)
  if bad.any():
    worst = float(steps[bad].max())
    if worst > 1.5 * step:
      raise SeriesRejected(f"missing slices (a gap of {worst:.2f} mm where {step:.2f} mm is expected)")
    raise SeriesRejected(f"mixed slice spacing ({steps.min():.2f} to {steps.max():.2f} mm)")
  return Geometry(
      slices=[slices[i] for i in order],
      table_z_mm=z,
      normal=n,
      slice_spacing_mm=step,
      pixel_spacing_mm=tuple(float(v) for v in spacings[0]),
      shape=(slices[0].rows, slices[0].columns),
  )


def decoder_problem(transfer_syntax: str) -> str | None:
  """Why pixel data in this transfer syntax cannot be decoded here, or None if it can."""
  plugins = _SAFE_PLUGINS.get(transfer_syntax)
  if plugins is None:
    return None
  if any(importlib.util.find_spec(_PLUGIN_MODULE[p]) is not None for p in plugins):
    return None
  kind = "JPEG Lossless" if transfer_syntax in JPEG_LOSSLESS else "JPEG-LS"
  packages = " or ".join({"gdcm": "python-gdcm", "pyjpegls": "pyjpegls"}[p] for p in plugins)
  return (f"{kind} pixel data needs a non-GPL decoder: install {packages} "
          "(pylibjpeg-libjpeg is GPL and is not used)")


def read_native(path: pathlib.Path, native: tuple[int, str, int], shape: tuple[int, int]) -> np.ndarray:
  """Stored values of native little-endian pixel data, read from its byte offset; identical to pydicom's
  ``pixel_array``, which also clears (unsigned) or sign-extends (signed) the unused high bits.

  Raises:
    ValueError: the file holds fewer pixels than ``shape`` needs.
  """
  offset, dtype, unused_bits = native
  count = shape[0] * shape[1]
  pixels = np.fromfile(path, dtype=dtype, count=count, offset=offset)
  if pixels.size != count:
    raise ValueError("pixel data shorter than declared")
  if unused_bits:
    np.left_shift(pixels, unused_bits, out=pixels)
    np.right_shift(pixels, unused_bits, out=pixels)
  return pixels.reshape(shape)


def decode_stored(path: pathlib.Path, transfer_syntax: str) -> np.ndarray:
  """Stored pixel values of one file, as pydicom decodes them (no rescale)."""
  ds = pydicom.dcmread(path)
  plugins = _SAFE_PLUGINS.get(transfer_syntax)
  if plugins:
    for plugin in plugins:
      if importlib.util.find_spec(_PLUGIN_MODULE[plugin]) is not None:
        ds.pixel_array_options(decoding_plugin=plugin)
        return ds.pixel_array
  return ds.pixel_array


def to_hu(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
  """HU = stored * slope + intercept, rounded to int16 (exact for integer slope and intercept)."""
  if slope == 1.0 and float(intercept).is_integer():
    hu = stored.astype(np.int32) + int(intercept)
  else:
    hu = np.rint(stored.astype(np.float64) * slope + intercept)
  return np.clip(hu, -32768, 32767).astype(np.int16)


def read_volume(geometry: Geometry, padding_hu: int = -1024) -> Volume:
  """Decodes a checked series to HU; padded pixels are set to ``padding_hu`` and flagged in ``padding``.

  Raises:
    SeriesRejected: no decoder for the transfer syntax, or a slice fails to decode.
  """
  for s in geometry.slices:
    problem = decoder_problem(s.transfer_syntax)
    if problem:
      raise SeriesRejected(problem)
  h, w = geometry.shape
  hu = np.empty((len(geometry.slices), h, w), np.int16)
  padding = None
  for i, s in enumerate(geometry.slices):
    try:
      if s.native_pixels is not None:
        stored = read_native(s.path, s.native_pixels, (h, w))
      else:
        stored = decode_stored(s.path, s.transfer_syntax)
    except Exception as e:  # pylint: disable=broad-except  # corrupt pixel data is a data problem
      raise SeriesRejected(f"slice {i} could not be decoded ({type(e).__name__})") from None
    if stored.shape != (h, w):
      raise SeriesRejected(f"slice {i} decodes to shape {stored.shape}, expected {(h, w)}")
    hu[i] = to_hu(stored, s.slope, s.intercept)
    if s.padding is not None:
      mask = (stored >= s.padding[0]) & (stored <= s.padding[1])
      if mask.any():
        if padding is None:
          padding = np.zeros(hu.shape, bool)
        padding[i] = mask
        hu[i][mask] = padding_hu
  return Volume(geometry, hu, padding)
