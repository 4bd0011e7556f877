"""The data step of a training run: the records it reads, made when the config names none.

`ensure_dataset(config, workdir)` returns `config.data.dir` when it is set (after checking that it exists and that
its records have `config.data.image_size` pixels), else the embedded default: the synthetic phantom
(`config.data.phantom`) generated as DICOM studies and converted to records under `<workdir>/data`, once; later
runs in the same work directory reuse it while the phantom settings and the image size are unchanged.

Layout of `<workdir>/data`: `dicom/` (the phantom studies and `preview.png`; `phantom_settings.json` says what
they were made with), `converted/` (the records and `manifest.json`, what `data.dir` would name; per
cross-validation fold k `converted_fold<k>/`), `phantom.hmac_key` (fixed by the phantom seed, so that case ids and
splits are reproducible) and `settings.json` (`settings_fold<k>.json`: the settings the records were made with).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

from etils import epath

from data_prep import phases
from data_prep import progress as progress_lib

log = logging.getLogger("data_prep.prepare")

DATA_SUBDIR = "data"
MANIFEST = "manifest.json"


def phantom_settings(config) -> dict:
  """The settings that decide the embedded dataset, as they read back from JSON (tuples become lists)."""
  settings = {"phantom": _phantom_dict(config), "image_size": int(config.data.image_size)}
  if deformable_of(config) != "none":  # absent for the default, so that earlier conversions stay reusable
    settings["deformable"] = deformable_of(config)
  if through_plane_of(config) != "nearest":  # likewise
    settings["through_plane"] = through_plane_of(config)
  if fold_of(config) is not None:
    settings.update(fold=fold_of(config), num_folds=int(config.data.num_folds))
  return json.loads(json.dumps(settings))


def _phantom_dict(config) -> dict:
  """`data.phantom` as a dict, without `motion_scale` at its default 1 (so that earlier datasets stay reusable)."""
  d = config.data.phantom.to_dict()
  if float(d.get("motion_scale", 1.0)) == 1.0:
    d.pop("motion_scale", None)
  return d


def deformable_of(config) -> str:
  return str(config.data.get("deformable", "none"))


def through_plane_of(config) -> str:
  return str(config.data.get("through_plane", "nearest"))


def fold_of(config) -> int | None:
  """The cross-validation fold the config asks for (`data.fold`, -1 or absent: none)."""
  fold = int(config.data.get("fold", -1))
  if fold < 0:
    return None
  if fold >= int(config.data.num_folds):
    raise ValueError(f"config.data.fold={fold} must be below config.data.num_folds={config.data.num_folds}")
  return fold


def converted_name(config) -> str:
  """`converted`, or `converted_fold<k>` for cross-validation fold k (the phantom's DICOM is shared)."""
  fold = fold_of(config)
  return "converted" if fold is None else f"converted_fold{fold}"


def _read_json(path: epath.Path) -> dict:
  return json.loads(path.read_text())


def phase_path(data_dir, phase: str) -> epath.Path:
  """The folder of `phase`'s records in a converted dataset: the manifest's `phases.<phase>.path` (`tfds build`
  puts it under `<config>/<version>`), else `<data_dir>/<phase>`."""
  root = epath.Path(data_dir)
  manifest = root / MANIFEST
  phases = _read_json(manifest).get("phases", {}) if manifest.exists() else {}
  return root / phases.get(phase, {}).get("path", phase)


def dataset_image_size(data_dir, phase: str) -> int | None:
  """The side in pixels of the records of `phase` under `data_dir` (a conversion's output), None if unknown.

  Read from the phase's TFDS `features.json` (what the records hold), else from the manifest's settings. `data_dir`
  may be a local or a cloud (`gs://...`) path: everything is read through `etils.epath`.
  """
  features = phase_path(data_dir, phase) / "features.json"
  if features.exists():
    dims = _read_json(features)["featuresDict"]["features"]["post"]["tensor"]["shape"]["dimensions"]
    return int(dims[-1])
  manifest = epath.Path(data_dir) / MANIFEST
  if manifest.exists():
    size = _read_json(manifest).get("settings", {}).get("image_size")
    return None if size is None else int(size)
  return None


def check_dataset(config) -> str:
  """`config.data.dir`, if it exists and its records have `config.data.image_size` pixels.

  `config.data.dir` may be a local path or a cloud path (`gs://bucket/converted`), read through `etils.epath`.

  Raises:
    FileNotFoundError: the folder does not exist.
    ValueError: the records have another image size (the message names both and the flag to change).
  """
  data_dir = config.data.dir
  if not epath.Path(data_dir).is_dir():
    raise FileNotFoundError(f"config.data.dir={data_dir!r} does not exist: give the --output of "
                            "`python -m data_prep.convert`, or leave it empty for the embedded phantom")
  fold = fold_of(config)
  if fold is not None:
    manifest = epath.Path(data_dir) / MANIFEST
    have = _read_json(manifest).get("settings", {}).get("fold") if manifest.exists() else None
    if have != fold:
      raise ValueError(f"config.data.fold={fold} but config.data.dir={data_dir!r} was converted with fold={have}: "
                       f"convert with `python -m data_prep.convert --fold={fold} --num_folds={config.data.num_folds}`"
                       " into its own folder and point data.dir there")
  size, wanted = dataset_image_size(data_dir, config.phase), int(config.data.image_size)
  if size is not None and size != wanted:
    raise ValueError(f"config.data.dir={data_dir!r} holds {size} px records but config.data.image_size={wanted}: "
                     f"set --config.data.image_size={size}, or convert the data again with "
                     f"`python -m data_prep.convert --image_size={wanted}`")
  return str(data_dir)


def write_phantom_key(path: str, seed: int) -> str:
  """Writes the pseudonymisation key of phantom seed `seed` to `path` and returns `path`. The key is fixed by the
  seed, so that the phantom's case ids and splits are reproducible."""
  with open(path, "wb") as f:
    f.write(hashlib.sha256(f"vcect-phantom-{seed}".encode()).digest())
  return path


def ensure_dataset(config, workdir: str) -> str:
  """`config.data.dir` if set (checked), else the converted phantom dataset under `<workdir>/data` (made once).

  Raises:
    FileNotFoundError, ValueError: a given `data.dir` that is missing or has another image size; a phantom whose
      records of `config.phase` leave the training or validation split empty.
  """
  if config.data.dir:
    return check_dataset(config)
  if "://" in str(workdir):
    raise ValueError(
        f"config.data.dir is empty, so the phantom would be generated under {workdir}/{DATA_SUBDIR}, but DICOM "
        "conversion writes to a local disk: make it locally (--config.mode=prepare --workdir=LOCAL_DIR), copy "
        f"LOCAL_DIR/{DATA_SUBDIR}/converted to the bucket, and set --config.data.dir to the copy")
  root = os.path.join(workdir, DATA_SUBDIR)
  converted = os.path.join(root, converted_name(config))
  stamp = os.path.join(root, "settings.json" if fold_of(config) is None else f"settings_fold{fold_of(config)}.json")
  settings = phantom_settings(config)
  if os.path.exists(stamp) and os.path.exists(os.path.join(converted, MANIFEST)):
    with open(stamp) as f:
      if json.load(f) == settings:
        log.info("Reusing the phantom dataset in %s", converted)
        return _checked(converted, config)
  from data_prep import convert  # pylint: disable=import-outside-toplevel
  from data_prep import phantom  # pylint: disable=import-outside-toplevel

  p = config.data.phantom
  dicom_dir = os.path.join(root, "dicom")
  dicom_stamp = os.path.join(root, "phantom_settings.json")
  dicom_settings = json.loads(json.dumps(_phantom_dict(config)))
  shutil.rmtree(converted, ignore_errors=True)
  if os.path.exists(stamp):
    os.remove(stamp)
  os.makedirs(root, exist_ok=True)
  reuse_dicom = False
  if os.path.exists(dicom_stamp):
    with open(dicom_stamp) as f:
      reuse_dicom = json.load(f) == dicom_settings
  if reuse_dicom:
    log.info("Reusing the phantom studies in %s", dicom_dir)
  else:
    shutil.rmtree(dicom_dir, ignore_errors=True)
    log.info("No data.dir: generating %d phantom cases in %s", p.cases, dicom_dir)
    phantom.generate(dicom_dir, cases=int(p.cases), seed=int(p.seed), size=int(p.size), slices=int(p.slices),
                     slice_thickness=float(p.slice_thickness), pixel_spacing=float(p.pixel_spacing), preview=True,
                     progress=progress_lib.Progress("phantom", int(p.cases), "cases").update,
                     motion_scale=float(p.get("motion_scale", 1.0)))
    with open(dicom_stamp, "w") as f:
      json.dump(dicom_settings, f)
  log.info("Converting the phantom to records in %s", converted)
  key_file = write_phantom_key(os.path.join(root, "phantom.hmac_key"), int(p.seed))
  convert.run(convert.Settings(input=dicom_dir, output=converted, phases=phases.CONTRAST_PHASES,
                               image_size=int(config.data.image_size), key_file=key_file,
                               split_fractions=tuple(p.split_fractions), split_method="rank",
                               fold=fold_of(config), num_folds=int(config.data.get("num_folds", 5)),
                               deformable=deformable_of(config), through_plane=through_plane_of(config)))
  with open(stamp, "w") as f:
    json.dump(settings, f)
  return _checked(converted, config)


def _checked(converted: str, config) -> str:
  """The phantom dataset, if the configured phase has training and validation examples."""
  with open(os.path.join(converted, MANIFEST)) as f:
    splits = json.load(f)["phases"][config.phase]["splits"]
  empty = [s for s in ("train", "validation") if not splits[s]["examples"]]
  if empty:
    raise ValueError(f"the phantom's {config.phase} records have no {' or '.join(empty)} examples "
                     f"({config.data.phantom.cases} cases): raise --config.data.phantom.cases")
  return converted
