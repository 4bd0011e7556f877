"""The input pipeline benchmark reads real batches through the training input path (no timing assertions)."""

from benchmarks import input_bench


def test_input_bench_reads_batches_and_compares_with_the_step(smoke_workdir, capsys):
  out = input_bench.main(["--data_dir", smoke_workdir["data_dir"], "--batch", "2", "--seconds", "0.5",
                          "--step_ms", "1000"])
  assert out["batches"] >= 1 and out["slices_per_s"] > 0
  assert out["step_slices_per_s"] == 2.0 and out["ratio"] == out["slices_per_s"] / 2.0
  assert "slices/s" in capsys.readouterr().out
