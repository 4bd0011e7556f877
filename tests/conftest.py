"""Shared fixtures: the smoke configs and one converted phantom dataset + pretext checkpoint per test session."""

import os

# Tests run on the CPU, single-threaded XLA compiles are the bottleneck; keep TF quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def smoke_config(phase: str = "arterial"):
  import importlib

  return importlib.import_module(f"configs.{phase}").get_config("smoke")


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
  """A work directory whose embedded phantom dataset and pretext checkpoint are built once per session."""
  from vcect_jax import runtime

  workdir = str(tmp_path_factory.mktemp("smoke_shared"))
  config = runtime.prepare_inputs(smoke_config(), workdir)
  return {"workdir": workdir, "data_dir": config.data.dir, "pretext": config.perceptual.pretext_checkpoint}


@pytest.fixture
def smoke(smoke_workdir):
  """A smoke config that points at the shared dataset and pretext checkpoint."""
  config = smoke_config()
  config.data.dir = smoke_workdir["data_dir"]
  config.perceptual.pretext_checkpoint = smoke_workdir["pretext"]
  return config
