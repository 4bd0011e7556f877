"""Pseudonymous case identifiers for the converted dataset.

Records, the manifest and the logs carry only keyed hashes (HMAC-SHA256) of patient and study identities, never
the identities themselves. The key is either given by the user or generated once and stored *beside* the output
directory (``OUT.hmac_key`` next to ``OUT``), never inside it, so that a dataset can be shared without the key
and a rerun with the same key reproduces the same case ids and the same splits.
"""

import hashlib
import hmac
import os
import pathlib
import secrets

KEY_BYTES = 32


def default_key_path(output_dir: str | os.PathLike) -> pathlib.Path:
  """Where a generated key lives: a sibling file of the output directory, ``<OUT>.hmac_key``."""
  out = pathlib.Path(output_dir).resolve()
  return out.parent / (out.name + ".hmac_key")


def load_or_create_key(output_dir: str | os.PathLike, key_file: str | os.PathLike | None = None) -> tuple[bytes, pathlib.Path]:
  """Returns the HMAC key and the file that holds it.

  Args:
    output_dir: the conversion's output directory; the key file may not be inside it.
    key_file: a user-given key file (raw bytes or hex text). When None, ``default_key_path(output_dir)`` is read,
      or created with a fresh random key (mode 0600) if missing.

  Raises:
    ValueError: the key file is inside the output directory, or empty.
  """
  out = pathlib.Path(output_dir).resolve()
  path = pathlib.Path(key_file).resolve() if key_file else default_key_path(out)
  if path == out or out in path.parents:
    raise ValueError(f"the HMAC key file {path} must not be inside the output directory {out}")
  if path.exists():
    raw = path.read_bytes().strip()
    if not raw:
      raise ValueError(f"the HMAC key file {path} is empty")
    try:
      return bytes.fromhex(raw.decode("ascii")), path
    except (UnicodeDecodeError, ValueError):
      return raw, path
  if key_file:
    raise ValueError(f"the HMAC key file {path} does not exist")
  path.parent.mkdir(parents=True, exist_ok=True)
  key = secrets.token_bytes(KEY_BYTES)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  with os.fdopen(fd, "w") as f:
    f.write(key.hex() + "\n")
  os.replace(tmp, path)
  return key, path


def keyed_hash(key: bytes, value: str, length: int = 16) -> str:
  """HMAC-SHA256 of ``value`` under ``key``, as ``length`` hex characters."""
  return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


def patient_identity(patient_id: str, patient_name: str, birth_date: str, fallback: str) -> str:
  """The string whose keyed hash is the case id: the patient's ID, name and birth date.

  ``fallback`` (e.g. the study UID) is used when all three are empty, so anonymised studies stay distinct.
  """
  parts = [str(patient_id or "").strip(), str(patient_name or "").strip(), str(birth_date or "").strip()]
  if not any(parts):
    return "study:" + fallback
  return "patient:" + "|".join(parts)


def case_id(key: bytes, identity: str) -> str:
  """The case id written to records: a keyed hash of the patient identity."""
  return keyed_hash(key, identity, 16)


def split_fraction(case: str, seed: int = 0) -> float:
  """A deterministic number in [0, 1) from a case id, used to assign splits and folds."""
  digest = hashlib.sha256(f"{seed}:{case}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64
