r"""TFDS dataset builder wrapping `data_prep.convert`, so that `tfds build` produces the same records.

  tfds build data_prep/vcect_dataset --manual_dir=DICOM_ROOT --config=arterial [--data_dir=DIR] \
      [--beam_pipeline_options="runner=DataflowRunner,..."]

One config per contrast phase (`arterial`, `portal`, `delayed`, 256 px as in the paper; `<phase>_512` keeps the
original size). Scanning, phase rules (defaults), pairing, alignment and exclusion are those of the converter; the
split of a case is the same function of its case id. When apache_beam is installed, the per-case conversion runs as
a Beam transform (`beam.Create(cases) | beam.FlatMap(convert)`), so the Beam runner spreads cases over a cluster;
otherwise cases run one after the other in this process.

The HMAC key comes from the file named by the environment variable VCECT_HMAC_KEY_FILE, else from
`<DICOM_ROOT>.hmac_key` beside the DICOM root (created if missing): never inside the generated dataset.
TFDS decides the shard layout (TFRecord unless `--file_format=array_record`). After the build, the builder adds
`<data_dir>/vcect_dataset/manifest.json` (one entry per phase built there, pointing at `<config>/<version>`), so
that `--config.data.dir=<data_dir>/vcect_dataset` trains on it as on the converter's output. The converter's
per-case statistics and skip reasons are not collected under Beam: the manifest lists none.

Beam's DirectRunner first tries to download its Prism runner binary from GitHub; the build runs local pipelines on
the FnApiRunner instead (what the DirectRunner runs batch pipelines on after that attempt), so it reaches for no
network. `direct_num_workers` and `direct_running_mode` keep working; other runners (Dataflow, Flink, Spark) are
used as given.
"""

import dataclasses
import functools
import json
import logging
import os
import pathlib

import tensorflow_datasets as tfds
from etils import epath

from data_prep import convert
from data_prep import dicom_io
from data_prep import phases as phases_lib
from data_prep import privacy
from data_prep import records
from data_prep.convert import shards

log = logging.getLogger("data_prep.vcect_dataset")
# Beam logs every string type hint it meets at INFO (dozens of lines per split): keep its warnings only.
logging.getLogger("apache_beam.typehints.native_type_compatibility").setLevel(logging.WARNING)
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner")


@dataclasses.dataclass
class VcectConfig(tfds.core.BuilderConfig):
  phase: str = "arterial"
  image_size: int = 256
  max_misalignment_px: float = 6.0


def _configs():
  out = []
  for phase in phases_lib.CONTRAST_PHASES:
    out.append(VcectConfig(name=phase, phase=phase, description=f"non-contrast / {phase} pairs, 256 px"))
    out.append(VcectConfig(name=f"{phase}_512", phase=phase, image_size=512,
                           description=f"non-contrast / {phase} pairs, 512 px"))
  return out


def _key(manual_dir: pathlib.Path) -> bytes:
  key_file = os.environ.get("VCECT_HMAC_KEY_FILE")
  if key_file:
    return privacy.load_or_create_key(manual_dir.parent / "__unused__", key_file)[0]
  # The key lives beside the DICOM root: outside every output directory.
  return privacy.load_or_create_key(manual_dir)[0]


