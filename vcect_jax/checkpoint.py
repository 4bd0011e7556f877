"""Orbax checkpoints of a training run: network and optimiser state, input position and config, in one step.

Each checkpoint step holds three items:
  state:     the method's named nnx state (e.g. `generators`, `discriminator`, `opt_g`, `opt_d`, `encoder`), as a
             pure dict of arrays (`nnx.State.to_pure_dict`), restored against an abstract target with the run's
             shardings;
  data_iter: the grain iterator state (JSON), so that a resumed run reads exactly the batches it would have;
  config:    the config the run was trained with (JSON), so evaluation and inference need only the path.

Saves are asynchronous; `close()` waits for the last one. A SIGTERM (preemption on clouds and clusters) is
turned into a flag that the training loop polls: it then saves at the current step and exits cleanly.

`Checkpointer.restore_latest` survives a damaged checkpoint (a disk fault, a copy cut short): it warns, moves the
unreadable step aside (`<checkpoints>.damaged/<step>`) and resumes from the newest step that restores.
`load_generator(path)` restores only the generator (no discriminator, no optimiser state) for evaluation and
inference, from a work directory, its `checkpoints/` folder or one step folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

ITEMS = ("state", "data_iter", "config")


class PreemptionFlag:
  """Set by SIGTERM (or by Orbax's multi-host preemption notice); polled by the loop between steps."""

  def __init__(self):
    self._event = threading.Event()
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    else:
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def restore_handler(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def absolute(path) -> str:
  """An absolute local path (`~` expanded), or a cloud path (`gs://...`, which Orbax, TensorBoard and etils.epath
  read and write) as it is."""
  path = os.fspath(path) if not isinstance(path, str) else path
  if "://" in path:
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


class Checkpointer:
  """A CheckpointManager in `workdir/checkpoints` that keeps the last `keep` steps (local or gs:// paths)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = absolute(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: nnx.State, data_iter_state: dict, config) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.to_pure_dict()),
        data_iter=ocp.args.JsonSave(_jsonable(data_iter_state)),
        config=ocp.args.JsonSave(config_to_json(config)),
    ), force=True)

  def restore(self, step: int, abstract_state: nnx.State) -> tuple[nnx.State, dict]:
    """Restores `state` onto the shardings of `abstract_state` (from `nnx.eval_shape` + shardings)."""
    target = jax.tree.map(_as_restore_target, abstract_state.to_pure_dict())
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data_iter=ocp.args.JsonRestore()))
    except (KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match this model (was it trained with another "
          f"config? compare its config with yours): {e}") from e
    state = abstract_state
    state.replace_by_pure_dict(restored["state"])
    return state, restored["data_iter"]

  def restore_latest(self, abstract_state: nnx.State) -> tuple[int, nnx.State, dict] | None:
    """(step, state, data_iter state) of the newest step that restores; None when there is no checkpoint.

    A step that cannot be read is reported, moved to `<directory>.damaged/` (so that the run can save that
    step again later) and the next older step is tried. With none readable, a ValueError names them all.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    problems = []
    for step in steps:
      try:
        state, iter_state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  (Orbax and TensorStore raise many types)
        reason = str(e).splitlines()[0][:300]
        problems.append(f"step {step}: {reason}")
        logging.warning("checkpoint step %d in %s cannot be restored (%s); trying an older one", step,
                        self.directory, reason)
        continue
      if problems:
        self._set_aside([s for s in steps if s > step])
      return step, state, iter_state
    if steps:
      raise ValueError(f"no checkpoint in {self.directory} can be restored ({'; '.join(problems)}). If the config "
                       "changed since they were written, compare it with the stored one; otherwise move the folder "
                       "away to start the run afresh, or point the run at another work directory")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable steps out of the manager's directory, keeping them for inspection."""
    if jax.process_index() == 0:
      damaged = epath.Path(self.directory + ".damaged")
      damaged.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = damaged / str(step)
        if target.exists():
          target.rmtree()
        (epath.Path(self.directory) / str(step)).rename(target)
        logging.warning("moved the unreadable checkpoint step %d to %s", step, target)
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _read_only_manager(checkpoint_dir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(absolute(checkpoint_dir), item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True))


def read_config(checkpoint_dir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config stored with a checkpoint (latest step unless given)."""
  mngr = _read_only_manager(checkpoint_dir)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  finally:
    mngr.close()
  return ml_collections.ConfigDict(cfg)


def resolve(path: str) -> tuple[str, int | None]:
  """(checkpoints directory, step or None for the latest) of a work directory, checkpoints folder or step."""
  path = epath.Path(absolute(path))  # local or gs://
  if path.name.isdigit() and (path / "state").is_dir():
    return str(path.parent), int(path.name)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
    return str(path), None
  raise FileNotFoundError(
      f"no checkpoint at {path!r}: give a training work directory, its checkpoints/ folder or one step folder "
      "(checkpoints/<step>)")


@dataclasses.dataclass
class LoadedGenerator:
  """A trained generator, in eval mode: `generator(pre)` maps `(B, H, W, 3)` to `(B, H, W, 1)`, model space."""

  config: ml_collections.ConfigDict  # the config the checkpoint was trained with
  generator: nnx.Module
  step: int
  path: str  # the step folder it came from


def inference_config(config: ml_collections.ConfigDict, backend: str | None = None) -> ml_collections.ConfigDict:
  """The config to build a checkpoint's generator with for inference on `backend` (default: JAX's).

  A run trained with `model.compute_dtype='bfloat16'` (mixed precision, for accelerators) keeps it on GPU and TPU;
  on CPU its generator computes in float32 instead: bfloat16 convolutions are slower on the CPU than float32 ones
  (benchmarks/RESULTS.md, "Performance"), miss its optimised convolutions (`vcect_jax.cpu_kernels`), and round
  the virtual image to bf16's 8 bits. The parameters are float32 either way, so the checkpoint restores the same.
  """
  backend = backend or jax.default_backend()
  model = config.get("model", {})
  if backend != "cpu" or str(model.get("compute_dtype", "float32")) == "float32":
    return config
  logging.info("the checkpoint was trained with model.compute_dtype=%s; on CPU its generator runs in float32",
               model.get("compute_dtype"))
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.compute_dtype = "float32"
  for net in ("generator", "discriminator"):
    if net in config.model and "compute_dtype" in config.model[net]:
      config.model[net].compute_dtype = "float32"
  return config


def load_generator(path: str) -> LoadedGenerator:
  """Restores only the generator of a checkpoint (no discriminator, no optimiser state), built with
  `inference_config` (a mixed-precision run's generator computes in float32 on CPU).

  Args:
    path: a training work directory, its `checkpoints/` folder, or one step folder (`checkpoints/<step>`).
  """
  from vcect_jax import methods  # pylint: disable=g-import-not-at-top

  checkpoint_dir, step = resolve(path)
  mngr = _read_only_manager(checkpoint_dir)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    config = ml_collections.ConfigDict(
        mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    method = methods.create(inference_config(config))
    generator = method.build_generator()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(generator).to_pure_dict())
    target = abstract
    for key in reversed(method.generator_key):
      target = {key: target}
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"the generator of checkpoint {checkpoint_dir}/{step} cannot be restored: {e}") from e
  finally:
    mngr.close()
  tree = restored["state"]
  for key in method.generator_key:
    tree = tree[key]
  state = nnx.state(generator)
  state.replace_by_pure_dict(jax.tree.map(jax.numpy.asarray, tree))
  nnx.update(generator, state)
  generator.eval()
  return LoadedGenerator(config=config, generator=generator, step=int(step),
                         path=os.path.join(checkpoint_dir, str(step)))


def config_to_json(config) -> dict:
  return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def _jsonable(tree):
  return json.loads(json.dumps(tree, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _as_restore_target(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return x
