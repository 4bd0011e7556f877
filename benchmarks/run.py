"""JAX against the PyTorch reference on the same machine: generator forward and the training step.

    .venv/bin/pip install -r benchmarks/requirements.txt     # torch, for the reference side only
    .venv/bin/python benchmarks/run.py --quick               # 128 and 256 px, batch 2, 3 timed rounds (< 5 min)
    .venv/bin/python benchmarks/run.py                       # the same with 7 timed rounds
    .venv/bin/python benchmarks/run.py --tiny                # 32 px, narrow networks (the test suite's mode)
    .venv/bin/python benchmarks/run.py --layers              # JAX only: each generator layer, fwd and fwd+bwd
    .venv/bin/python benchmarks/run.py --swap                # JAX only: sub-pixel against lax.conv_transpose

For each image size (batch 2, the paper's networks, float32, CPU):
  * "generator forward": inference, BatchNorm running statistics (JAX: jitted, eval mode; PyTorch: eval mode,
    `torch.inference_mode`);
  * "train step": the full dual-path GAN step (generator on the global path and the quadrants, discriminator
    update, generator update with adversarial + pixel + perceptual terms; JAX: `vcect_jax.train.jit_train_step`,
    the step the training loop runs; PyTorch: `benchmarks/torch_reference.py`). The pretext encoder of the
    perceptual loss is a random one on both sides (same cost, no checkpoint needed).
Both sides start from the same weights (copied from JAX to PyTorch). Each side runs in its own process (JAX, then
PyTorch, twice; `--same_process` alternates them round by round in one process instead, which is biased against
JAX: PyTorch's idle OpenMP threads keep taking CPU time from XLA's). After one warm-up call of each (the JAX one
compiles, its time is reported), medians of all timed rounds are reported, with the ratio JAX/PyTorch in steps
per second (= PyTorch seconds / JAX seconds; > 1 means JAX is faster). The load average is printed before and
after each row: other jobs on the machine slow both sides, which is why only the ratios of one run are
comparable. Without torch installed, the PyTorch side is reported as skipped and the JAX side still runs.
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

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import arterial
from vcect_jax import methods
from vcect_jax import models
from vcect_jax import pretrain
from vcect_jax import sharding
from vcect_jax import train
from vcect_jax.models import layers

try:
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
except ImportError:  # torch is only for this benchmark (benchmarks/requirements.txt)
  torch = torch_reference = None

GOALS = {"generator forward": 1.5, "train step": 1.2}   # JAX/PyTorch steps/s at 256 px on the CPU (issue 14)


def make_config(size: int, batch: int, tiny: bool):
  config = arterial.get_config("smoke" if tiny else None)
  config.data.image_size = size
  config.train.batch_size = batch
  config.perceptual.init_generator = False
  config.perceptual.pretext_checkpoint = "random-encoder"
  return config


def _batch(size: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"pre": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
          "post": rng.uniform(-1, 1, (batch, size, size, 1)).astype(np.float32)}


# ------------------------------------------------------------------------------------------------ the two sides
def jax_forward(config, generator, pre: np.ndarray):
  """A blocking call of the jitted generator in eval mode on `pre`."""
  generator.eval()
  graphdef, state = nnx.split(generator)
  fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  x = jax.device_put(pre)
  return lambda: jax.block_until_ready(fn(state, x))


def build_train_step(config, batch_np):
  """The training loop's jitted, donated step on `batch_np`, with a random pretext encoder: a dict of `method`,
  `module` (the state before the first step), `graphdef`, `state` (a replicated copy), `step_fn`, `batch`."""
  method = methods.create(config)
  with mock.patch.object(pretrain, "load_pretext_encoder",
                         lambda *_: models.IntensityClassifier(config.model, rngs=nnx.Rngs(1)).encoder):
    module = method.create_state(steps_per_epoch=1000)
  mesh = sharding.make_mesh()
  graphdef, state = nnx.split(module)
  state = sharding.replicate(jax.tree.map(np.array, state), mesh)  # a copy: `module` keeps its arrays
  return {"method": method, "module": module, "graphdef": graphdef, "state": state,
          "step_fn": train.jit_train_step(method, graphdef, mesh), "batch": sharding.global_batch(batch_np, mesh)}


def jax_train_step(config, batch_np):
  """(blocking step call, the module before the first step): the training loop's jitted, donated step."""
  built = build_train_step(config, batch_np)
  module, state, step_fn, batch = built["module"], built["state"], built["step_fn"], built["batch"]
  holder = {"state": state, "metrics": None}

  def step():
    holder["state"], holder["metrics"] = step_fn(holder["state"], batch)
    jax.block_until_ready((holder["state"], holder["metrics"]))
    return holder["metrics"]

  return step, module


