"""The record schema of the converted dataset, its shard files, and the reading API.

One record per kept (non-contrast, contrast) slice pair; the features are listed in ``features()`` and in
docs/data_contracts.md. Each phase directory is a TFDS dataset directory (``dataset_info.json``,
``features.json`` and shards named ``vcect-<split>.<format>-NNNNN-of-MMMMM``) that ``tfds.builder_from_directory``
and ``tfds.data_source`` open. ArrayRecord is the default (random access for grain); TFRecord is written on
request (framed and CRC-checked as ``tf.data.TFRecordDataset`` expects; grain reads it sequentially).

Every shard is written under a temporary name and renamed when complete, so a file with a final shard name is
always whole.

Reading: ``load_split(phase_dir, split)`` returns a random-access source (``len``, ``__getitem__`` -> dict of
numpy arrays; ``case_id`` comes back as ``bytes``) that ``grain.MapDataset.source`` accepts.
"""

import json
import os
import pathlib
import struct
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

DATASET_NAME = "vcect"
SPLITS = ("train", "validation", "test")
FILE_FORMATS = ("array_record", "tfrecord")
TMP_SUFFIX = ".tmp"
VERSION = "1.0.0"
MODULE_NAME = __name__  # dataset_info.json's module_name: this module wrote the metadata
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:1"  # random access; zstd level 1 is ~5x faster than the default


def features(image_size: int) -> tfds.features.FeaturesDict:
  """The TFDS features of one record, for ``image_size`` x ``image_size`` images."""
  hw = (image_size, image_size)
  # Images as raw little-endian bytes: an int64 list (the default for integer tensors) is ~50x slower to write.
  raw = tfds.features.Encoding.BYTES
  return tfds.features.FeaturesDict({
      "pre": tfds.features.Tensor(shape=(3,) + hw, dtype=np.int16, encoding=raw),
      "post": tfds.features.Tensor(shape=hw, dtype=np.int16, encoding=raw),
      "body_mask": tfds.features.Tensor(shape=hw, dtype=np.uint8, encoding=raw),
      "labels": tfds.features.Tensor(shape=hw, dtype=np.uint8, encoding=raw),
      "case_id": tfds.features.Text(),
      "slice_index": tfds.features.Scalar(dtype=np.int32),
      "table_z_mm": tfds.features.Scalar(dtype=np.float32),
      "pixel_spacing_mm": tfds.features.Scalar(dtype=np.float32),
      "misalignment_px": tfds.features.Scalar(dtype=np.float32),
      "ecc_score": tfds.features.Scalar(dtype=np.float32),
  })


def shard_name(split: str, file_format: str, index: int, count: int) -> str:
  return f"{DATASET_NAME}-{split}.{file_format}-{index:05d}-of-{count:05d}"


# ------------------------------------------------------------------ a plain framed file (the converter's cache)


def write_framed(path: pathlib.Path, items: Iterable[bytes]) -> None:
  """Writes length-prefixed byte strings to ``path`` atomically (temporary name, then rename)."""
  tmp = path.with_name(path.name + TMP_SUFFIX)
  with open(tmp, "wb") as f:
    for item in items:
      f.write(struct.pack("<Q", len(item)))
      f.write(item)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_framed(path: pathlib.Path, skip: int = 0, take: int | None = None) -> Iterator[bytes]:
  """The byte strings of a framed file, from the ``skip``-th on (``take`` of them; all when None)."""
  with open(path, "rb") as f:
    for _ in range(skip):
      head = f.read(8)
      if len(head) < 8:
        return
      f.seek(struct.unpack("<Q", head)[0], os.SEEK_CUR)
    n_read = 0
    while (take is None or n_read < take) and (head := f.read(8)):
      (n,) = struct.unpack("<Q", head)
      yield f.read(n)
      n_read += 1


# ------------------------------------------------------------------ shards


class _ArrayRecordWriter:

  def __init__(self, path: str):
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    self._writer = array_record_module.ArrayRecordWriter(path, ARRAY_RECORD_OPTIONS)

  def write(self, record: bytes) -> None:
    self._writer.write(record)

  def close(self) -> None:
    self._writer.close()


class _TFRecordWriter:

  def __init__(self, path: str):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  # TFRecord framing with CRC32C
    self._writer = tf.io.TFRecordWriter(path)

  def write(self, record: bytes) -> None:
    self._writer.write(record)

  def close(self) -> None:
    self._writer.close()


def remove_shards(phase_dir: pathlib.Path) -> None:
  """Deletes every shard and temporary file of a phase directory (a rerun rewrites them all)."""
  if not phase_dir.exists():
    return
  for p in phase_dir.iterdir():
    if p.name.startswith(DATASET_NAME + "-") or p.name.endswith(TMP_SUFFIX):
      p.unlink()