class Builder(tfds.core.GeneratorBasedBuilder):
  """Paired, aligned non-contrast / contrast CT slices (vcect-jax)."""

  VERSION = tfds.core.Version(records.VERSION)
  RELEASE_NOTES = {records.VERSION: "First release."}
  BUILDER_CONFIGS = _configs()
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the DICOM studies (any folder layout, any file names) under manual_dir, e.g. the output of "
      "`python -m data_prep.phantom --out DIR`, and pass --manual_dir=DIR.")

  def download_and_prepare(self, *, download_config=None, **kwargs):  # pylint: disable=arguments-differ
    """TFDS's build, on a local Beam runner that needs no network, then the manifest that training reads."""
    download_config = download_config or tfds.download.DownloadConfig()
    _offline_local_runner(download_config)
    super().download_and_prepare(download_config=download_config, **kwargs)
    path = write_manifest(self)
    log.info("wrote %s; train on it with --config.data.dir=%s", path, path.parent)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=records.features(self.builder_config.image_size),
                                          homepage="https://github.com/", disable_shuffling=False)

  def _settings(self, manual_dir: pathlib.Path) -> convert.Settings:
    c = self.builder_config
    return convert.Settings(input=str(manual_dir), output=str(manual_dir), phases=(c.phase,),
                            image_size=c.image_size, max_misalignment_px=c.max_misalignment_px)

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    settings = self._settings(manual_dir)
    studies, _ = dicom_io.scan(manual_dir)
    cases, _ = convert.plan_cases(studies, phases_lib.PhaseRules(), manual_dir, _key(manual_dir), settings)
    # TFDS cannot write a split without examples: only splits that hold cases are generated.
    by_split = {split: [c for c in cases if c.split == split] for split in records.SPLITS}
    return {split: self._generate_examples(members, settings) for split, members in by_split.items() if members}

  def _generate_examples(self, cases, settings):
    """A Beam transform when apache_beam is installed, else a generator of (key, example)."""
    try:
      import apache_beam as beam  # pylint: disable=import-outside-toplevel
    except ImportError:
      return (item for plan in cases for item in convert.case_examples(plan, settings))
    # A function of an importable module (not of this file, which `tfds build` loads by path as a top-level
    # module that Beam workers cannot import).
    return beam.Create(cases) | f"convert_{settings.phases[0]}" >> beam.FlatMap(
        functools.partial(convert.case_examples, settings=settings))


def _offline_local_runner(download_config) -> None:
  """Runs a local Beam pipeline on the FnApiRunner: the DirectRunner would first try to download the Prism runner
  from GitHub (and fall back to the FnApiRunner when offline). Explicit options also spare TFDS's warning banner
  and Beam's parsing of the `tfds` command line as pipeline options."""
  if download_config.beam_runner is not None:
    return
  try:
    from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  options = download_config.beam_options or pipeline_options.PipelineOptions(flags=[])
  standard = options.view_as(pipeline_options.StandardOptions)
  if standard.runner in (None, *LOCAL_RUNNERS):
    standard.runner = "FnApiRunner"
  download_config.beam_options = options


def write_manifest(builder: "Builder") -> epath.Path:
  """Adds the built config's phase to `<data_dir>/vcect_dataset/manifest.json` (created if missing) and returns
  its path. The converter's manifest layout: `phases.<phase>.path` names the TFDS folder of the phase's records."""
  version_dir = epath.Path(builder.data_dir)
  root = version_dir.parent.parent
  path = root / shards.MANIFEST
  manifest = json.loads(path.read_text()) if path.exists() else {
      "format_version": shards.MANIFEST_VERSION, "written_by": "tfds build data_prep/vcect_dataset",
      "settings": {}, "skipped_files": [], "skipped_series": [], "phases": {}}
  c = builder.builder_config
  info = builder.info
  previous = manifest["phases"].get(c.phase, {}).get("config")
  if previous and previous != c.name:
    log.warning("manifest %s: phase %s now points at config %s (was %s)", path, c.phase, c.name, previous)
  manifest["phases"][c.phase] = {
      "path": str(version_dir.relative_to(root)),
      "config": c.name,
      "image_size": c.image_size,
      "file_format": info.file_format.value if info.file_format else "tfrecord",
      "splits": {name: {"examples": split.num_examples, "shards": split.num_shards}
                 for name, split in info.splits.items()},
      "cases": {}, "excluded_pairs": [], "skipped_cases": [],
  }
  manifest["settings"] = {"image_size": c.image_size, "max_misalignment_px": c.max_misalignment_px}
  path.write_text(json.dumps(manifest, indent=1))
  return path
