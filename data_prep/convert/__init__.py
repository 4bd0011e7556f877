r"""Offline conversion: DICOM studies -> paired, aligned 2.5D records in sharded TFDS format (paper section 4.2).

  python -m data_prep.convert --input=DICOM_ROOT --output=OUT \
      [--phases=arterial,portal,delayed] [--image_size=256] [--file_format=array_record|tfrecord] [--workers=N] \
      [--max_misalignment_px=6] [--phase_rules=FILE | --series_csv=FILE] [--key_file=FILE]

Writes ``OUT/<phase>/`` (a TFDS dataset directory, read with ``data_prep.records.load_split``) and
``OUT/manifest.json``. The HMAC key for case ids is ``--key_file`` or ``OUT.hmac_key`` beside ``OUT``.

How a run is organised, so that a killed run can be rerun to the same result:
1. scan the input, decide phases, assign each case its id and split (cheap, in this process: `plan`);
2. convert cases in parallel (``--workers`` processes, one case at a time each: `case`); a finished case leaves
   its serialized records and a summary in ``OUT/.cache/<settings hash>/``, written under temporary names and
   renamed when complete, so a rerun reuses finished cases and redoes the rest;
3. write every shard from the cache in a fixed order (temporary name, then rename), the TFDS metadata, and the
   manifest; then delete the cache (`shards`).

Modules: `plan` (settings, cases, splits), `case` (one case's records), `shards` (cache, shards, manifest),
`job` (`run`: the three steps, the worker pool), `cli` (the command line).
"""

from data_prep.convert.case import CaseContext
from data_prep.convert.case import case_examples
from data_prep.convert.case import convert_case
from data_prep.convert.cli import main
from data_prep.convert.cli import parse_args
from data_prep.convert.job import run
from data_prep.convert.plan import CasePlan
from data_prep.convert.plan import Settings
from data_prep.convert.plan import assign_split
from data_prep.convert.plan import balance_splits
from data_prep.convert.plan import plan_cases
from data_prep.convert.shards import CACHE_DIR
from data_prep.convert.shards import MANIFEST
from data_prep.convert.shards import MANIFEST_VERSION
from data_prep.convert.shards import read_manifest

__all__ = [
    "CACHE_DIR", "MANIFEST", "MANIFEST_VERSION", "CaseContext", "CasePlan", "Settings", "assign_split",
    "balance_splits", "case_examples", "convert_case", "main", "parse_args", "plan_cases", "read_manifest", "run",
]
