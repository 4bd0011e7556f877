"""The JAX-against-PyTorch benchmark harness (`benchmarks/run.py`) in its tiny mode, and the honesty of its PyTorch
reference (`benchmarks/torch_reference.py`): given the same weights it computes what the JAX networks and the JAX
training step compute. No timing assertions. Without torch the harness runs the JAX side alone."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import run
from vcect_jax import models


def test_tiny_harness_gives_both_rows_with_finite_times():
  rows = run.main(["--tiny", "--rounds=1"])
  assert [(r["measurement"], r["size"], r["batch"]) for r in rows] == [("generator forward", 32, 2),
                                                                       ("train step", 32, 2)]
  for r in rows:
    assert math.isfinite(r["jax_s"]) and r["jax_s"] > 0 and r["jax_first_call_s"] > 0
    if run.torch is None:
      assert r["torch_s"] is None and r["ratio"] is None   # reported as skipped
    else:
      assert math.isfinite(r["torch_s"]) and r["torch_s"] > 0
      assert r["ratio"] == pytest.approx(r["torch_s"] / r["jax_s"])


@pytest.fixture(scope="module")
def tiny():
  pytest.importorskip("torch")
  config = run.make_config(32, 2, tiny=True)
  batch = run._batch(32, 2, seed=3)
  step, module = run.jax_train_step(config, batch)
  return config, batch, step, module


def _trained_stats_generator(config, x):
  """A generator whose BatchNorm running statistics are not the initial zeros and ones."""
  g = models.Generator(config.model.generator, rngs=nnx.Rngs(4))
  g.train()
  for _ in range(3):
    g(x)
  return g


def test_torch_generator_and_discriminator_compute_the_jax_networks(tiny):
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  config, batch, _, module = tiny
  x = batch["pre"]
  g = _trained_stats_generator(config, x)
  tg = torch_reference.generator_from_jax(torch_reference.Generator(config.model.generator), g)
  with torch.no_grad():
    for train_mode in (True, False):   # batch statistics, then running statistics
      g.train() if train_mode else g.eval()
      tg.train(train_mode)
      ours = np.asarray(g(x)).transpose(0, 3, 1, 2)
      theirs = tg(torch_reference.nchw(x)).numpy()
      assert ours.shape == theirs.shape == (2, 1, 32, 32)
      np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)
    d = module.discriminator
    td = torch_reference.discriminator_from_jax(torch_reference.Discriminator(config.model.discriminator), d)
    logits = np.asarray(d(x, batch["post"])).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(td(torch_reference.nchw(x), torch_reference.nchw(batch["post"])).numpy(), logits,
                               atol=2e-4, rtol=1e-4)


def test_torch_training_step_gives_the_jax_losses(tiny):
  """Two steps from the same weights on the same batch: the same discriminator and generator losses (the second
  step's losses also check both optimiser updates)."""
  config, batch, step, module = tiny
  torch_step = run.torch_train_step(config, module, batch)
  for _ in range(2):
    ours = {k: float(v) for k, v in jax.device_get(step()).items()}
    theirs = {k: float(v) for k, v in torch_step().items()}
    assert set(theirs) == {"g_loss", "d_loss"}
    for key in theirs:
      assert theirs[key] == pytest.approx(ours[key], rel=1e-3, abs=1e-5), key


def test_bf16_torch_step_tracks_the_float32_one(tiny):
  """The reference's `torch.autocast` bf16 step (the GPU benchmark's PyTorch side) computes the same losses as its
  float32 step to bf16 precision, so both frameworks do the same work in `benchmarks/gpu_bench.py`."""
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  config, batch, _, module = tiny
  losses = {}
  for amp in (None, torch.bfloat16):
    step = torch_reference.dual_path_step_from_jax(config, module, amp_dtype=amp)
    losses[amp] = {k: float(v) for k, v in step(torch_reference.nchw(batch["pre"]),
                                                torch_reference.nchw(batch["post"])).items()}
    if amp is not None:   # the parameters and optimiser states stay float32
      assert all(p.dtype == torch.float32 for p in step.g.parameters())
      assert all(s["exp_avg"].dtype == torch.float32 for s in step.opt_g.state.values())
  for key in ("g_loss", "d_loss"):
    assert math.isfinite(losses[torch.bfloat16][key])
    assert losses[torch.bfloat16][key] == pytest.approx(losses[None][key], rel=0.05), key
    assert losses[torch.bfloat16][key] != losses[None][key]   # bf16 did run


def test_gpu_bench_tiny_mode_gives_both_rows_per_precision(tmp_path):
  """`benchmarks/gpu_bench.py --tiny` (runs on the CPU too): a train-step and a forward row per precision, finite
  times, the ratio against the best PyTorch variant, a FLOP count from XLA's cost analysis, and with `--profile` the
  time per XLA operation of the traced step."""
  from benchmarks import gpu_bench  # pylint: disable=g-import-not-at-top

  rows = gpu_bench.main(["--tiny", "--dtypes=float32", f"--profile={tmp_path}"]
                        + ([] if run.torch is not None else ["--no_torch"]))
  assert [(r["measurement"], r["size"], r["dtype"]) for r in rows] == [("train step", 32, "float32"),
                                                                       ("generator forward", 32, "float32")]
  for r in rows:
    assert math.isfinite(r["jax_s"]) and r["jax_s"] > 0
    assert r["flops"] and r["flops"] > 0
    assert r["jax_mfu"] == pytest.approx(r["flops"] / r["jax_s"] / 1e12 / gpu_bench.H200_BF16_DENSE_TFLOPS)
    if run.torch is not None:
      assert r["ratio_best_torch"] == pytest.approx(r["torch_s"] / r["jax_s"])
  # the step's FLOPs: forward + backward of both paths and the discriminator: several generator forwards
  assert rows[0]["flops"] > 3 * rows[1]["flops"]
  profile = rows[0]["profile"]
  assert profile["total_ms"] > 0 and profile["rows"], profile
  assert any("conv" in r["group"] or "custom-call" in r["group"] for r in profile["rows"]), profile["rows"]
  assert "profile" not in rows[1]  # the step is traced, not the forward


def test_xla_flops_counts_a_convolution():
  from benchmarks import gpu_bench  # pylint: disable=g-import-not-at-top
  x, k = np.ones((2, 16, 16, 4), np.float32), np.ones((3, 3, 4, 8), np.float32)
  flops = gpu_bench.xla_flops(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), x, k)
  # multiply-adds over the taps that fall inside the image (SAME padding: 46 of 48 taps per row and column)
  assert flops == pytest.approx(2 * 2 * 4 * 8 * (3 * 16 - 2) ** 2, rel=0.01)


def test_trace_summary_sums_the_operations_of_a_trace(tmp_path):
  """`benchmarks/trace_summary.py` reads a jax.profiler trace: the operations of a jitted convolution + reduction are
  found by name, runtime frames are not, and the shares of all groups add up to one."""
  from benchmarks import trace_summary  # pylint: disable=g-import-not-at-top

  x, k = jnp.ones((2, 32, 32, 8)), jnp.ones((3, 3, 8, 16))
  fn = jax.jit(lambda x, k: jnp.tanh(jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).sum())
  fn(x, k).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      fn(x, k).block_until_ready()
  summary = trace_summary.summarise(str(tmp_path), top=1000)
  groups = [r["group"] for r in summary["rows"]]
  assert any("conv" in g for g in groups), groups
  assert not any(g.startswith(("Pjit", "$")) or "::" in g for g in groups), groups
  assert sum(r["share"] for r in summary["rows"]) == pytest.approx(1.0)
  assert sum(r["events"] for r in summary["rows"]) == summary["events"] >= 3
  assert "| operation (group) |" in trace_summary.table(summary)
  with pytest.raises(FileNotFoundError, match="jax.profiler.trace"):
    trace_summary.summarise(str(tmp_path / "empty"))
