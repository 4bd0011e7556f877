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
Unlike `python -m data_prep.convert`, TFDS decides the shard layout and writes no manifest.json.
"""

import dataclasses
import functools
import os
import pathlib

import tensorflow_datasets as tfds

from data_prep import convert
from data_prep import dicom_io
from data_prep import phases as phases_lib
from data_prep import privacy
from data_prep import records


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
