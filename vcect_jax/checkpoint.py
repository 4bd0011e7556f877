"""Orbax checkpoints of a training run: network and optimiser state, input position and config, in one step.

Each checkpoint step holds three items:
  state:     the nnx state of every trained object (generator, discriminator, both optimisers), as a pure dict
             of arrays (`nnx.State.to_pure_dict`), restored against an abstract target with the run's shardings;
  data_iter: the grain iterator state (JSON), so that a resumed run reads exactly the batches it would have;
  config:    the config the run was trained with (JSON), so evaluation and inference need only the path.

Saves are asynchronous; `close()` waits for the last one. A SIGTERM (preemption on clouds and clusters) is
turned into a flag that the training loop polls: it then saves at the current step and exits cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
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


class Checkpointer:
  """A CheckpointManager in `workdir/checkpoints` that keeps the last `keep` steps."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
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
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match this model (was it trained with another "
          f"config? compare its config with yours): {e}") from e
    state = abstract_state
    state.replace_by_pure_dict(restored["state"])
    return state, restored["data_iter"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_config(checkpoint_dir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config stored with a checkpoint (latest step unless given)."""
  mngr = ocp.CheckpointManager(os.path.abspath(checkpoint_dir), item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
  cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  mngr.close()
  return ml_collections.ConfigDict(cfg)


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
