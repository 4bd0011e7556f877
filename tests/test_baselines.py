"""The translation baselines (pix2pix, CycleGAN, CUT) on the shared loop: one step on 1 and 4 devices, PatchNCE
against numpy, the CycleGAN cycle loss while overfitting, unpaired sampling, the image pool, exact resume.

Compilation dominates on a CPU, so each network graph is compiled once: the 1-device steps once in this process
(shared by the step and overfitting tests), the 4-device steps and the CycleGAN resume (three runs that share a
persistent compilation cache) in two subprocesses started when the module's first test runs, alongside it.
"""

import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vcect_jax import input_pipeline
from vcect_jax import losses
from vcect_jax import methods
from vcect_jax import sharding
from vcect_jax import train
from vcect_jax.methods import cyclegan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = ("pix2pix", "cyclegan", "cut")

# One training step of every baseline on the same 4 real slices; run with 1 or 4 CPU devices.
_STEPS = """
import json, sys
from tests.test_baselines import first_steps
print("RESULT" + json.dumps(first_steps(sys.argv[1])))
"""

# CycleGAN with its image pool: 6 steps straight, and 3 steps stopped by SIGTERM then resumed to 6; then the
# generator through checkpoint.load_generator and evaluation mode.
_RESUME = """
import json, os, signal, sys
import jax, numpy as np
from flax import nnx
from tests.test_baselines import baseline_config
from vcect_jax import checkpoint, evaluate, summaries, train
data_dir, workdir = sys.argv[1], sys.argv[2]
config = baseline_config("cyclegan", data_dir)
config.train.update(steps=6, checkpoint_every=100, eval_every=100, image_every=100, async_checkpoints=False)
straight = train.train_and_evaluate(config, os.path.join(workdir, "straight"))
tick = summaries.Writer.tick
def tick_then_preempt(self, step):
  tick(self, step)
  if step == 3:
    os.kill(os.getpid(), signal.SIGTERM)
summaries.Writer.tick = tick_then_preempt
stopped = train.train_and_evaluate(config, os.path.join(workdir, "resumed"))
summaries.Writer.tick = tick
resumed = train.train_and_evaluate(config, os.path.join(workdir, "resumed"))
a, b = nnx.to_pure_dict(straight["state"]), nnx.to_pure_dict(resumed["state"])
flat_a, flat_b = dict(jax.tree_util.tree_leaves_with_path(a)), dict(jax.tree_util.tree_leaves_with_path(b))
differ = [jax.tree_util.keystr(k) for k in flat_a if not np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]))]
stopped_pool = np.asarray(nnx.to_pure_dict(stopped["state"])["pool_post"]["images"])
loaded = checkpoint.load_generator(os.path.join(workdir, "straight"))
restored = jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded.generator, nnx.Param)))
trained = jax.tree.leaves(nnx.to_pure_dict(nnx.filter_state(straight["state"]["generators"]["pre_to_post"], nnx.Param)))
config.mode, config.eval.checkpoint, config.eval.max_cases = "eval", os.path.join(workdir, "straight"), 1
config.eval.batch_size = 4
report = evaluate.run(config, os.path.join(workdir, "straight"))
print("RESULT" + json.dumps({
    "steps": [straight["step"], stopped["step"], resumed["step"]],
    "differ": differ, "leaves": len(flat_a),
    "pool_post_count": int(np.asarray(b["pool_post"]["count"])),
    "pool_moved_after_resume": not np.array_equal(stopped_pool, np.asarray(b["pool_post"]["images"])),
    "loaded_matches": len(restored) == len(trained) > 0 and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(restored, trained)),
    "loaded_method": loaded.config.method,
    "eval_mae": report["overall"]["model"]["hu/mae"]["mean"],
}))
"""


def baseline_config(method: str, data_dir: str):
  """The smoke config of a baseline on the shared dataset, with a constant learning rate over the test's steps."""
  config = importlib.import_module(f"configs.baselines.{method}").get_config("arterial,smoke")
  config.data.dir = data_dir
  config.train.steps = 0  # the schedule spans 200+ epochs: constant over any test run
  return config



