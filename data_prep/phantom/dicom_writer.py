"""Writes one phase of a phantom case as a CT Image Storage DICOM series.

Geometry: axial slices, ImageOrientationPatient (1,0,0,0,1,0), the image centre at x = y = 0, slice 0 the most
cranial. Stored values are 16-bit with slope 1 and an intercept of -1024 (unsigned, 12 bits stored) or 0
(signed). File names are hashes, so their order says nothing about slice order.
"""

import datetime
import hashlib
import pathlib

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

SERIES_DESCRIPTIONS = {
    'non_contrast': 'ABD/PELVIS NON-CONTRAST 5mm',
    'arterial': 'ABD/PELVIS ARTERIAL 5mm',
    'portal': 'ABD/PELVIS PORTAL VENOUS 5mm',
    'delayed': 'ABD/PELVIS DELAYED 5mm',
}
SECONDS_AFTER_START = {'non_contrast': 0, 'arterial': 95, 'portal': 135, 'delayed': 365}  # injection at 60 s
SERIES_NUMBERS = {'non_contrast': 2, 'arterial': 3, 'portal': 4, 'delayed': 5}
CONTRAST_AGENT = 'IOHEXOL 350 MG/ML'


def write_series(folder: pathlib.Path, phase: str, hu: np.ndarray, slice_z: np.ndarray, pixel_spacing: float,
                 slice_thickness: float, identity: dict, intercept: int, transfer_syntax=None) -> list[pathlib.Path]:
  """Writes ``hu`` ``(S, H, W)`` int16 as one series in ``folder``.

  Args:
    folder: created if missing; old ``*.dcm`` files in it are removed.
    phase: one of SERIES_DESCRIPTIONS.
    hu: the HU volume, slice 0 the most cranial.
    slice_z: table position (ImagePositionPatient z) of each slice, mm.
    identity: the case's identifiers (see ``identity.sample_identity``).
    intercept: RescaleIntercept, -1024 (unsigned storage) or 0 (signed storage).
    transfer_syntax: None for uncompressed explicit VR little endian, or a lossless compressed syntax UID.
  """
  folder.mkdir(parents=True, exist_ok=True)
  for old in folder.glob('*.dcm'):
    old.unlink()
  n, rows, cols = hu.shape
  when = identity['start'] + datetime.timedelta(seconds=SECONDS_AFTER_START[phase])
  series_uid = identity['uid'](phase, 'series')
  unsigned = intercept == -1024
  stored = (hu.astype(np.int32) - intercept).astype(np.uint16 if unsigned else np.int16)
  origin_xy = -(cols - 1) / 2 * pixel_spacing, -(rows - 1) / 2 * pixel_spacing
  shared = {
      'ImageType': ['ORIGINAL', 'PRIMARY', 'AXIAL'], 'SOPClassUID': CTImageStorage,
      'StudyDate': identity['StudyDate'], 'SeriesDate': identity['StudyDate'], 'AcquisitionDate': when.strftime('%Y%m%d'),
      'ContentDate': when.strftime('%Y%m%d'), 'StudyTime': identity['start'].strftime('%H%M%S'),
      'SeriesTime': when.strftime('%H%M%S'), 'AcquisitionTime': when.strftime('%H%M%S.%f'),
      'ContentTime': when.strftime('%H%M%S'), 'AccessionNumber': identity['AccessionNumber'], 'Modality': 'CT',
      'Manufacturer': 'VCECT Phantom', 'InstitutionName': identity['InstitutionName'],
      'ReferringPhysicianName': identity['ReferringPhysicianName'], 'StationName': 'PHANTOM-CT1',
      'StudyDescription': 'CT ABDOMEN PELVIS MULTIPHASE', 'SeriesDescription': SERIES_DESCRIPTIONS[phase],
      'ManufacturerModelName': 'Synthetic', 'PatientName': identity['PatientName'], 'PatientID': identity['PatientID'],
      'PatientBirthDate': identity['PatientBirthDate'], 'PatientSex': identity['PatientSex'],
      'PatientAge': identity['PatientAge'], 'BodyPartExamined': 'ABDOMEN', 'SliceThickness': _ds(slice_thickness),
      'KVP': '120', 'PatientPosition': 'HFS', 'StudyInstanceUID': identity['StudyInstanceUID'],
      'SeriesInstanceUID': series_uid, 'StudyID': identity['StudyID'], 'SeriesNumber': SERIES_NUMBERS[phase],
      'AcquisitionNumber': 1, 'ImageOrientationPatient': [1, 0, 0, 0, 1, 0],
      'FrameOfReferenceUID': identity['FrameOfReferenceUID'], 'PositionReferenceIndicator': '',
      'SamplesPerPixel': 1, 'PhotometricInterpretation': 'MONOCHROME2', 'Rows': rows, 'Columns': cols,
      'PixelSpacing': [_ds(pixel_spacing), _ds(pixel_spacing)], 'BitsAllocated': 16,
      'BitsStored': 12 if unsigned else 16, 'HighBit': 11 if unsigned else 15,
      'PixelRepresentation': 0 if unsigned else 1, 'WindowCenter': '40', 'WindowWidth': '400',
      'RescaleIntercept': str(intercept), 'RescaleSlope': '1', 'RescaleType': 'HU',
  }
  if phase != 'non_contrast':
    shared['ContrastBolusAgent'] = CONTRAST_AGENT
    shared['ContrastBolusRoute'] = 'IV'
    shared['ContrastBolusVolume'] = '100'
  paths = []
  for k in range(n):
    sop_uid = identity['uid'](phase, 'image', str(k))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in shared.items():
      setattr(ds, keyword, value)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(origin_xy[0]), _ds(origin_xy[1]), _ds(slice_z[k])]
    ds.SliceLocation = _ds(slice_z[k])
    ds.PixelData = stored[k].tobytes()
    if transfer_syntax is not None:
      ds.compress(transfer_syntax, stored[k])
    name = hashlib.sha1(sop_uid.encode()).hexdigest()[:12].upper()
    path = folder / f'CT{name}.dcm'
    ds.save_as(path, enforce_file_format=True)
    paths.append(path)
  return paths


def _ds(value: float) -> str:
  """A decimal string that round-trips the value exactly enough and always prints the same way."""
  text = f'{float(value):.6f}'.rstrip('0').rstrip('.')
  return '0' if text == '-0' else text