def torch_forward(config, jax_generator, pre: np.ndarray):
  g = torch_reference.generator_from_jax(torch_reference.Generator(config.model.generator), jax_generator).eval()
  x = torch_reference.nchw(pre)

  def call():
    with torch.inference_mode():
      return g(x)

  return call


def torch_train_step(config, jax_module, batch_np):
  step = torch_reference.dual_path_step_from_jax(config, jax_module)
  pre, post = torch_reference.nchw(batch_np["pre"]), torch_reference.nchw(batch_np["post"])
  return lambda: step(pre, post)


# ------------------------------------------------------------------------------------------------ timing
def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def compare(name: str, size: int, batch: int, jax_fn, torch_fn, rounds: int) -> dict:
  """Warm-up (JAX compiles), then `rounds` alternating timed calls of each side given; medians in seconds."""
  load_before = os.getloadavg()[0]
  jax_first = _timed(jax_fn) if jax_fn else None
  torch_first = _timed(torch_fn) if torch_fn else None
  jax_times, torch_times = [], []
  for _ in range(rounds):
    if jax_fn:
      jax_times.append(_timed(jax_fn))
    if torch_fn:
      torch_times.append(_timed(torch_fn))
  return _row(name, size, batch, rounds, jax_times, torch_times, jax_first, torch_first, load_before,
              os.getloadavg()[0])


def _row(name, size, batch, rounds, jax_times, torch_times, jax_first, torch_first, load_before, load_after):
  jax_s = statistics.median(jax_times) if jax_times else None
  torch_s = statistics.median(torch_times) if torch_times else None
  return {"measurement": name, "size": size, "batch": batch, "rounds": rounds,
          "jax_s": jax_s, "torch_s": torch_s, "ratio": (torch_s / jax_s) if (torch_s and jax_s) else None,
          "jax_first_call_s": jax_first, "torch_first_call_s": torch_first,
          "jax_min_s": min(jax_times) if jax_times else None,
          "torch_min_s": min(torch_times) if torch_times else None,
          "jax_times": jax_times, "torch_times": torch_times,
          "load_before": load_before, "load_after": load_after}