def _real_batch(config, size: int = 4) -> dict[str, np.ndarray]:
  """The first `size` training slices, paired, in model space."""
  method = methods.create(config)
  source = input_pipeline.load_source(config.data.dir, config.phase, "train")
  examples = [method.train_example(source[i]) for i in range(size)]
  return {k: np.stack([e[k] for e in examples]) for k in ("pre", "post")}


def _compiled_step(method_name: str, data_dir: str):
  """(method, graphdef, jitted loop step, replicated state, global batch) on all devices of this process."""
  config = baseline_config(method_name, data_dir)
  method = methods.create(config)
  method.validate()
  mesh = sharding.make_mesh()
  graphdef, state = nnx.split(method.create_state(steps_per_epoch=10))
  state = sharding.replicate(state, mesh)
  step = train.jit_train_step(method, graphdef, mesh)
  batch = sharding.global_batch(_real_batch(config), mesh)
  return method, graphdef, step, state, batch


def first_steps(data_dir: str) -> dict:
  """The host metrics of one step of every baseline (the same batch everywhere)."""
  out = {"devices": jax.device_count()}
  for name in BASELINES:
    _, _, step, state, batch = _compiled_step(name, data_dir)
    with jax.set_mesh(sharding.make_mesh()):
      _, metrics = step(state, batch)
    out[name] = {k: float(v) for k, v in jax.device_get(metrics).items()}
  return out


def _launch(script: str, args, devices: int = 1, env_extra=None) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             **(env_extra or {}))
  return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-4000:]
  return json.loads([l for l in out.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])


@pytest.fixture(scope="module")
def background(smoke_workdir, tmp_path_factory):
  """The 4-device steps and the CycleGAN resume, running in subprocesses while this process compiles its own."""
  workdir = tmp_path_factory.mktemp("baselines")
  cache = str(workdir / "compilation_cache")
  return {
      "four": _launch(_STEPS, [smoke_workdir["data_dir"]], devices=4),
      "resume": _launch(_RESUME, [smoke_workdir["data_dir"], str(workdir)], env_extra={
          "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}),
  }


@pytest.fixture(scope="module")
def one_device(smoke_workdir, background):
  """Each baseline's compiled 1-device step, its state and the metrics of its first step."""
  del background  # started first, so that the subprocesses run while this compiles
  runs = {}
  for name in BASELINES:
    method, graphdef, step, state, batch = _compiled_step(name, smoke_workdir["data_dir"])
    before = jax.device_get(state)
    with jax.set_mesh(sharding.make_mesh()):
      state, metrics = step(state, batch)
    runs[name] = {"method": method, "step": step, "state": state, "batch": batch, "before": before,
                  "graphdef": graphdef,
                  "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()}}
  return runs


# ------------------------------------------------------------------------------------------------ steps
EXPECTED_TERMS = {
    "pix2pix": ("g_loss", "d_loss", "g_adv", "g_l1", "d_fake", "d_real"),
    "cyclegan": ("g_loss", "d_loss", "g_adv_post", "g_adv_pre", "cycle_pre", "cycle_post", "identity_post",
                 "identity_pre", "d_post", "d_pre"),
    "cut": ("g_loss", "d_loss", "g_adv", "nce", "nce_identity", "d_fake", "d_real"),
}


@pytest.mark.parametrize("name", BASELINES)
def test_one_step_finite_and_trains_every_network(one_device, name):
  run = one_device[name]
  assert set(EXPECTED_TERMS[name]) <= set(run["metrics"])
  for key, value in run["metrics"].items():
    assert np.isfinite(value), f"{name} {key}={value}"
  before, after = nnx.to_pure_dict(run["before"]), nnx.to_pure_dict(jax.device_get(run["state"]))
  trained = [k for k in before if not k.startswith(("opt_", "pool_"))]
  for network in trained:
    moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before[network]),
                                                      jax.tree.leaves(after[network]))]
    assert any(moved), f"{name}: {network} did not change in one step"


