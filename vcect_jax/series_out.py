"""Writing a virtual contrast series: DICOM beside the source study, NIfTI, and a preview PNG.

The only module of the project that writes DICOM. Its inputs are a virtual HU volume and where it sits:

* `write_dicom_series`: one CT Image Storage file per source slice, in the source slice's geometry
  (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, Rows, Columns,
  FrameOfReferenceUID) and study (StudyInstanceUID and the patient and study identification, copied: the series
  goes back into the user's own archive next to the study it came from). New SeriesInstanceUID and
  SOPInstanceUIDs; ImageType DERIVED\\SECONDARY\\AXIAL; a SeriesDescription and ImageComments that say the
  series is synthetic; a DerivationDescription naming the model and checkpoint step; SourceImageSequence and
  ReferencedSeriesSequence pointing at the source slice. Pixels are signed 16-bit HU (RescaleSlope 1,
  RescaleIntercept 0), with a display window per phase (`PHASE_WINDOWS`).
* `affine_from_slices` / `write_nifti`: a gzipped NIfTI in the geometry SimpleITK gives the DICOM series
  (slices ascending along ImageOrientationPatient's row x column normal, origin at the first of them).
* `write_preview`: axial and coronal views of the input and each virtual phase side by side, windowed.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
from collections.abc import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Display window (centre, width) in HU written with each virtual phase: vessels are brightest in the arterial
# phase, so its window reaches higher; portal venous and delayed use a soft-tissue abdominal window.
PHASE_WINDOWS = {"arterial": (100.0, 600.0), "portal": (60.0, 400.0), "delayed": (50.0, 400.0)}
PHASE_NAMES = {"arterial": "ARTERIAL", "portal": "PORTAL VENOUS", "delayed": "DELAYED"}
# SeriesNumber of a virtual phase: the source's plus this offset (an IS must stay below 2**31).
SERIES_NUMBER_OFFSET = {"arterial": 9100, "portal": 9200, "delayed": 9300}
SOFTWARE = "vcect-jax"

# Copied from the source slice when present: patient, study, frame of reference, acquisition context.
_COPIED = (
    "SpecificCharacterSet",
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientBirthDate",
    "PatientBirthTime", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription",
    # General Series (the parts that describe the patient, not the acquisition)
    "PatientPosition", "BodyPartExamined", "Laterality",
    # Frame of Reference
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    # Image Plane
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation",
    # General Image / CT Image
    "InstanceNumber", "AcquisitionNumber", "KVP",
    # A series derived from lossy-compressed pixels stays marked as such.
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)
# Type 2 attributes of the CT Image IOD among the copied ones: written empty when the source lacks them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator", "SliceThickness",
          "InstanceNumber", "AcquisitionNumber", "KVP", "PatientPosition")


@dataclasses.dataclass(frozen=True)
class Derivation:
  """What made a virtual series: written into DerivationDescription and the series description."""

  phase: str
  method: str
  checkpoint: str
  step: int | None

  def description(self) -> str:
    step = "unknown step" if self.step is None else f"step {self.step}"
    text = (f"Synthetic virtual {PHASE_NAMES[self.phase].lower()} phase computed from non-contrast CT by the "
            f"{SOFTWARE} {self.method} generator, checkpoint {self.checkpoint} ({step}); no contrast was given")
    return text[:1024]  # ST


def _now() -> tuple[str, str]:
  now = datetime.datetime.now()
  return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def write_dicom_series(folder: str | pathlib.Path, virtual_hu: np.ndarray, sources: Sequence[str | pathlib.Path],
                       derivation: Derivation, series_uid: str | None = None) -> list[pathlib.Path]:
  """Writes a virtual series, one file per source slice, into ``folder`` (created).

  Args:
    folder: the series folder; files are named ``VIRT0001.dcm`` ... in the order of ``sources``.
    virtual_hu: ``(N, H, W)`` HU of the virtual slices (rounded and stored as int16).
    sources: the N source DICOM files whose geometry, study and patient each slice takes.
    derivation: phase, model and checkpoint, for the descriptions.
    series_uid: the new SeriesInstanceUID (generated when None).

  Returns:
    The written files.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  virtual_hu = np.asarray(virtual_hu)
  if virtual_hu.ndim != 3 or len(virtual_hu) != len(sources):
    raise ValueError(f"virtual_hu {virtual_hu.shape} needs one (H, W) slice per source file ({len(sources)})")
  pixels = np.clip(np.rint(virtual_hu), -32768, 32767).astype("<i2")
  series_uid = series_uid or generate_uid()
  date, time = _now()
  centre, width = PHASE_WINDOWS[derivation.phase]
  frame_uid = None  # one new frame of reference for the series if the source has none
  paths = []
  for k, source in enumerate(sources):
    src = pydicom.dcmread(source, stop_before_pixels=True)
    rows, columns = int(src.Rows), int(src.Columns)
    if pixels[k].shape != (rows, columns):
      raise ValueError(f"virtual slice {k} has shape {pixels[k].shape}, its source {(rows, columns)}")
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword in _COPIED:
      if keyword in src:  # even when empty: a present Type 2C attribute may be required by the source's context
        ds[keyword] = src[keyword]
      elif keyword in _TYPE2:
        setattr(ds, keyword, None)
    if "Laterality" not in ds and not ds.get("BodyPartExamined"):
      # Type 2C: needed for a paired body part; with the body part unknown, laterality is unknown (empty).
      ds.Laterality = None
    if "FrameOfReferenceUID" not in ds:
      frame_uid = frame_uid or generate_uid()
      ds.FrameOfReferenceUID = frame_uid
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    number = src.get("SeriesNumber")
    ds.SeriesNumber = (int(number) if number not in (None, "") else 0) + SERIES_NUMBER_OFFSET[derivation.phase]
    source_description = str(src.get("SeriesDescription", "") or "").strip()
    description = f"VIRTUAL {PHASE_NAMES[derivation.phase]} (SYNTHETIC)"
    if source_description:
      description += f" FROM {source_description}"
    ds.SeriesDescription = description[:64]  # LO
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.Manufacturer = SOFTWARE
    ds.SoftwareVersions = SOFTWARE
    ds.DerivationDescription = derivation.description()
    ds.ImageComments = "SYNTHETIC IMAGE: computed by a neural network from a non-contrast series, not acquired"
    ds.BurnedInAnnotation = "NO"
    source_ref = Dataset()
    source_ref.ReferencedSOPClassUID = src.SOPClassUID
    source_ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ds.SourceImageSequence = DicomSequence([source_ref])
    instance_ref = Dataset()
    instance_ref.ReferencedSOPClassUID = src.SOPClassUID
    instance_ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = src.SeriesInstanceUID
    series_ref.ReferencedInstanceSequence = DicomSequence([instance_ref])
    ds.ReferencedSeriesSequence = DicomSequence([series_ref])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = f"{centre:g}", f"{width:g}"
    ds.WindowCenterWidthExplanation = PHASE_NAMES[derivation.phase]
    ds.PixelData = pixels[k].tobytes()
    path = folder / f"VIRT{k + 1:04d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    paths.append(path)
  return paths