def separate(argv: list[str], passes: int = 2, log=print) -> list[dict]:
  """Each side in its own process (`--side=jax`, then `--side=torch`, `passes` times), rows merged.

  Why: in one process, PyTorch's idle OpenMP threads still take CPU time from XLA's (the JAX train step at 256 px
  took 5.94 s alternating with PyTorch against 4.99 s alone, on a quiet 2-core machine), while PyTorch was not
  slowed by JAX (4.49 s against 4.55 s alone). Separate processes give each side the machine to itself.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  merged: dict[tuple, dict] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for p in range(passes):
      for side in ("jax", "torch"):
        out = os.path.join(tmp, f"{side}_{p}.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--side={side}", f"--json={out}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
          for r in json.load(f):
            key = (r["measurement"], r["size"])
            m = merged.setdefault(key, {"jax_times": [], "torch_times": [], "jax_first": None, "torch_first": None,
                                        "load_before": r["load_before"], "r": r})
            m[f"{side}_times"] += r[f"{side}_times"]
            if m[f"{side}_first"] is None:
              m[f"{side}_first"] = r[f"{side}_first_call_s"]
            m["load_after"] = r["load_after"]
  rows = [_row(name, size, m["r"]["batch"], m["r"]["rounds"], m["jax_times"], m["torch_times"], m["jax_first"],
               m["torch_first"], m["load_before"], m["load_after"]) for (name, size), m in merged.items()]
  _log_table(rows, log)
  return rows


def _fmt_row(r: dict) -> str:
  jax_ms = f"{r['jax_s'] * 1e3:9.1f}" if r["jax_s"] else "  skipped"
  torch_ms = f"{r['torch_s'] * 1e3:9.1f}" if r["torch_s"] else "  skipped"
  ratio = f"{r['ratio']:6.2f}" if r["ratio"] else "   n/a"
  goal = GOALS.get(r["measurement"]) if r["size"] == 256 else None
  goal_s = f">= {goal}" if goal else ""
  first = f"{r['jax_first_call_s']:7.1f}" if r["jax_first_call_s"] is not None else "    n/a"
  return (f"{r['measurement']:18s} {r['size']:4d} {r['batch']:5d} {jax_ms} {torch_ms} {ratio}  "
          f"{goal_s:7s} {first}   {r['load_before']:.1f} -> {r['load_after']:.1f}")


def _header() -> str:
  return (f"{'measurement':18s} {'size':>4s} {'batch':>5s} {'JAX ms':>9s} {'torch ms':>9s} {'ratio':>6s}  "
          f"{'goal':7s} {'JAX 1st':>7s}   load")


def _log_table(rows, log) -> None:
  log(f"machine: {platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}, each side in its own process")
  log(_header())
  for r in rows:
    log(_fmt_row(r))
  log("ratio = JAX steps/s over PyTorch steps/s (PyTorch ms / JAX ms); JAX 1st = compile + first call, seconds")


def run(sizes=(128, 256), batch: int = 2, rounds: int = 3, tiny: bool = False, with_torch: bool = True,
        log=print, with_jax: bool = True) -> list[dict]:
  """All rows; the PyTorch side only when torch is importable and `with_torch`, the JAX side when `with_jax`."""
  use_torch = with_torch and torch is not None
  log(f"machine: {platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__} on "
      f"{jax.devices()[0].platform}, " + (f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
                                          if use_torch else "PyTorch side skipped (torch not installed)"))
  log(_header())
  rows = []
  for size in sizes:
    config = make_config(size, batch, tiny)
    batch_np = _batch(size, batch)
    step, module = jax_train_step(config, batch_np)
    generator = models.Generator(config.model.generator, rngs=nnx.Rngs(0))
    nnx.update(generator, nnx.state(module.generators.global_net))
    t_fwd = torch_forward(config, generator, batch_np["pre"]) if use_torch else None
    j_fwd = jax_forward(config, generator, batch_np["pre"]) if with_jax else None
    rows.append(compare("generator forward", size, batch, j_fwd, t_fwd, rounds))
    log(_fmt_row(rows[-1]))
    t_step = torch_train_step(config, module, batch_np) if use_torch else None
    rows.append(compare("train step", size, batch, step if with_jax else None, t_step, rounds))
    log(_fmt_row(rows[-1]))
  log("ratio = JAX steps/s over PyTorch steps/s (PyTorch ms / JAX ms); JAX 1st = compile + first call, seconds")
  return rows


# ------------------------------------------------------------------------------------------------ JAX profiles
def _median_call(fn, rounds: int) -> float:
  fn()
  return statistics.median(_timed(fn) for _ in range(rounds))


def layer_profile(size: int = 256, batch: int = 2, rounds: int = 5, log=print) -> list[dict]:
  """Each convolution of the paper-size generator alone at its shape: forward and forward + backward (gradients
  with respect to kernel and input), jitted, with the XLA flop estimate. The 2x2 up-samplings both ways."""
  widths = tuple(int(w) for w in make_config(size, batch, False).model.generator.widths)
  shapes = [("enc1a", 3, widths[0], size), ("enc1b", widths[0], widths[0], size)]
  for i in range(1, len(widths)):
    shapes += [(f"enc{i + 1}a", sum(widths[:i]), widths[i], size >> i),
               (f"enc{i + 1}b", widths[i], widths[i], size >> i)]
  for level in range(len(widths) - 1, 0, -1):
    shapes += [(f"dec{level}a", 2 * widths[level - 1], widths[level - 1], size >> (level - 1)),
               (f"dec{level}b", widths[level - 1], widths[level - 1], size >> (level - 1))]
  shapes.append(("fuse", widths[0] + 3, widths[0], size))
  ups = [(f"up{level}", widths[level], widths[level - 1], size >> level) for level in range(len(widths) - 1, 0, -1)]
  rows = []
  log(f"{'layer':28s} {'in->out':>10s} {'px':>4s} {'fwd ms':>8s} {'GFLOP/s':>7s} {'fwd+bwd ms':>10s} {'GFLOP/s':>7s}"
      f"   load {os.getloadavg()[0]:.1f}")
  cases = [(n, ci, co, hw, "conv") for n, ci, co, hw in shapes]
  cases += [(n + " nnx.ConvTranspose", ci, co, hw, "lax") for n, ci, co, hw in ups]
  cases += [(n + " SubpixelConvTranspose", ci, co, hw, "subpixel") for n, ci, co, hw in ups]
  for name, cin, cout, hw, kind in cases:
    rngs = nnx.Rngs(0)
    if kind == "conv":
      # What the networks run: oneDNN on CPU when built (vcect_jax.cpu_kernels; VCECT_ONEDNN=0 for XLA's own).
      layer = nnx.Conv(cin, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs,
                       conv_general_dilated=layers.conv)
    else:
      cls = nnx.ConvTranspose if kind == "lax" else layers.SubpixelConvTranspose
      layer = cls(cin, cout, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(0), (batch, hw, hw, cin))
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(params, x).compile()
    fb = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.square(nnx.merge(graphdef, p)(x))), argnums=(0, 1)))
    fb = fb.lower(params, x).compile()
    t_f = _median_call(lambda: jax.block_until_ready(fwd(params, x)), rounds)
    t_b = _median_call(lambda: jax.block_until_ready(fb(params, x)), rounds)
    fl_f, fl_b = (c.cost_analysis().get("flops", 0.0) for c in (fwd, fb))
    if kind == "conv":  # XLA's cost analysis does not count a custom call's flops
      fl_f = 2.0 * batch * hw * hw * 9 * cin * cout
      fl_b = 3 * fl_f
    rows.append({"layer": name, "in": cin, "out": cout, "size": hw, "fwd_s": t_f, "fwd_bwd_s": t_b,
                 "fwd_gflops": fl_f / 1e9, "fwd_bwd_gflops": fl_b / 1e9})
    log(f"{name:28s} {cin:4d}->{cout:<5d} {hw:4d} {t_f * 1e3:8.1f} {fl_f / t_f / 1e9:7.0f} {t_b * 1e3:10.1f} "
        f"{fl_b / t_b / 1e9:7.0f}")
  for kind in ("conv", "nnx.ConvTranspose", "SubpixelConvTranspose"):
    sel = [r for r in rows if (kind in r["layer"]) or (kind == "conv" and "Transpose" not in r["layer"])]
    log(f"sum {kind:24s} fwd {sum(r['fwd_s'] for r in sel) * 1e3:8.1f} ms, fwd+bwd "
        f"{sum(r['fwd_bwd_s'] for r in sel) * 1e3:8.1f} ms")
  return rows


def swap_profile(size: int = 256, batch: int = 2, rounds: int = 3, log=print) -> dict:
  """Generator forward, forward + backward and the full train step with the sub-pixel transposed convolutions
  and with `nnx.ConvTranspose`'s own lowering (patched back in), alternating; medians in seconds."""
  config, batch_np = make_config(size, batch, False), _batch(size, batch)
  x, target = jnp.asarray(batch_np["pre"]), jnp.asarray(batch_np["post"])
  sides = {}
  for name, patch in [("SubpixelConvTranspose", None), ("nnx.ConvTranspose", nnx.ConvTranspose.__call__)]:
    with mock.patch.object(layers.SubpixelConvTranspose, "__call__", patch or layers.SubpixelConvTranspose.__call__):
      g = models.Generator(config.model.generator, rngs=nnx.Rngs(0))
      graphdef, params, rest = nnx.split(g, nnx.Param, ...)
      fwd = jax.jit(lambda p, r, x, gd=graphdef: nnx.merge(gd, p, r, copy=True)(x)).lower(params, rest, x).compile()
      loss = lambda p, r, x, t, gd=graphdef: jnp.mean(jnp.square(nnx.merge(gd, p, r, copy=True)(x) - t))
      fb = jax.jit(jax.value_and_grad(loss)).lower(params, rest, x, target).compile()
      step, _ = jax_train_step(config, batch_np)
      compile_s = _timed(step)
    sides[name] = {"generator forward": lambda c=fwd, p=params, r=rest: jax.block_until_ready(c(p, r, x)),
                   "generator fwd+bwd": lambda c=fb, p=params, r=rest: jax.block_until_ready(c(p, r, x, target)),
                   "train step": step, "compile_s": compile_s}
    log(f"{name}: train step compile + first call {compile_s:.1f} s; generator XLA GFLOP forward "
        f"{fwd.cost_analysis().get('flops', 0) / 1e9:.1f}, fwd+bwd {fb.cost_analysis().get('flops', 0) / 1e9:.1f}")
  result = {}
  for what in ("generator forward", "generator fwd+bwd", "train step"):
    load = os.getloadavg()[0]
    times = {name: [] for name in sides}
    for name in sides:
      sides[name][what]()
    for _ in range(rounds):
      for name in sides:
        times[name].append(_timed(sides[name][what]))
    med = {name: statistics.median(t) for name, t in times.items()}
    result[what] = med
    log(f"{what:18s} {size} px: nnx.ConvTranspose {med['nnx.ConvTranspose'] * 1e3:8.0f} ms, "
        f"SubpixelConvTranspose {med['SubpixelConvTranspose'] * 1e3:8.0f} ms, speed-up "
        f"{med['nnx.ConvTranspose'] / med['SubpixelConvTranspose']:.2f}x   load {load:.1f} -> {os.getloadavg()[0]:.1f}")
  return result


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="3 timed rounds (under 5 minutes on a 2-core CPU)")
  parser.add_argument("--tiny", action="store_true", help="32 px, narrow networks, 2 rounds (tests)")
  parser.add_argument("--sizes", default="", help="comma-separated image sizes (default 128,256; --tiny: 32)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=0, help="timed rounds (default 7, --quick 3, --tiny 2)")
  parser.add_argument("--no_torch", action="store_true", help="the JAX side only")
  parser.add_argument("--same_process", action="store_true",
                      help="both sides alternating in this process (biased against JAX: see `separate`); the "
                           "default runs each side in its own process, twice")
  parser.add_argument("--side", choices=("jax", "torch"), default="",
                      help="one side only, in this process (what the default's subprocesses run)")
  parser.add_argument("--passes", type=int, default=0,
                      help="processes per side, alternating (default 2, --tiny 1); more on a machine whose speed "
                           "drifts between minutes")
  parser.add_argument("--json", default="", help="also write the rows to this file")
  parser.add_argument("--layers", action="store_true", help="JAX only: per-layer profile of the generator")
  parser.add_argument("--swap", action="store_true",
                      help="JAX only: sub-pixel against lax.conv_transpose transposed convolutions")
  args = parser.parse_args(argv)
  sizes = tuple(int(s) for s in args.sizes.split(",") if s) or ((32,) if args.tiny else (128, 256))
  rounds = args.rounds or (2 if args.tiny else 3 if args.quick else 7)
  if args.layers or args.swap:
    size = sizes[-1] if args.sizes else 256
    rows = (layer_profile(size, args.batch, args.rounds or 5) if args.layers
            else [swap_profile(size, args.batch, args.rounds or 3)])
  elif args.side:
    rows = run(sizes, args.batch, rounds, tiny=args.tiny, with_torch=args.side == "torch",
               with_jax=args.side == "jax")
  elif args.same_process or args.no_torch or torch is None:
    rows = run(sizes, args.batch, rounds, tiny=args.tiny, with_torch=not args.no_torch)
  else:
    passthrough = [f"--sizes={','.join(str(x) for x in sizes)}", f"--batch={args.batch}", f"--rounds={rounds}"]
    rows = separate(passthrough + (["--tiny"] if args.tiny else []), passes=args.passes or (1 if args.tiny else 2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
