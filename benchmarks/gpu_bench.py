"""JAX against the PyTorch reference on one GPU: the training step and the generator forward, float32 and bfloat16.

    python -m benchmarks.gpu_bench                          # 256 px, batches 2 and 32, float32 and bfloat16
    python -m benchmarks.gpu_bench --batches 2,32,128 --json results.json
    python -m benchmarks.gpu_bench --tiny                   # 32 px, narrow networks, CPU is fine (the tests' mode)
    python -m benchmarks.gpu_bench --batches 32 --dtypes bfloat16 --profile /tmp/trace   # + time per XLA operation

The GPU row of issue 14 ("bf16 step against torch on the same GPU, and MFU"). For each image size, batch and
precision, in this order (rows are printed, and written to `--json`, as they finish, so that a run cut short by a
time limit keeps what it measured):
  * JAX: `vcect_jax.train.jit_train_step` (the step the training loop runs: donated, no host sync inside) with
    `model.compute_dtype` float32 or bfloat16 (bf16 convolutions and BatchNorm, float32 parameters, optimiser
    states and losses), and the jitted generator in eval mode;
  * PyTorch: `benchmarks/torch_reference.py` on the same GPU from the same weights, float32 or `torch.autocast`
    bfloat16 (parameters and Adam states float32, losses float32), `cudnn.benchmark` on; eager NCHW (what the
    authors' code runs) and, for bfloat16, also channels-last (the layout cuDNN's tensor-core kernels prefer), the
    stronger PyTorch baseline. float32 convolutions may use TF32 on both sides (each framework's default).
Timing: warm-up calls (JAX compiles; its compile + first call time is reported), then `--steps` calls back to back
and one synchronisation at the end (the GPU queue stays full, as in training), `--rounds` times; medians of the
per-step times. MFU = the step's FLOPs (XLA's cost analysis of the lowered JAX step, the same arithmetic on both
sides) / step time / the GPU's dense bf16 peak (`--peak_tflops`, default the H200's 989 TFLOP/s, NVIDIA's figure).

Dependencies: jax (with its GPU plugin), flax, optax, orbax-checkpoint, numpy, torch, and of the project's own only
ml_collections and grain (with array_record): TensorFlow, TFDS, pydicom and clu are not imported. Compiling the
paper-size bf16 step takes about a minute on an H200 (53 s at batch 2, 89 s at batch 32): put the rows that matter
first in a time-limited run (`--batches`, `--dtypes`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from unittest import mock

if __package__ in (None, ""):  # `python benchmarks/gpu_bench.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# JAX and PyTorch share the GPU in this process: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from flax import nnx

from benchmarks import run as cpu_run
from benchmarks import trace_summary
from vcect_jax import models
from vcect_jax.models import layers

try:
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
except ImportError:  # torch is only for benchmarks (benchmarks/requirements.txt)
  torch = torch_reference = None

H200_BF16_DENSE_TFLOPS = 989.0   # NVIDIA's H200 SXM datasheet, dense (no sparsity)


def _config(size: int, batch: int, dtype: str, tiny: bool):
  config = cpu_run.make_config(size, batch, tiny)
  config.model.compute_dtype = dtype
  return config


# ------------------------------------------------------------------------------------------------ JAX side
def jax_sides(config, batch_np):
  """(train step: n -> runs n steps and waits, forward: n -> n forwards and waits, step FLOPs, forward FLOPs,
  the module before the first step)."""
  built = cpu_run.build_train_step(config, batch_np)
  method, module, graphdef, state = built["method"], built["module"], built["graphdef"], built["state"]
  step_fn, batch = built["step_fn"], built["batch"]
  start = time.perf_counter()
  step_fn = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  def raw_step(state, batch):  # jit_train_step's function, unsharded, for counting FLOPs
    m = nnx.merge(graphdef, state)
    return nnx.state(m), method.train_step(m, batch)

  step_flops = xla_flops(raw_step, state, batch_np)
  holder = {"state": state}

  def steps(n: int):
    metrics = None
    for _ in range(n):
      holder["state"], metrics = step_fn(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))

  generator = models.Generator(config.model.generator, rngs=nnx.Rngs(0))
  nnx.update(generator, nnx.state(module.generators.global_net))
  generator.eval()
  g_def, g_state = nnx.split(generator)
  apply = lambda s, x: nnx.merge(g_def, s)(x)  # pylint: disable=unnecessary-lambda-assignment
  x = jax.device_put(batch_np["pre"])
  fwd_flops = xla_flops(apply, g_state, batch_np["pre"])
  fwd_fn = jax.jit(apply).lower(g_state, x).compile()

  def forwards(n: int):
    out = None
    for _ in range(n):
      out = fwd_fn(g_state, x)
    jax.block_until_ready(out)

  return steps, forwards, step_flops, fwd_flops, generator, module, compile_s


def xla_flops(fn, *args) -> float | None:
  """FLOPs of `fn(*args)` by XLA's cost analysis of its HLO with XLA's own convolutions, lowered for the CPU.

  Not the compiled executable's analysis: on GPU the convolutions become cuDNN custom calls whose FLOPs it does not
  count (the bf16 step at batch 32 reads 270 GFLOP there against 12.9 TFLOP of convolutions), and on CPU the
  oneDNN custom calls likewise. The same count serves both frameworks (the same arithmetic)."""
  # Shapes and dtypes only: arguments placed on an accelerator would carry its shardings into the CPU lowering.
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)
  try:
    with mock.patch.object(layers, "on_cpu", lambda: False):  # XLA's convolutions, countable
      lowered = jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cpu",))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except  (no cost analysis on this JAX: no MFU column)
    return None


# ------------------------------------------------------------------------------------------------ PyTorch side
def torch_sides(config, generator, module, batch_np, dtype: str, channels_last: bool, device: str):
  amp = torch.bfloat16 if dtype == "bfloat16" else None
  fmt = torch.channels_last if channels_last else torch.contiguous_format

  def to(t):
    return t.to(device).contiguous(memory_format=fmt)

  g_eval = torch_reference.generator_from_jax(torch_reference.Generator(config.model.generator), generator).eval()
  g_eval = g_eval.to(device, memory_format=fmt)
  step = torch_reference.dual_path_step_from_jax(config, module, amp_dtype=amp, device=device, memory_format=fmt)
  pre, post = to(torch_reference.nchw(batch_np["pre"])), to(torch_reference.nchw(batch_np["post"]))

  def sync():
    if device.startswith("cuda"):
      torch.cuda.synchronize()

  def steps(n: int):
    for _ in range(n):
      step(pre, post)
    sync()

  def forwards(n: int):
    with torch.inference_mode(), torch.autocast(device_type=pre.device.type, dtype=amp or torch.float32,
                                                 enabled=amp is not None):
      for _ in range(n):
        g_eval(pre)
    sync()

  return steps, forwards


# ------------------------------------------------------------------------------------------------ timing
def _per_call(fn, n: int, rounds: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn(n)
    times.append((time.perf_counter() - start) / n)
  return statistics.median(times), times


def profile_steps(step_fn, n: int, trace_dir: str, log=print) -> dict:
  """A `jax.profiler` trace of n training steps (after the timing: compiled, warm) and its per-operation summary
  (`benchmarks/trace_summary.py`); the trace itself stays in `trace_dir` for TensorBoard's or xprof's viewer."""
  with jax.profiler.trace(trace_dir):
    step_fn(n)
  summary = trace_summary.summarise(trace_dir)
  log(f"profile of {n} JAX training steps ({trace_dir}):\n" + trace_summary.table(summary))
  return summary


def measure(size: int, batch: int, dtype: str, *, steps: int, rounds: int, tiny: bool, with_torch: bool,
            device: str, peak_tflops: float, log=print, profile_dir: str = "") -> list[dict]:
  config = _config(size, batch, dtype, tiny)
  batch_np = cpu_run._batch(size, batch)  # pylint: disable=protected-access
  j_steps, j_fwd, step_flops, fwd_flops, generator, module, compile_s = jax_sides(config, batch_np)
  torch_variants = {}
  if with_torch:
    torch_variants["torch"] = torch_sides(config, generator, module, batch_np, dtype, False, device)
    if dtype == "bfloat16":
      torch_variants["torch channels_last"] = torch_sides(config, generator, module, batch_np, dtype, True, device)
  rows = []
  for what, idx, jax_fn, flops in (("train step", 0, j_steps, step_flops),
                                   ("generator forward", 1, j_fwd, fwd_flops)):
    start = time.perf_counter()
    jax_fn(1)
    first = time.perf_counter() - start
    jax_fn(2)
    for fns in torch_variants.values():
      fns[idx](3)   # cuDNN's autotuning (cudnn.benchmark) happens here
    row = {"measurement": what, "size": size, "batch": batch, "dtype": dtype, "steps": steps, "rounds": rounds,
           "flops": flops, "jax_first_call_s": first + (compile_s if idx == 0 else 0.0)}
    row["jax_s"], row["jax_times"] = _per_call(jax_fn, steps, rounds)
    for name, fns in torch_variants.items():
      row[f"{name}_s"], row[f"{name}_times"] = _per_call(fns[idx], steps, rounds)
    best_torch = min((row[f"{n}_s"] for n in torch_variants), default=None)
    row["ratio_best_torch"] = best_torch / row["jax_s"] if best_torch else None
    if flops:
      row["jax_tflops"] = flops / row["jax_s"] / 1e12
      row["jax_mfu"] = row["jax_tflops"] / peak_tflops
      for name in torch_variants:
        row[f"{name}_mfu"] = flops / row[f"{name}_s"] / 1e12 / peak_tflops
    if profile_dir and idx == 0:
      row["profile"] = profile_steps(jax_fn, min(steps, 5), os.path.join(profile_dir, f"{size}px_b{batch}_{dtype}"),
                                     log)
    rows.append(row)
    log(_fmt(row, list(torch_variants)))
  return rows


def _fmt(r: dict, torch_names) -> str:
  parts = [f"{r['measurement']:17s} {r['size']:4d} px  batch {r['batch']:3d}  {r['dtype']:8s}",
           f"JAX {r['jax_s'] * 1e3:8.2f} ms (1st {r['jax_first_call_s']:5.1f} s)"]
  for n in torch_names:
    parts.append(f"{n} {r[f'{n}_s'] * 1e3:8.2f} ms")
  if r.get("ratio_best_torch"):
    parts.append(f"JAX/best torch steps/s {r['ratio_best_torch']:5.2f}")
  if r.get("flops"):
    parts.append(f"{r['flops'] / 1e9:7.1f} GFLOP  JAX {r['jax_tflops']:6.1f} TFLOP/s MFU {r['jax_mfu'] * 100:5.1f}%")
    for n in torch_names:
      parts.append(f"{n} MFU {r[f'{n}_mfu'] * 100:5.1f}%")
  return " | ".join(parts)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="256")
  parser.add_argument("--batches", default="2,32")
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--steps", type=int, default=20, help="calls per timed round, one sync at the end")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--tiny", action="store_true", help="32 px, narrow networks, 2 steps x 2 rounds (tests)")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--peak_tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                      help="the device's dense bf16 peak, for MFU")
  parser.add_argument("--json", default="", help="rows written here after each measurement")
  parser.add_argument("--profile", default="", metavar="DIR",
                      help="also trace a few JAX training steps of each row into DIR/<size>px_b<batch>_<dtype> and "
                           "print the time per XLA operation (benchmarks/trace_summary.py)")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")] if not args.tiny else [32]
  batches = [int(b) for b in args.batches.split(",")] if not args.tiny else [2]
  steps, rounds = (2, 2) if args.tiny else (args.steps, args.rounds)
  with_torch = torch is not None and not args.no_torch
  device = "cpu"
  if with_torch:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
  log = print
  log(f"machine: {platform.machine()} {os.cpu_count()} CPUs; jax {jax.__version__} on {jax.devices()[0].device_kind}"
      + (f"; torch {torch.__version__} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}"
         if with_torch else "; PyTorch side skipped"))
  rows = []
  for size in sizes:
    for batch in batches:
      for dtype in args.dtypes.split(","):
        rows += measure(size, batch, dtype, steps=steps, rounds=rounds, tiny=args.tiny, with_torch=with_torch,
                        device=device, peak_tflops=args.peak_tflops, log=log, profile_dir=args.profile)
        if args.json:
          with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        sys.stdout.flush()
  return rows


if __name__ == "__main__":
  main()
