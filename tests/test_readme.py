"""Every command in the README's code blocks is exercised: a README command that no longer works fails here.

Each command is taken from the README's ```bash blocks (continuation lines joined, comments dropped) and checked
without running its job:
  * `python -m vcect_jax.main ...`: its flags and config overrides parsed by the entry point's own parser
    (`vcect_jax.main.parse_flags`: the config file loads, the variant exists, every `--config.FIELD` exists);
  * `python -m vcect_jax.infer ...`, `python -m data_prep.convert ...`: parsed by their argparse parsers;
  * `make demo`, `make test`: `make -n` shows they run the documented command;
  * `tfds build data_prep/vcect_dataset ...`: the builder folder, the `tfds` command and the builder config exist;
  * `tensorboard ...`: the command is installed;
  * `pip install ...` (the GPU/TPU builds of JAX): not run here (network, hardware); listed in NOT_RUN.
A command of any other kind fails `test_every_command_is_handled`, so a new kind gets a check before it ships.
Commands written inline in the prose: `python -m MODULE` must answer `--help`; `pip install` only the package or
Jupyter.

Which commands run for real elsewhere, at smoke size: `make test` is CI's command (.ci/run); the main entry in
modes train, prepare, pretrain and eval (tests/test_main.py, test_train.py, test_pretrain.py, test_evaluate.py),
baselines (test_baselines.py), `python -m vcect_jax.infer` (test_infer.py), `python -m data_prep.convert`
(test_convert.py), `tfds build data_prep/vcect_dataset` exactly as written here (test_vcect_dataset.py), and the
demo itself by `python -m benchmarks.demo_run` (benchmarks/RESULTS.md).
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOT_RUN = {"pip install"}  # installs of the accelerator builds of JAX: need the network and the hardware


def readme_commands() -> list[list[str]]:
  """The commands of the README's ```bash blocks, as argument lists."""
  blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
  commands = []
  for block in blocks:
    for line in block.replace("\\\n", " ").splitlines():
      words = shlex.split(line, comments=True)
      if words:
        commands.append(words)
  return commands


def kind(words: list[str]) -> str:
  if words[:2] == ["python", "-m"]:
    return f"python -m {words[2]}"
  if words[0] in ("make", "tfds", "pip"):
    return f"{words[0]} {words[1]}"
  return words[0]


COMMANDS = readme_commands()
HANDLED = {"python -m vcect_jax.main", "python -m vcect_jax.infer", "python -m data_prep.convert", "make demo",
           "make test", "tfds build", "tensorboard"} | NOT_RUN


def _of(k: str) -> list[list[str]]:
  return [c for c in COMMANDS if kind(c) == k]


def test_the_readme_has_the_workflow_commands():
  kinds = {kind(c) for c in COMMANDS}
  assert {"make demo", "make test", "python -m vcect_jax.main", "python -m vcect_jax.infer",
          "python -m data_prep.convert", "tfds build"} <= kinds
  assert len(_of("python -m vcect_jax.main")) >= 8  # demo, eval, pretext, three phases, a baseline, evaluation


def test_every_command_is_handled():
  assert not [c for c in COMMANDS if kind(c) not in HANDLED], "give this kind of README command a check here"


MAIN_COMMANDS = [c[3:] for c in _of("python -m vcect_jax.main")]