def test_four_devices_match_one_device(one_device, background):
  four = _result(background["four"])
  assert four["devices"] == 4
  for name in BASELINES:
    for key, value in one_device[name]["metrics"].items():
      assert np.isfinite(four[name][key]), f"{name} {key} on 4 devices"
      np.testing.assert_allclose(four[name][key], value, rtol=2e-4, atol=1e-5, err_msg=f"{name} {key}")


def _readouts(method, graphdef):
  def readouts(state, batch):
    module = nnx.merge(graphdef, state)
    return method.eval_step(module, batch), method.images(module, batch)
  return readouts


def test_generator_eval_step_and_images(one_device, smoke_workdir):
  """`generator_key` points at the generator in the state, `build_generator` has its structure (what
  `checkpoint.load_generator` restores into), and the eval step has the dual-path GAN's metrics."""
  val = input_pipeline.load_source(smoke_workdir["data_dir"], "arterial", "validation")
  for name in BASELINES:
    run = one_device[name]
    method, state = run["method"], jax.device_get(run["state"])
    sub = state.to_pure_dict()
    for key in method.generator_key:
      sub = sub[key]
    built = nnx.state(nnx.eval_shape(method.build_generator)).to_pure_dict()
    assert jax.tree.structure(sub) == jax.tree.structure(built), name
    assert [x.shape for x in jax.tree.leaves(sub)] == [x.shape for x in jax.tree.leaves(built)], name
    examples = [method.eval_example(val[i]) for i in range(2)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    metrics, images = jax.jit(_readouts(method, run["graphdef"]))(state, batch)
    assert set(metrics) == {"psnr", "ssim", "mae_hu", "identity_mae_hu"}, name
    for key, value in metrics.items():
      assert value.shape == (2,) and np.all(np.isfinite(value)), (name, key)
    grid = np.asarray(images["pre_virtual_real_absdiff"])
    assert grid.shape == (2, 32, 128, 1) and grid.min() >= 0 and grid.max() <= 1, name


def test_cyclegan_cycle_loss_falls_when_overfitting(one_device):
  run = one_device["cyclegan"]
  step, state, batch = run["step"], run["state"], run["batch"]
  cycle = [run["metrics"]["cycle"]]
  with jax.set_mesh(sharding.make_mesh()):
    for _ in range(59):
      state, metrics = step(state, batch)
      cycle.append(metrics["cycle"])
  cycle = np.asarray(jax.device_get(cycle))
  assert np.all(np.isfinite(cycle))
  assert cycle[-5:].mean() < 0.5 * cycle[:3].mean(), cycle


# ------------------------------------------------------------------------------------------------ PatchNCE
def _patch_nce_numpy(q, k, tau):
  b, p, _ = q.shape
  out = np.zeros((b, p))
  for i in range(b):
    for j in range(p):
      negatives = [-10.0 if m == j else float(q[i, j] @ k[i, m]) for m in range(p)]
      logits = np.array([float(q[i, j] @ k[i, j])] + negatives) / tau
      out[i, j] = -(logits[0] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max())
  return out


def test_patch_nce_matches_numpy_reference():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 7, 16)), rng.normal(size=(2, 7, 16))
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  got = np.asarray(losses.patch_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), 0.07))
  np.testing.assert_allclose(got, _patch_nce_numpy(q, k, 0.07), rtol=1e-4, atol=1e-4)
  # Keys carry no gradient (CUT detaches them); queries do.
  grad_q, grad_k = jax.grad(lambda a, b: jnp.sum(losses.patch_nce(a, b)), argnums=(0, 1))(
      jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32))
  assert float(jnp.abs(grad_q).sum()) > 0 and float(jnp.abs(grad_k).sum()) == 0


