"""benchmarks/paper_tables.py: the tables it writes (its runs are benchmarks, not tests)."""

import argparse

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