@pytest.mark.parametrize("argv", MAIN_COMMANDS, ids=lambda a: " ".join(a)[:80])
def test_main_command_parses(argv):
  """The entry point's own parser, in a fresh process (absl flags are global): nothing runs."""
  script = (
      "import json, sys\n"
      "from vcect_jax import main\n"
      "main.parse_flags(['main'] + sys.argv[1:])\n"
      "config = main.FLAGS.config\n"
      "print(json.dumps({'mode': config.mode, 'phase': config.phase, 'data_dir': config.data.dir,\n"
      "                  'workdir': main.FLAGS.workdir}))\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  done = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  config = json.loads(done.stdout.strip().splitlines()[-1])
  assert config["mode"] == ("eval" if "--config.mode=eval" in argv else
                            "pretrain" if argv[0].startswith("--config=configs/pretrain.py") else "train")
  for arg in argv:  # the overrides took effect
    if arg.startswith("--config.data.dir="):
      assert config["data_dir"] == arg.split("=", 1)[1]
    if arg.startswith("--workdir="):
      assert config["workdir"] == arg.split("=", 1)[1]


def test_main_commands_cover_the_workflow():
  phases = {a.split("/")[-1].split(".py")[0] for argv in MAIN_COMMANDS for a in argv if a.startswith("--config=")}
  assert {"arterial", "portal", "delayed", "pretrain"} <= phases
  assert any("--config.mode=eval" in argv for argv in MAIN_COMMANDS)


def test_infer_commands_parse():
  from vcect_jax import infer

  commands = _of("python -m vcect_jax.infer")
  assert commands
  for command in commands:
    args = infer.parse_args(command[3:])
    assert args.checkpoint and args.input and args.output


def test_convert_commands_parse():
  from data_prep import convert

  commands = _of("python -m data_prep.convert")
  assert commands
  for command in commands:
    settings = convert.parse_args(command[3:])
    assert settings.input and settings.output


@pytest.mark.parametrize("target", ["demo", "test"])
def test_make_targets_run_the_documented_commands(target):
  if not shutil.which("make"):
    pytest.skip("make is not installed")
  assert _of(f"make {target}")
  done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  expected = {"demo": " -m vcect_jax.main --config=configs/arterial.py:demo --workdir=workdir/demo_arterial",
              "test": " -m pytest -q"}[target]
  assert expected in done.stdout
  if target == "demo":  # the command the README spells out is the one make runs
    assert ["python", "-m", *expected.split()[1:]] in COMMANDS


def test_tfds_build_commands_name_the_builder():
  from data_prep.vcect_dataset import Builder

  commands = _of("tfds build")
  assert commands
  configs = {c.name for c in Builder.BUILDER_CONFIGS}
  for command in commands:
    assert (ROOT / command[2]).is_dir() and (ROOT / command[2] / "vcect_dataset.py").exists()
    config = [w.split("=", 1)[1] for w in command if w.startswith("--config=")]
    assert config and config[0] in configs, (config, configs)
  assert os.path.exists(os.path.join(os.path.dirname(sys.executable), "tfds")) or shutil.which("tfds")


def test_tensorboard_is_installed():
  assert _of("tensorboard")
  assert os.path.exists(os.path.join(os.path.dirname(sys.executable), "tensorboard")) or shutil.which("tensorboard")


def test_not_run_commands_are_only_the_accelerator_installs():
  for command in [c for c in COMMANDS if kind(c) in NOT_RUN]:
    assert command[:3] == ["pip", "install", "-U"] and command[3] in ("jax[cuda12]", "jax[cuda13]", "jax[tpu]"), command


def test_inline_python_commands_run_their_help():
  """`python -m MODULE` written inline in the prose (not in a code block) names a module whose --help works."""
  modules = sorted(set(re.findall(r"`python -m ([\w.]+)[^`]*`", README.read_text())))
  assert "configs.reference" in modules
  for module in modules:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and "usage" in done.stdout.lower(), (module, done.stderr[-2000:])


def test_inline_pip_installs_are_known():
  """Inline `pip install ...` mentions: the package itself (`make` runs it) and Jupyter (optional)."""
  installs = set(re.findall(r"`(pip install [^`]*)`", README.read_text()))
  assert installs <= {"pip install -e .", "pip install jupyterlab"}, installs


def test_demo_time_matches_the_benchmark_results():
  """The README's one measured demo time is a figure of benchmarks/RESULTS.md."""
  claim = re.search(r"\*\*Measured:\*\* the demo took \*\*(\d+) s\*\*", README.read_text())
  assert claim, "the README states the demo's measured time as '**Measured:** the demo took **N s**'"
  results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
  assert re.search(rf"\| {claim.group(1)} s \|", results), f"{claim.group(1)} s is not in benchmarks/RESULTS.md"