# ------------------------------------------------------------------------------------------------ data and pool
def test_unpaired_sampling_decouples_pre_and_post(smoke_workdir):
  source = input_pipeline.load_source(smoke_workdir["data_dir"], "arterial", "train")
  n = len(source)
  cases = np.array([source[i]["case_id"] for i in range(n)])
  unpaired = input_pipeline.UnpairedSource(source, seed=1)
  assert len(unpaired) == n and sorted(unpaired.partner) == list(range(n)), "each post once per epoch"
  for i in (0, n // 2, n - 1):
    j = int(unpaired.partner[i])
    np.testing.assert_array_equal(unpaired[i]["pre"], source[i]["pre"])
    np.testing.assert_array_equal(unpaired[i]["post"], source[j]["post"])
    assert unpaired[i]["post_slice_index"] == source[j]["slice_index"]
  # Over many pairings: a slice meets its own post at chance rate 1/n, its own case at rate sum_c (n_c / n)^2.
  seeds = range(400)
  partners = np.stack([input_pipeline.UnpairedSource(source, s).partner for s in seeds])
  same_slice = np.mean(partners == np.arange(n))
  same_case = np.mean(cases[partners] == cases[None, :])
  _, counts = np.unique(cases, return_counts=True)
  chance_case = float(np.sum((counts / n) ** 2))
  assert abs(same_slice - 1 / n) < 4 * np.sqrt(1 / n / len(seeds) / n) + 1e-3, (same_slice, 1 / n)
  assert abs(same_case - chance_case) < 0.03, (same_case, chance_case)
  # The unpaired methods train on such a source; pix2pix and every validation split stay paired.
  for name, unpaired_expected in (("pix2pix", False), ("cyclegan", True), ("cut", True)):
    train_source, val_source = methods.create(baseline_config(name, smoke_workdir["data_dir"])).sources(
        smoke_workdir["data_dir"])
    assert isinstance(train_source, input_pipeline.UnpairedSource) == unpaired_expected, name
    assert not isinstance(val_source, input_pipeline.UnpairedSource)


def test_image_pool_fills_then_swaps_with_probability_half():
  """The reference's ImagePool: store and return while filling; then each image is, with probability 1/2,
  swapped for a stored one (returned, its slot taking the new image), else returned as it is."""
  pool = cyclegan.ImagePool(3, (2, 2, 1))
  images = jnp.arange(43, dtype=jnp.float32)[:, None, None, None] * jnp.ones((43, 2, 2, 1))
  query = nnx.jit(lambda p, x, key: p.query(x, key))
  out = np.asarray(query(pool, images, jax.random.key(0)))[:, 0, 0, 0]
  np.testing.assert_array_equal(out[:3], np.arange(3))  # filling
  assert int(pool.count.value) == 3
  # Replay the stream: a returned image that is not the input must be what the pool held at that moment.
  held, swapped = [0.0, 1.0, 2.0], 0
  for i in range(3, 43):
    if out[i] != i:
      assert out[i] in held, (i, out[i], held)
      held[held.index(out[i])] = float(i)
      swapped += 1
  assert 8 <= swapped <= 32, swapped
  np.testing.assert_array_equal(sorted(np.asarray(pool.images.value)[:, 0, 0, 0]), sorted(held))


# ------------------------------------------------------------------------------------------------ resume
def test_cyclegan_exact_resume_with_image_pool(background):
  """6 steps straight == 3 steps, SIGTERM, resume to 6: every parameter, optimiser state and pool bit-identical;
  the generator then restores alone (checkpoint.load_generator) and evaluation mode runs on it."""
  r = _result(background["resume"])
  assert r["steps"] == [6, 3, 6]
  assert r["leaves"] > 0 and not r["differ"], r["differ"][:10]
  assert r["pool_post_count"] == 3 and r["pool_moved_after_resume"]
  assert r["loaded_matches"] and r["loaded_method"] == "cyclegan"
  assert np.isfinite(r["eval_mae"])
