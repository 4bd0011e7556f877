"""Dual-path GAN training: end to end, exact resume, multi-device equivalence, gradients, ablations, guards."""

import glob
import json
import os
import socket
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest
from flax import nnx

from tests.conftest import smoke_config
from vcect_jax import methods
from vcect_jax import models
from vcect_jax import pretrain
from vcect_jax import runtime
from vcect_jax import sharding
from vcect_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_batch(config, batch=2, seed=0):
  size = config.data.image_size
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"pre": jax.random.uniform(k1, (batch, size, size, 3), minval=-1, maxval=1),
          "post": jax.random.uniform(k2, (batch, size, size, 1), minval=-1, maxval=1)}


def _one_step(config):
  """Builds the method's state and runs one jitted train step on a random batch: (state before, after, metrics).

  The pretext encoder is a random one, so no pretext checkpoint is needed.
  """
  config.perceptual.init_generator = False
  method = methods.create(config)
  config.perceptual.pretext_checkpoint = "unused"
  with mock.patch.object(pretrain, "load_pretext_encoder",
                         lambda *_: models.IntensityClassifier(config.model, rngs=nnx.Rngs(5)).encoder):
    module = method.create_state(steps_per_epoch=10)
  graphdef, state = nnx.split(module)
  before = jax.tree.map(np.array, state)
  step = train.jit_train_step(method, graphdef, sharding.make_mesh())
  after, metrics = step(state, _random_batch(config))
  return before, jax.device_get(after), jax.device_get(metrics)


def _generator_param_leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.filter_state(state["generators"], nnx.Param))]


