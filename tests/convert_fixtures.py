"""Small synthetic CT series for the converter's tests (independent of data_prep.phantom).

An analytic abdomen (body ellipse, fat rim, liver, spleen, kidneys, aorta, spine) is sampled at chosen table
positions, with an in-plane rigid motion and a table shift for the contrast series, and written as DICOM with
pydicom. The motion follows the phantom's motion.json conventions (see docs/data_contracts.md).
"""

import json
import pathlib

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

FAKE = {
    "PatientName": "Fakeperson^Zebulon",
    "PatientID": "FAKEPID123456",
    "PatientBirthDate": "19011231",
    "AccessionNumber": "FAKEACC987654",
    "InstitutionName": "Fake Institute Of Imaging",
    "ReferringPhysicianName": "Doctor^Fakename",
    "StudyDate": "19990909",
}

# (centre x mm, centre y mm, centre z mm, radii x/y/z mm, HU by phase)
_ORGANS = [
    ("liver", (-45, -10, 30), (60, 55, 70), {"non_contrast": 60, "arterial": 85, "portal": 110, "delayed": 90}),
    ("spleen", (70, 10, 45), (28, 40, 45), {"non_contrast": 50, "arterial": 140, "portal": 130, "delayed": 95}),
    ("kidney_l", (55, 55, -40), (22, 30, 50), {"non_contrast": 40, "arterial": 220, "portal": 170, "delayed": 120}),
    ("kidney_r", (-55, 55, -50), (22, 30, 50), {"non_contrast": 40, "arterial": 220, "portal": 170, "delayed": 120}),
    ("aorta", (10, 35, 0), (11, 11, 400), {"non_contrast": 40, "arterial": 320, "portal": 180, "delayed": 110}),
    ("spine", (0, 75, 0), (18, 16, 400), {p: 400 for p in ("non_contrast", "arterial", "portal", "delayed")}),
    ("bowel", (10, -30, -60), (45, 25, 40), {"non_contrast": 35, "arterial": 90, "portal": 100, "delayed": 70}),
]


def anatomy(z_mm: np.ndarray, size: int, spacing: float, phase: str, shift_px=(0.0, 0.0), rotation_deg=0.0,
            table_shift_mm=0.0, seed=0) -> np.ndarray:
  """int16 (S, size, size) HU at the given table positions of the *scanned* series.

  The anatomy at non-contrast table position z appears at z + table_shift_mm, moved in-plane by
  p' = R (p - c) + c + shift (p = (column, row) pixels).
  """
  rng = np.random.default_rng(seed)
  c = (size - 1) / 2
  cols, rows = np.meshgrid(np.arange(size, dtype=float), np.arange(size, dtype=float))
  # Invert the in-plane motion: the pixel (cols, rows) of this series shows anatomy point p.
  r = np.radians(rotation_deg)
  rot = np.array([[np.cos(r), np.sin(r)], [-np.sin(r), np.cos(r)]])
  q = np.stack([cols - c - shift_px[0], rows - c - shift_px[1]], -1) @ np.linalg.inv(rot).T
  x_mm, y_mm = q[..., 0] * spacing, q[..., 1] * spacing
  out = np.empty((len(z_mm), size, size), np.int16)
  for i, z_scan in enumerate(z_mm):
    z = z_scan - table_shift_mm
    rx = 150 + 20 * np.sin(z / 40.0)
    ry = 110 + 12 * np.cos(z / 55.0)
    e = (x_mm / rx) ** 2 + (y_mm / ry) ** 2
    img = np.full((size, size), -1000.0)
    img[e < 1.0] = -100.0  # fat
    img[e < 0.8] = 45.0  # muscle / soft tissue
    for _, (cx, cy, cz), (ax, ay, az), hu in _ORGANS:
      inside = ((x_mm - cx) / ax) ** 2 + ((y_mm - cy) / ay) ** 2 + ((z - cz) / az) ** 2 < 1.0
      img[inside & (e < 0.8)] = hu[phase]
    noise = rng.normal(0, 10.0, img.shape)
    img = img + noise * (e < 1.0)
    out[i] = np.rint(img).astype(np.int16)
  return out


