"""The device mesh and the two shardings every step uses: batch split over 'data', state replicated.

One mesh is built once per run. The global batch is sharded along its leading axis over all devices of all
processes, parameters and optimiser states are replicated. A mean over the batch inside a jitted function is then
a mean over the global batch (XLA inserts the cross-device reduction), so BatchNorm statistics and losses cover
the global batch with no `pmap` or `pmean`.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(config) -> None:
  """Joins a multi-host run (TPU pods, multi-node GPU) when `config.distributed.enabled` is set.

  On TPU pods and SLURM clusters `jax.distributed.initialize()` finds the coordinator by itself; elsewhere the
  coordinator address, process count and id come from the config.
  """
  dist = config.get("distributed")
  if dist is None or not dist.enabled:
    return
  kwargs = {}
  if dist.coordinator_address:
    kwargs = dict(coordinator_address=dist.coordinator_address, num_processes=dist.num_processes,
                  process_id=dist.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("Joined distributed run: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis 'data'.

  The axis is `Auto`: the compiler propagates the batch sharding through the networks (reshapes of the dual
  path's quadrants included), so the model code carries no sharding annotations.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh) -> int:
  """The per-process batch; the global batch must split evenly over devices and processes."""
  devices = mesh.devices.size
  if global_batch % devices:
    raise ValueError(
        f"train.batch_size={global_batch} does not split over {devices} devices: choose a multiple of {devices} "
        "(--config.train.batch_size=...)")
  return global_batch // jax.process_count()


def fitting_batch_size(mesh, wanted: int, available: int) -> int:
  """`wanted` rounded down to a multiple of the mesh's devices (at least one example per device), at most
  `available` (also rounded down); 0 when there are fewer examples than devices."""
  devices = mesh.devices.size
  return min(max(wanted // devices, 1) * devices, available // devices * devices)


def replicate(tree, mesh):
  """Host-local values, identical on every process (same seed, same checkpoint), as arrays replicated over the
  mesh. Unlike `jax.device_put`, this needs no cross-host transfer: each process fills its own devices."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into one globally sharded array per feature."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