def test_gradient_reaches_generator_through_local_path():
  config = smoke_config()
  config.train.weight_decay = 0.0
  config.loss.use_discriminator = False
  config.loss.use_perceptual = False
  config.dual_path.global_weight = 0.0
  config.dual_path.local_weight = 1.0
  before, after, _ = _one_step(config)
  changed = [not np.array_equal(a, b) for a, b in zip(_generator_param_leaves(before),
                                                       _generator_param_leaves(after))]
  assert all(changed), "every generator parameter gets a gradient from the local path alone"
  # Control: with both path weights at zero nothing may move, so the change above came from the local path.
  config.dual_path.local_weight = 0.0
  before, after, _ = _one_step(config)
  for a, b in zip(_generator_param_leaves(before), _generator_param_leaves(after)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("toggle,absent,present", [
    (None, (), ("d_loss", "g_adv_global", "g_adv_local", "g_perc_global", "g_perc_local", "g_pixel_local")),
    ("loss.use_discriminator", ("d_loss", "d_real", "g_adv_global", "g_adv_local"), ("g_perc_global",)),
    ("loss.use_perceptual", ("g_perc_global", "g_perc_local", "g_perc_global_block1"), ("g_adv_global",)),
    ("dual_path.enabled", ("g_pixel_local", "g_adv_local", "g_perc_local", "d_fake_local"),
     ("g_pixel_global", "d_fake_global")),
])
def test_ablation_toggles_change_loss_terms(toggle, absent, present):
  config = smoke_config()
  if toggle:
    section, field = toggle.split(".")
    config[section][field] = False
  _, _, metrics = _one_step(config)
  for key in absent:
    assert key not in metrics
  for key in present:
    assert key in metrics and np.isfinite(metrics[key])
  if toggle is None:
    assert {f"g_perc_global_block{j}" for j in range(1, 5)} <= set(metrics)


def test_dual_path_combines_paths_with_paper_weights():
  config = smoke_config()
  _, _, m = _one_step(config)
  np.testing.assert_allclose(m["g_loss"], 0.6 * m["g_total_global"] + 0.4 * m["g_total_local"], rtol=1e-5)
  np.testing.assert_allclose(
      m["g_total_global"], m["g_adv_global"] + m["g_pixel_global"] + m["g_perc_global"], rtol=1e-5)


def test_demo_loss_recipe_inside_the_step():
  # The `:demo` recipe: L1 pixel term with the gradient difference term, adversarial warm-up (first step at 1/4
  # weight), residual output from zero.
  config = smoke_config()
  config.loss.pixel, config.loss.adversarial_warmup_steps, config.loss.pixel_weight = "l1", 4, 100.0
  config.loss.pixel_gradient_weight = 1.0
  config.model.generator.residual = True
  _, _, m = _one_step(config)
  np.testing.assert_allclose(
      m["g_total_global"], 0.25 * m["g_adv_global"] + 100.0 * m["g_pixel_global"] + m["g_perc_global"], rtol=1e-5)
  # The untrained residual generator is the identity, so the pixel term is the L1 of middle slice vs target plus
  # the mean L1 of the finite differences of their difference.
  batch = _random_batch(config)
  d = batch["pre"][..., 1:2] - batch["post"]
  gradient = 0.5 * (np.abs(np.diff(d, axis=1)).mean() + np.abs(np.diff(d, axis=2)).mean())
  np.testing.assert_allclose(m["g_pixel_global"], np.abs(d).mean() + gradient, rtol=1e-5)


def test_shared_generator_running_statistics_follow_the_whole_images():
  """The local path's quadrants are normalised with their own batch statistics, but only the global path's call on
  the whole images moves the shared generator's BatchNorm running averages (which evaluation and inference use on
  whole images): after one step they are those of one training-mode call on the batch's whole images."""
  config = smoke_config()
  assert config.dual_path.enabled and config.dual_path.shared_generator
  before, after, _ = _one_step(config)
  initial = [np.array(x) for x in jax.tree.leaves(nnx.filter_state(before["generators"]["global_net"],
                                                                   nnx.BatchStat))]
  generator = models.Generator(config.model.generator, rngs=nnx.Rngs(0))
  nnx.update(generator, jax.tree.map(jax.numpy.asarray, before["generators"]["global_net"]))
  generator.train()
  generator(_random_batch(config)["pre"])   # the whole images only
  expected = jax.tree.leaves(nnx.state(generator, nnx.BatchStat))
  got = jax.tree.leaves(nnx.filter_state(after["generators"]["global_net"], nnx.BatchStat))
  assert len(expected) == len(got) == len(initial) > 0
  for e, g, i in zip(expected, got, initial):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  assert any(not np.allclose(g, i) for g, i in zip(got, initial))   # the step did move them


def test_ema_generator_averages_the_trained_one():
  """`train.ema_decay`: after one step the average is d * initial + (1 - d) * trained, d = min(decay, 2 / 11);
  BatchNorm statistics are the trained generator's; evaluation uses the average (`method.generator`)."""
  config = smoke_config()
  config.train.ema_decay = 0.9
  before, after, _ = _one_step(config)
  d = min(0.9, 2.0 / 11.0)
  live0 = nnx.filter_state(before["generators"]["global_net"], nnx.Param)
  live1 = nnx.filter_state(after["generators"]["global_net"], nnx.Param)
  ema1 = nnx.filter_state(after["ema"], nnx.Param)
  changed = 0
  for a, b, e in zip(jax.tree.leaves(live0), jax.tree.leaves(live1), jax.tree.leaves(ema1)):
    np.testing.assert_allclose(e, d * np.asarray(a) + (1 - d) * np.asarray(b), rtol=1e-5, atol=1e-7)
    changed += int(not np.allclose(e, b))
  assert changed > 0   # the average is not the trained generator
  for s_live, s_ema in zip(jax.tree.leaves(nnx.filter_state(after["generators"]["global_net"], nnx.BatchStat)),
                           jax.tree.leaves(nnx.filter_state(after["ema"], nnx.BatchStat))):
    np.testing.assert_array_equal(s_live, s_ema)
  method = methods.create(config)
  assert method.generator_key == ("ema",)
  config.train.ema_decay = 0.0
  assert methods.create(config).generator_key == ("generators", "global_net")   # off: the trained generator


def test_ema_checkpoint_exports_the_average(smoke, tmp_path):
  """A run with `train.ema_decay` checkpoints the average, and `load_generator` (inference) restores it."""
  from vcect_jax import checkpoint  # pylint: disable=g-import-not-at-top
  smoke.train.ema_decay = 0.5
  smoke.train.eval_every = smoke.train.image_every = 100
  smoke.train.async_checkpoints = False
  result = train.train_and_evaluate(smoke, str(tmp_path / "run"))
  loaded = checkpoint.load_generator(str(tmp_path / "run"))
  ours = jax.tree.leaves(nnx.state(loaded.generator, nnx.Param))
  ema = jax.tree.leaves(nnx.filter_state(result["state"]["ema"], nnx.Param))
  live = jax.tree.leaves(nnx.filter_state(result["state"]["generators"]["global_net"], nnx.Param))
  assert len(ours) == len(ema) == len(live)
  for a, b in zip(ours, ema):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.allclose(a, b) for a, b in zip(ema, live))


