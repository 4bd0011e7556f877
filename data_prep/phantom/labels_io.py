"""Writes the label volumes (NIfTI, same geometry as the DICOM series in SimpleITK) and labels.json."""

import json
import pathlib

import numpy as np
import SimpleITK as sitk


def write_label_volume(path: pathlib.Path, labels: np.ndarray, slice_z: np.ndarray, pixel_spacing: float) -> None:
  """Writes ``labels`` ``(S, H, W)`` uint8 (slice 0 the most cranial) as a gzipped NIfTI.

  SimpleITK reads a DICOM series in increasing ImagePositionPatient z with an identity direction, so the
  volume is stored caudal slice first with its origin at the most caudal slice's position. The gzip stream
  (written by ITK's zlib) carries no timestamp, so the bytes depend on the labels only.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  n, rows, cols = labels.shape
  image = sitk.GetImageFromArray(np.ascontiguousarray(labels[::-1]))
  thickness = abs(float(slice_z[0] - slice_z[1])) if n > 1 else 1.0
  image.SetSpacing((pixel_spacing, pixel_spacing, thickness))
  image.SetOrigin((-(cols - 1) / 2 * pixel_spacing, -(rows - 1) / 2 * pixel_spacing, float(np.min(slice_z))))
  image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
  sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=1)


def write_json(path: pathlib.Path, data: dict) -> None:
  """Writes ``data`` as indented JSON with a trailing newline (key order as given)."""
  path.write_text(json.dumps(data, indent=2) + '\n')
