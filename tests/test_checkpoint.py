"""Checkpoints: save/restore round trip, latest step, config round trip, fallback past a damaged step, and
restoring only the generator of a training run."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vcect_jax import checkpoint as ckpt_lib
from vcect_jax import models
from vcect_jax import train


class _Tiny(nnx.Module):
  def __init__(self, seed):
    self.dense = nnx.Linear(3, 2, rngs=nnx.Rngs(seed))


def _config():
  return ml_collections.ConfigDict({"phase": "arterial", "train": {"steps": 3}, "window": (30.0, 400.0)})


def _save_steps(directory, steps):
  checkpointer = ckpt_lib.Checkpointer(directory, keep=5, async_save=False)
  states = {}
  for step in steps:
    state = nnx.state(_Tiny(step))
    checkpointer.save(step, state, {"position": step}, _config())
    states[step] = jax.tree.map(np.asarray, state.to_pure_dict())
  checkpointer.close()
  return states


def test_save_restore_latest_step_and_config_round_trip(tmp_path):
  directory = str(tmp_path / "checkpoints")
  saved = _save_steps(directory, [1, 2])
  checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
  assert checkpointer.latest_step() == 2
  step, state, iter_state = checkpointer.restore_latest(nnx.state(_Tiny(99)))
  checkpointer.close()
  assert step == 2 and iter_state == {"position": 2}
  for a, b in zip(jax.tree.leaves(saved[2]), jax.tree.leaves(state.to_pure_dict())):
    np.testing.assert_array_equal(a, b)
  config = ckpt_lib.read_config(directory)
  assert config.phase == "arterial" and config.train.steps == 3 and tuple(config.window) == (30.0, 400.0)


def _corrupt_arrays(step_dir):
  """Flips bytes in every array data file of a step (a disk fault or a copy cut short)."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and os.sep + "d" + os.sep in f]
  assert files, "expected OCDBT data files"
  for path in files:
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      for i in range(0, len(data), 7):
        data[i] ^= 0xFF
      f.seek(0)
      f.write(bytes(data))


def test_restore_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  saved = _save_steps(directory, [1, 2])
  _corrupt_arrays(os.path.join(directory, "2"))
  checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
  step, state, _ = checkpointer.restore_latest(nnx.state(_Tiny(99)))
  assert step == 1
  for a, b in zip(jax.tree.leaves(saved[1]), jax.tree.leaves(state.to_pure_dict())):
    np.testing.assert_array_equal(a, b)
  assert "step 2" in caplog.text
  # The unreadable step is set aside, so the resumed run can save step 2 again.
  assert os.path.isdir(directory + ".damaged/2") and not os.path.exists(os.path.join(directory, "2"))
  checkpointer.save(2, state, {"position": 2}, _config())
  checkpointer.close()


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _save_steps(directory, [1])
  _corrupt_arrays(os.path.join(directory, "1"))
  checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
  with pytest.raises(ValueError, match="no checkpoint in .* can be restored"):
    checkpointer.restore_latest(nnx.state(_Tiny(99)))
  checkpointer.close()