def _event_tags(workdir):
  from tensorboard.backend.event_processing import event_accumulator

  tags = set()
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags |= set(acc.Tags()["tensors"]) | set(acc.Tags()["images"])
  return tags


def test_smoke_end_to_end_from_fresh_workdir(tmp_path):
  """Phantom -> conversion -> pretext -> training, from nothing but the smoke config (what main runs)."""
  config = smoke_config()
  workdir = str(tmp_path / "run")
  result = runtime.dispatch(config, workdir)
  assert result["step"] == config.train.steps
  assert os.path.exists(os.path.join(workdir, "data", "converted", "manifest.json"))
  assert os.path.isdir(os.path.join(workdir, "pretrain"))
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == config.train.steps and len(steps) <= config.train.keep_checkpoints
  tags = _event_tags(workdir)
  for tag in ("train_g_loss", "train_d_loss", "train_g_adv_global", "train_g_perc_local", "train_g_pixel_global",
              "train_lr_generator", "train_lr_discriminator", "steps_per_sec", "eval_psnr", "eval_ssim",
              "eval_mae_hu"):
    assert tag in tags, f"missing summary {tag}; have {sorted(tags)}"
  assert any(t.startswith("pre_virtual_real_absdiff") for t in tags)
  assert any(t.startswith("perceptual_heatmaps") for t in tags)
  assert np.isfinite(result["eval"]["psnr"]) and 0 <= result["eval"]["ssim"] <= 1


def test_exact_resume_is_bit_identical(smoke, tmp_path):
  """2N steps in one go == N steps, stop, resume to 2N (same generator parameters, bit for bit)."""
  smoke.train.steps = 4
  smoke.train.checkpoint_every = 2
  smoke.train.eval_every = smoke.train.image_every = 100
  smoke.train.async_checkpoints = False
  straight = train.train_and_evaluate(smoke, str(tmp_path / "straight"))
  smoke.train.steps = 2
  first = train.train_and_evaluate(smoke, str(tmp_path / "resumed"))
  assert first["step"] == 2
  smoke.train.steps = 4
  resumed = train.train_and_evaluate(smoke, str(tmp_path / "resumed"))
  assert resumed["step"] == 4
  a, b = _generator_param_leaves(straight["state"]), _generator_param_leaves(resumed["state"])
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # And the resumed half really trained: its parameters moved away from the step-2 ones.
  assert any(not np.array_equal(x, y) for x, y in zip(_generator_param_leaves(first["state"]), b))


_FIRST_STEP = """
import json, sys
from tests.conftest import smoke_config
from vcect_jax import runtime, train
config = smoke_config()
config.data.dir, config.perceptual.pretext_checkpoint = sys.argv[1], sys.argv[2]
config.train.batch_size, config.train.steps, config.train.log_every = 4, 1, 1
config.train.eval_every = config.train.image_every = config.train.checkpoint_every = 100
if len(sys.argv) > 4:  # coordinator address, process count, process id: a multi-process (multi-host) run
  config.distributed.enabled = True
  config.distributed.coordinator_address = sys.argv[4]
  config.distributed.num_processes, config.distributed.process_id = int(sys.argv[5]), int(sys.argv[6])
runtime.initialize(config)
import jax
result = train.train_and_evaluate(config, sys.argv[3])
print("RESULT" + json.dumps({"devices": jax.device_count(), "processes": jax.process_count(),
                             "train": result["train"], "eval": result["eval"]}))
"""


