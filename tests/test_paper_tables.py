"""benchmarks/paper_tables.py: the tables it writes (its runs are benchmarks, not tests)."""

import argparse
import json

import pytest

from benchmarks import paper_tables


def test_paper_tables_name_each_phases_window(tmp_path):
  """The Tables 1-2 analogues say through which CT window each phase's paper-mode columns were computed (the
  arterial and delayed `:demo` are not the paper's W400/L30)."""
  def run(window):
    psnr = {"paper/psnr": {"mean": 27.8, "std": 0.3, "n": 4}}
    return {"overall": {"model": psnr, "identity": psnr}, "cases": 4, "step": 800, "window": window}

  results = {"arterial": {"proposed": run("W600/L130"), "no_discriminator": run("W600/L130")},
             "portal": {"proposed": run("W400/L30")}}
  args = argparse.Namespace(workdir=str(tmp_path), variant="demo", split="test", folds=0)
  table1 = open(paper_tables.write_tables(results, args)[0]).read()
  assert "through each phase's CT window (arterial W600/L130, portal W400/L30)" in table1


def test_a_finished_run_on_other_data_is_not_reused(tmp_path):
  """A rerun reuses a finished run (`done.json`) only if it was trained on the data the work directory holds now:
  after the phantom was made again with other settings, it stops with what to do instead of mixing rows trained on
  other cases (maybe the new test split's) into the tables."""
  from tests.conftest import smoke_config  # pylint: disable=g-import-not-at-top

  config = smoke_config()
  data = paper_tables.trained_on(config, str(tmp_path / "data"))
  done = tmp_path / "done.json"
  done.write_text(json.dumps({"train_s": 1.0, "data": data}))
  paper_tables.check_reusable(str(done), data)   # the same data: reused
  config.data.phantom.cases += 1
  other = paper_tables.trained_on(config, str(tmp_path / "data"))
  with pytest.raises(SystemExit, match="other training data.*Delete that run folder"):
    paper_tables.check_reusable(str(done), other)
  done.write_text(json.dumps({"train_s": 1.0}))   # a run from before the check
  with pytest.raises(SystemExit, match="not recorded"):
    paper_tables.check_reusable(str(done), data)


def test_a_finished_run_with_another_recipe_is_not_reused(tmp_path, capsys):
  """A rerun reuses a finished run only if its row's config trains the same way as then (the `:demo` recipe may have
  changed since): another setting stops it, naming the setting; where it is written, how often it logs and how it is
  evaluated do not; a setting the record lacks (an option added since) is not compared; a run recorded before the
  recipe was kept is reused with a warning."""
  from tests.conftest import smoke_config  # pylint: disable=g-import-not-at-top

  config = smoke_config()
  data = paper_tables.trained_on(config, str(tmp_path / "data"))
  trained = paper_tables.recipe(config)
  assert trained["loss.pixel_weight"] == config.loss.pixel_weight and "mode" not in trained
  done = tmp_path / "done.json"
  done.write_text(json.dumps({"train_s": 1.0, "data": data, "recipe": trained}))
  config.train.log_every, config.data.dir, config.eval.split = 7, "/elsewhere", "validation"
  paper_tables.check_reusable(str(done), data, paper_tables.recipe(config))   # reused
  now = paper_tables.recipe(config)
  now["registration.an_option_added_since"] = 1
  paper_tables.check_reusable(str(done), data, now)   # reused: not in the record
  config.registration.enabled = True
  with pytest.raises(SystemExit, match=r"other settings .*registration\.enabled: false -> true.*Delete that run"):
    paper_tables.check_reusable(str(done), data, paper_tables.recipe(config))
  done.write_text(json.dumps({"train_s": 1.0, "data": data}))   # a run from before the recipe was kept
  paper_tables.check_reusable(str(done), data, paper_tables.recipe(config))
  assert "does not record the settings" in capsys.readouterr().err