def test_resolve_and_missing_checkpoint(tmp_path):
  directory = str(tmp_path / "run" / "checkpoints")
  _save_steps(directory, [3])
  assert ckpt_lib.resolve(str(tmp_path / "run")) == (directory, None)
  assert ckpt_lib.resolve(directory) == (directory, None)
  assert ckpt_lib.resolve(os.path.join(directory, "3")) == (directory, 3)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ckpt_lib.resolve(str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def trained_run(smoke_workdir, tmp_path_factory):
  from tests.conftest import smoke_config  # pylint: disable=import-outside-toplevel

  config = smoke_config()
  config.data.dir = smoke_workdir["data_dir"]
  config.perceptual.pretext_checkpoint = smoke_workdir["pretext"]
  config.train.steps, config.train.async_checkpoints, config.train.checkpoint_every = 3, False, 1
  workdir = str(tmp_path_factory.mktemp("trained"))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_load_generator_restores_only_the_generator(trained_run):
  config, workdir, result = trained_run
  loaded = ckpt_lib.load_generator(workdir)
  assert loaded.step == 3 and loaded.config.phase == config.phase
  assert loaded.path.endswith(os.path.join("checkpoints", "3"))
  want = jax.tree.leaves(result["state"]["generators"]["global_net"])
  got = jax.tree.leaves(nnx.state(loaded.generator).to_pure_dict())
  assert len(want) == len(got) > 0
  for a, b in zip(want, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  pre = np.zeros((1, config.data.image_size, config.data.image_size, 3), np.float32)
  assert loaded.generator(pre).shape == (1, config.data.image_size, config.data.image_size, 1)
  assert isinstance(loaded.generator, models.Generator)
  # One step folder works as well as the work directory.
  assert ckpt_lib.load_generator(os.path.join(workdir, "checkpoints", "3")).step == 3


def test_a_mixed_precision_run_infers_in_float32_on_cpu(trained_run, tmp_path):
  """A checkpoint whose config says compute_dtype bfloat16 restores the same float32 parameters into a generator
  that computes in float32 on CPU (bf16 there is slower and rounds the image); the returned config is the run's."""
  import shutil  # pylint: disable=import-outside-toplevel

  config, workdir, _ = trained_run
  copy = str(tmp_path / "bf16")
  shutil.copytree(workdir, copy)
  meta = os.path.join(copy, "checkpoints", "3", "config", "metadata")
  with open(meta) as f:
    stored = json.load(f)
  stored["model"]["compute_dtype"] = "bfloat16"
  for net in ("generator", "discriminator"):
    stored["model"][net]["compute_dtype"] = "bfloat16"
  with open(meta, "w") as f:
    json.dump(stored, f)
  loaded, reference = ckpt_lib.load_generator(copy), ckpt_lib.load_generator(workdir)
  assert loaded.config.model.compute_dtype == "bfloat16"             # what the run was trained with
  assert loaded.generator.dtype == reference.generator.dtype and loaded.generator.dtype != jnp.bfloat16
  pre = np.random.default_rng(0).uniform(-1, 1, (1, config.data.image_size, config.data.image_size, 3))
  np.testing.assert_array_equal(np.asarray(loaded.generator(pre.astype(np.float32))),
                                np.asarray(reference.generator(pre.astype(np.float32))))
  # On an accelerator the run's mixed precision stays.
  assert ckpt_lib.inference_config(loaded.config, backend="gpu").model.generator.compute_dtype == "bfloat16"
  assert ckpt_lib.inference_config(loaded.config, backend="cpu").model.generator.compute_dtype == "float32"


def test_training_resumes_past_a_damaged_checkpoint(trained_run, tmp_path):
  """The loop warns and resumes from the newest checkpoint that restores, then finishes the run."""
  import shutil  # pylint: disable=import-outside-toplevel

  config, workdir, _ = trained_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  steps = sorted(int(d) for d in os.listdir(os.path.join(copy, "checkpoints")) if d.isdigit())
  _corrupt_arrays(os.path.join(copy, "checkpoints", str(steps[-1])))
  config.train.steps = 4
  result = train.train_and_evaluate(config, copy)
  assert result["step"] == 4
  assert steps == [2, 3]
  assert os.path.isdir(os.path.join(copy, "checkpoints.damaged", "3"))
  assert sorted(int(d) for d in os.listdir(os.path.join(copy, "checkpoints")) if d.isdigit())[-1] == 4


def test_paths_may_be_str_pathlike_or_cloud_urls(tmp_path):
  """Workdirs and checkpoints go through etils.epath (gs:// in the cloud): the same code on local paths given as
  str, pathlib.Path and epath.Path; cloud URLs are kept as they are (never made 'absolute' against the cwd)."""
  import pathlib  # pylint: disable=import-outside-toplevel

  from etils import epath  # pylint: disable=import-outside-toplevel

  directory = str(tmp_path / "run" / "checkpoints")
  _save_steps(epath.Path(directory), [3])
  for run in (str(tmp_path / "run"), pathlib.Path(tmp_path / "run"), epath.Path(tmp_path / "run")):
    assert ckpt_lib.resolve(run) == (directory, None)
    assert ckpt_lib.resolve(epath.Path(directory) / "3") == (directory, 3)
    assert ckpt_lib.read_config(ckpt_lib.resolve(run)[0]).phase == "arterial"
  assert ckpt_lib.absolute("gs://bucket/runs/arterial/") == "gs://bucket/runs/arterial"
  assert ckpt_lib.absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
  from vcect_jax import pretrain  # pylint: disable=import-outside-toplevel

  assert pretrain.export_path("gs://bucket/run") == "gs://bucket/run/pretext"


def test_the_embedded_phantom_needs_a_local_workdir():
  from data_prep import prepare  # pylint: disable=import-outside-toplevel
  from tests.conftest import smoke_config  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match="set --config.data.dir"):
    prepare.ensure_dataset(smoke_config(), "gs://bucket/run")
