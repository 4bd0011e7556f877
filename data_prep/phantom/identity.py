"""Fake but realistic patient and study identifiers, so that de-identification can be exercised."""

import datetime

import numpy as np
from pydicom.uid import generate_uid

_GIVEN = ('JANE', 'JOHN', 'MARIA', 'AHMED', 'LI', 'SOFIA', 'PETER', 'AMARA', 'KENJI', 'ELENA', 'OMAR', 'GRACE')
_FAMILY = ('DOE', 'SMITH', 'GARCIA', 'MULLER', 'NGUYEN', 'OKAFOR', 'ROSSI', 'TANAKA', 'DUBOIS', 'KOWALSKI')
_INSTITUTIONS = ('St. Example General Hospital', 'Riverside Medical Centre', 'University Clinic Nordstadt',
                 'Hospital Central de Prueba')
_REFERRERS = ('HOUSE^GREGORY', 'GREY^MEREDITH', 'WATSON^JOHN', 'QUINN^MICHAELA')


def sample_identity(rng: np.random.Generator, seed: int, case_index: int) -> dict:
  """Identifiers of one case; UIDs are derived deterministically from (seed, case)."""
  sex = rng.choice(['F', 'M'])
  study_date = datetime.date(2016, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3000)))
  age = int(rng.integers(28, 86))
  birth = study_date - datetime.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
  start = datetime.datetime.combine(study_date, datetime.time(7, 30)) + datetime.timedelta(
      seconds=int(rng.integers(0, 10 * 3600)))

  def uid(*what):
    return generate_uid(entropy_srcs=['vcect-phantom', str(seed), str(case_index), *what])

  return {
      'PatientName': f'{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}',
      'PatientID': f'PH{int(rng.integers(10**6, 10**7))}',
      'PatientBirthDate': birth.strftime('%Y%m%d'),
      'PatientSex': str(sex),
      'PatientAge': f'{age:03d}Y',
      'AccessionNumber': f'A{int(rng.integers(10**8, 10**9))}',
      'InstitutionName': str(rng.choice(_INSTITUTIONS)),
      'ReferringPhysicianName': str(rng.choice(_REFERRERS)),
      'StudyDate': study_date.strftime('%Y%m%d'),
      'StudyID': str(int(rng.integers(1000, 99999))),
      'start': start,
      'StudyInstanceUID': uid('study'),
      'FrameOfReferenceUID': uid('frame'),
      'uid': uid,
  }