def affine_from_slices(positions_mm: np.ndarray, orientation: Sequence[float], pixel_spacing_mm: Sequence[float],
                       slice_spacing_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  """The geometry SimpleITK gives a regular stack of DICOM slices.

  Args:
    positions_mm: ``(S, 3)`` ImagePositionPatient of the slices in volume order.
    orientation: ImageOrientationPatient (row direction, then column direction).
    pixel_spacing_mm: PixelSpacing (between rows, between columns).
    slice_spacing_mm: the slice spacing of a single slice (e.g. its SliceThickness).

  Returns:
    ``origin (3,)``, ``spacing (3,)`` (columns, rows, slices), ``direction (3, 3)`` (columns are the axes, in LPS),
    and whether the volume must be reversed along the slices to ascend along the third axis.
  """
  positions_mm = np.asarray(positions_mm, float)
  row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
  normal = np.cross(row, col)
  normal /= np.linalg.norm(normal)
  reverse = len(positions_mm) > 1 and float((positions_mm[-1] - positions_mm[0]) @ normal) < 0
  ordered = positions_mm[::-1] if reverse else positions_mm
  step = float(np.median(np.diff(ordered @ normal))) if len(ordered) > 1 else float(slice_spacing_mm)
  spacing = np.array([float(pixel_spacing_mm[1]), float(pixel_spacing_mm[0]), step])
  return ordered[0], spacing, np.stack([row, col, normal], axis=1), reverse


def write_nifti(path: str | pathlib.Path, hu: np.ndarray, positions_mm: np.ndarray, orientation: Sequence[float],
                pixel_spacing_mm: Sequence[float], slice_spacing_mm: float = 1.0) -> pathlib.Path:
  """Writes ``hu`` ``(S, H, W)`` (slice order of ``positions_mm``) as a gzipped int16 NIfTI (arguments as
  `affine_from_slices`)."""
  origin, spacing, direction, reverse = affine_from_slices(positions_mm, orientation, pixel_spacing_mm,
                                                           slice_spacing_mm)
  volume = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
  image = sitk.GetImageFromArray(np.ascontiguousarray(volume[::-1] if reverse else volume))
  image.SetOrigin(tuple(float(v) for v in origin))
  image.SetSpacing(tuple(float(v) for v in spacing))
  image.SetDirection(tuple(float(v) for v in direction.ravel()))
  return write_image(path, image)


def write_image(path: str | pathlib.Path, image: sitk.Image) -> pathlib.Path:
  """Writes a SimpleITK image (gzipped when the name ends in .gz)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  sitk.WriteImage(image, str(path), useCompression=str(path).endswith(".gz"), compressionLevel=1)
  return path


# ---------------------------------------------------------------- preview

PREVIEW_WINDOW = (40.0, 400.0)  # soft tissue (centre, width)
PREVIEW_TILE = 256  # pixels: every view is scaled to this width


def _to_uint8(hu: np.ndarray, window=PREVIEW_WINDOW) -> np.ndarray:
  centre, width = window
  return np.clip((hu.astype(np.float32) - (centre - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)


def _tile(image: np.ndarray, height_mm_per_px: float, width_mm_per_px: float) -> Image.Image:
  """An 8-bit view scaled to PREVIEW_TILE wide with square millimetres."""
  h, w = image.shape
  out_h = max(1, int(round(PREVIEW_TILE * (h * height_mm_per_px) / (w * width_mm_per_px))))
  return Image.fromarray(image).resize((PREVIEW_TILE, out_h), Image.Resampling.BILINEAR)


def write_preview(path: str | pathlib.Path, volumes: dict[str, np.ndarray], pixel_spacing_mm: Sequence[float],
                  slice_spacing_mm: float) -> pathlib.Path:
  """Writes a PNG: one column per volume (e.g. the input, then each virtual phase), the mid axial slice on top
  and the coronal plane through the middle row below, in a soft-tissue window (W400/L40).

  Args:
    path: the PNG.
    volumes: name -> ``(S, H, W)`` HU, slice 0 the most cranial, all the same shape.
    pixel_spacing_mm: (between rows, between columns).
    slice_spacing_mm: between slices.
  """
  names = list(volumes)
  s, h, w = volumes[names[0]].shape
  row_mm, col_mm = float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])
  axial = [_tile(_to_uint8(volumes[n][s // 2]), row_mm, col_mm) for n in names]
  coronal = [_tile(_to_uint8(volumes[n][:, h // 2, :]), slice_spacing_mm, col_mm) for n in names]
  label_h = 16
  height = label_h + axial[0].height + coronal[0].height
  canvas = Image.new("L", (PREVIEW_TILE * len(names), height), 0)
  draw = ImageDraw.Draw(canvas)
  for i, name in enumerate(names):
    draw.text((i * PREVIEW_TILE + 4, 2), name, fill=255)
    canvas.paste(axial[i], (i * PREVIEW_TILE, label_h))
    canvas.paste(coronal[i], (i * PREVIEW_TILE, label_h + axial[0].height))
  draw.text((4, label_h + axial[0].height - 14), f"W{PREVIEW_WINDOW[1]:g} L{PREVIEW_WINDOW[0]:g}", fill=255)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path, format="PNG")
  return path