def write_series(folder: pathlib.Path, hu: np.ndarray, z_mm: np.ndarray, spacing: float, description: str,
                 study_uid: str, series_number: int, thickness: float, intercept: float = -1024.0,
                 identity: dict | None = None, modality: str = "CT", shuffle_names: bool = True,
                 iop=(1, 0, 0, 0, 1, 0), tilt_x_mm_per_slice: float = 0.0) -> list[pathlib.Path]:
  """Writes one CT series (one file per slice, names not in slice order)."""
  folder.mkdir(parents=True, exist_ok=True)
  identity = {**FAKE, **(identity or {})}
  series_uid = generate_uid()
  size = hu.shape[1]
  order = np.random.default_rng(series_number).permutation(len(hu)) if shuffle_names else range(len(hu))
  paths = []
  for n, i in enumerate(order):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"IM{n:05d}.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for k, v in identity.items():
      setattr(ds, k, v)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = int(i) + 1
    ds.ImagePositionPatient = [-(size - 1) / 2 * spacing + tilt_x_mm_per_slice * int(i), -(size - 1) / 2 * spacing,
                               float(z_mm[i])]
    ds.ImageOrientationPatient = list(iop)
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = thickness
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.PixelData = (hu[i].astype(np.int32) - int(intercept)).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    paths.append(path)
  return paths


def write_case(root: pathlib.Path, name: str, size: int = 96, slices: int = 10, thickness: float = 5.0,
               spacing: float = 3.0, phases=("arterial",), shift_px=(2.0, -1.5), rotation_deg=1.0,
               table_shift_mm=5.0, seed=0, identity: dict | None = None) -> dict:
  """Writes a study: a non-contrast series and one series per phase with the given motion.

  Returns the motion and paths as a dict.
  """
  study_uid = generate_uid()
  z = (np.arange(slices)[::-1] - slices / 2) * thickness + 100.0
  identity = {"PatientID": f"FAKEPID-{name}", **(identity or {})}
  case = root / name
  pre = anatomy(z, size, spacing, "non_contrast", seed=seed)
  write_series(case / "non_contrast", pre, z, spacing, "NON-CONTRAST", study_uid, 1, thickness, identity=identity)
  descriptions = {"arterial": "ARTERIAL", "portal": "PORTAL VENOUS", "delayed": "DELAYED"}
  for k, phase in enumerate(phases):
    post = anatomy(z, size, spacing, phase, shift_px, rotation_deg, table_shift_mm, seed=seed + 1 + k)
    write_series(case / phase, post, z, spacing, descriptions[phase], study_uid, 2 + k, thickness, identity=identity)
  c = (size - 1) / 2
  r = np.radians(rotation_deg)
  corner = np.array([c, c]) * 0.8
  rot = np.array([[np.cos(r), np.sin(r)], [-np.sin(r), np.cos(r)]])
  worst = float(max(np.linalg.norm(rot @ (corner * sgn) + np.array(shift_px) - corner * sgn)
                    for sgn in (np.array([1, 1]), np.array([1, -1]), np.array([-1, 1]), np.array([-1, -1]))))
  motion = {"reference": "non_contrast", "pixel_spacing_mm": spacing, "slice_thickness_mm": thickness,
            "phases": {p: {"in_plane_shift_px": list(shift_px), "rotation_deg": rotation_deg,
                           "table_shift_mm": table_shift_mm, "max_in_plane_displacement_px": worst,
                           "large_misalignment": bool(np.hypot(*shift_px) > 6.0)} for p in phases}}
  (case / "motion.json").write_text(json.dumps(motion))
  return {"dir": case, "pre_hu": pre, "z": z, "motion": motion}