def _first_step_processes(devices, smoke_workdir, workdir, processes=1):
  """Step 1 of a smoke run with `devices` CPU devices per process, in `processes` processes; their results."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  args = [sys.executable, "-c", _FIRST_STEP, smoke_workdir["data_dir"], smoke_workdir["pretext"], workdir]
  if processes > 1:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    runs = [args + [f"localhost:{port}", str(processes), str(i)] for i in range(processes)]
  else:
    runs = [args]
  procs = [subprocess.Popen(r, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for r in runs]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    line = [l for l in out.splitlines() if l.startswith("RESULT")][-1]
    results.append(json.loads(line[len("RESULT"):]))
  return results


@pytest.fixture(scope="module")
def one_device_first_step(smoke_workdir, tmp_path_factory):
  return _first_step_processes(1, smoke_workdir, str(tmp_path_factory.mktemp("one_device")))[0]


_COMPARED = ("g_loss", "d_loss", "g_adv_global", "g_perc_local", "g_pixel_global")


def test_four_devices_match_one_device(one_device_first_step, smoke_workdir, tmp_path):
  one = one_device_first_step
  (four,) = _first_step_processes(4, smoke_workdir, str(tmp_path / "four"))
  assert (one["devices"], four["devices"]) == (1, 4)
  for key in _COMPARED:
    np.testing.assert_allclose(four["train"][key], one["train"][key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_two_processes_match_one_device(one_device_first_step, smoke_workdir, tmp_path):
  """A multi-host run on one machine: 2 processes x 2 CPU devices joined by jax.distributed (gloo collectives).

  Each process reads its half of every batch; losses at step 1 and the validation metrics (which cover both
  processes' examples) equal the single-device run's.
  """
  one = one_device_first_step
  results = _first_step_processes(2, smoke_workdir, str(tmp_path / "two_hosts"), processes=2)
  assert [(r["devices"], r["processes"]) for r in results] == [(4, 2), (4, 2)]
  for r in results:
    for key in _COMPARED:
      np.testing.assert_allclose(r["train"][key], one["train"][key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert r["eval"].keys() == one["eval"].keys() and one["eval"]
    for key in one["eval"]:
      np.testing.assert_allclose(r["eval"][key], one["eval"][key], rtol=1e-3, atol=1e-4, err_msg=key)


def test_non_finite_loss_stops_naming_step_and_term(smoke, tmp_path):
  smoke.loss.pixel_weight = float("nan")
  smoke.train.log_every = 1
  with pytest.raises(train.NonFiniteLossError, match=r"step 1: .*g_loss"):
    train.train_and_evaluate(smoke, str(tmp_path / "nan"))
  assert not glob.glob(str(tmp_path / "nan" / "checkpoints" / "[0-9]*")), "no checkpoint of a broken state"


@pytest.mark.parametrize("field,value,message", [
    ("phase", "venous", "phase"),
    ("data.image_size", 48, "image_size"),
    ("train.batch_size", 0, "batch_size"),
    ("train.weight_decay_mode", "sgd", "weight_decay_mode"),
    ("train.ema_decay", 1.0, "ema_decay"),
])
def test_invalid_config_values_are_named(smoke, tmp_path, field, value, message):
  *sections, name = field.split(".")
  target = smoke
  for s in sections:
    target = target[s]
  target[name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(smoke, str(tmp_path / "bad"))


def test_wrong_data_path_and_missing_pretext_checkpoint(smoke, tmp_path):
  missing = str(tmp_path / "nowhere")
  data_dir = smoke.data.dir
  smoke.data.dir = missing
  with pytest.raises(FileNotFoundError, match="data.dir"):
    train.train_and_evaluate(smoke, str(tmp_path / "a"))
  smoke.data.dir = data_dir
  smoke.perceptual.pretext_checkpoint = missing
  with pytest.raises(FileNotFoundError, match="pretext_checkpoint"):
    train.train_and_evaluate(smoke, str(tmp_path / "b"))


def test_sigterm_saves_the_current_step_and_resume_continues_there(smoke, tmp_path, monkeypatch):
  """Preemption: SIGTERM during step 3 -> a checkpoint of step 3, a clean return; the rerun goes on from step 3."""
  import signal  # pylint: disable=import-outside-toplevel
  from vcect_jax import summaries  # pylint: disable=import-outside-toplevel

  smoke.train.steps = 50
  smoke.train.checkpoint_every = smoke.train.eval_every = smoke.train.image_every = 100
  smoke.train.async_checkpoints = False
  tick = summaries.Writer.tick

  def tick_then_preempt(self, step):
    tick(self, step)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(summaries.Writer, "tick", tick_then_preempt)
  before = signal.getsignal(signal.SIGTERM)
  workdir = str(tmp_path / "preempted")
  stopped = train.train_and_evaluate(smoke, workdir)
  assert stopped["step"] == 3
  assert signal.getsignal(signal.SIGTERM) == before, "the SIGTERM handler must be given back"
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))
  assert steps == [3]
  monkeypatch.setattr(summaries.Writer, "tick", tick)
  smoke.train.steps = 5
  resumed = train.train_and_evaluate(smoke, workdir)
  assert resumed["step"] == 5
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))
  assert steps == [3, 5]
  # The resumed run trained (its parameters differ from the step-3 ones) rather than starting over or stopping.
  assert any(not np.array_equal(x, y) for x, y in zip(_generator_param_leaves(stopped["state"]),
                                                       _generator_param_leaves(resumed["state"])))