def shard_lengths(count: int, examples_per_shard: int) -> list[int]:
  """How ``count`` records of a split are spread over shards; an empty split still gets one (empty) shard, so
  that TFDS lists it."""
  num_shards = max(1, -(-count // examples_per_shard))
  return [count // num_shards + (1 if i < count % num_shards else 0) for i in range(num_shards)]


def write_shard(path: pathlib.Path, records: Iterable[bytes], file_format: str) -> tuple[int, int]:
  """Writes one shard under a temporary name and renames it when complete.

  Returns:
    (records written, bytes written before compression).
  """
  if file_format not in FILE_FORMATS:
    raise ValueError(f"file_format must be one of {FILE_FORMATS}, not {file_format!r}")
  tmp = path.with_name(path.name + TMP_SUFFIX)
  writer = (_ArrayRecordWriter if file_format == "array_record" else _TFRecordWriter)(str(tmp))
  count = num_bytes = 0
  for record in records:
    writer.write(record)
    count += 1
    num_bytes += len(record)
  writer.close()
  os.replace(tmp, path)
  return count, num_bytes


def write_metadata(phase_dir: pathlib.Path, image_size: int, file_format: str,
                   split_lengths: dict[str, tuple[Sequence[int], int]], description: str) -> None:
  """Writes dataset_info.json and features.json so that TFDS opens ``phase_dir``."""
  template = tfds.core.ShardedFileTemplate(data_dir=phase_dir, dataset_name=DATASET_NAME,
                                           filetype_suffix=file_format)
  infos = [tfds.core.SplitInfo(name=split, shard_lengths=list(lengths), num_bytes=int(nbytes),
                               filename_template=template.replace(split=split))
           for split, (lengths, nbytes) in split_lengths.items()]
  tfds.folder_dataset.write_metadata(data_dir=phase_dir, features=features(image_size), split_infos=infos,
                                     version=VERSION, filename_template=template, check_data=False,
                                     description=description)
  # TFDS writes an empty module name, which its reader replaces with its own on every load and then logs "fields
  # info.[module_name] differ on disk and in the code" each time: name the module that wrote the records instead.
  info_path = pathlib.Path(phase_dir) / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["moduleName"] = MODULE_NAME
  info_path.write_text(json.dumps(info, indent=2))


# ------------------------------------------------------------------ reading


class _EmptySource:
  """A split with no records."""

  def __len__(self) -> int:
    return 0

  def __getitem__(self, index):
    raise IndexError(index)


class _TFRecordSource:
  """Random access over TFRecord shards: record offsets are indexed once, records decoded on demand."""

  def __init__(self, paths: Sequence[epath.Path], feature_dict: tfds.features.FeaturesDict):
    self._features = feature_dict
    self._index: list[tuple[epath.Path, int, int]] = []
    for path in paths:
      with path.open("rb") as f:
        offset = 0
        while head := f.read(12):
          (n,) = struct.unpack("<Q", head[:8])
          self._index.append((path, offset + 12, n))
          offset += 12 + n + 4
          f.seek(offset)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> dict:
    path, offset, n = self._index[index]
    with path.open("rb") as f:
      f.seek(offset)
      return self._features.deserialize_example_np(f.read(n))


def load_split(phase_dir: str | os.PathLike, split: str):
  """Random-access source over one split of a converted phase directory.

  Args:
    phase_dir: ``OUT/<phase>`` of a conversion; a local or cloud (``gs://...``) path, read through
      ``etils.epath``.
    split: ``train``, ``validation`` or ``test``.

  Returns:
    An object with ``len()`` and ``__getitem__`` returning a dict of numpy arrays keyed as in ``features()``
    (``case_id`` as bytes); ``grain.MapDataset.source(...)`` accepts it. Empty splits give an empty source.
  """
  phase_dir = epath.Path(phase_dir)
  if not (phase_dir / "dataset_info.json").exists():
    raise FileNotFoundError(f"{phase_dir} is not a converted dataset directory (no dataset_info.json); "
                            "run `python -m data_prep.convert` first")
  builder = tfds.builder_from_directory(str(phase_dir))
  if split not in builder.info.splits:
    raise KeyError(f"{phase_dir} has no split {split!r}; it has {sorted(builder.info.splits.keys())}")
  info = builder.info.splits[split]
  if info.num_examples == 0:
    return _EmptySource()
  if builder.info.file_format == tfds.core.FileFormat.TFRECORD:
    paths = [phase_dir / epath.Path(p).name for p in info.filenames] if hasattr(info, "filenames") else []
    return _TFRecordSource(paths, builder.info.features)
  return builder.as_data_source(split=split)
