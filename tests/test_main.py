"""`python -m vcect_jax.main`: command-line and configuration mistakes end in one message and exit status 2."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, env=None):
  return subprocess.run([sys.executable, "-m", "vcect_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, check=False, env=dict(os.environ, **(env or {})))


def _one_error_line(proc) -> str:
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  return errors[0]


def test_missing_config_file():
  line = _one_error_line(_main("--config=configs/missing.py"))
  assert "configs/missing.py" in line
  assert len(_main("--config=configs/missing.py").stderr.strip().splitlines()) == 1


def test_misspelt_field_suggests_the_field():
  proc = _main("--config=configs/arterial.py:smoke", "--config.train.stepz=5", "--workdir=unused")
  line = _one_error_line(proc)
  assert "config.train.stepz" in line and "did you mean config.train.steps?" in line
  assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_variant_and_missing_config_flag():
  line = _one_error_line(_main("--config=configs/arterial.py:bogus"))
  assert "'bogus'" in line and "smoke" in line
  assert "--config" in _one_error_line(_main())


def test_traceback_flag_shows_the_traceback():
  proc = _main("--config=configs/arterial.py:smoke", "--config.train.stepz=5", "--traceback")
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_batch_that_does_not_split_over_the_devices_stops_before_any_work(tmp_path):
  workdir = tmp_path / "run"
  proc = _main("--config=configs/arterial.py:smoke", "--config.train.batch_size=2", f"--workdir={workdir}",
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
  line = _one_error_line(proc)
  assert "train.batch_size=2" in line and "4 devices" in line and "--config.train.batch_size=4" in line
  assert not workdir.exists(), "the phantom was generated before the batch size was checked"


def test_invalid_mode_is_a_config_error(tmp_path):
  from configs import arterial
  from vcect_jax import runtime

  config = arterial.get_config("smoke")
  config.mode = "trian"
  with pytest.raises(ValueError, match="config.mode='trian'"):
    runtime.dispatch(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_help_explains_every_option_with_its_default_and_an_example():
  proc = _main("--help")
  assert proc.returncode == 0, proc.stderr
  for option in ("--config=FILE[:VARIANT]", "--config.FIELD=VALUE", "--workdir=DIR", "--[no]traceback", "--helpfull"):
    assert option in proc.stdout
  assert "default: workdir/<mode>_<phase>" in proc.stdout
  assert "examples:" in proc.stdout and "configs/arterial.py:demo" in proc.stdout
