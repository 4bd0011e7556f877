"""Evaluation mode: report files from a smoke checkpoint, the identity row against the records, clear errors."""

import csv
import json
import math
import os

import numpy as np
import pytest

from tests.conftest import smoke_config
from vcect_jax import evaluate
from vcect_jax import hu
from vcect_jax import metrics


def _ensure_dataset(config, workdir):
  from data_prep import prepare
  return prepare.ensure_dataset(config, workdir)


def _config(data_dir=""):
  config = smoke_config()
  config.loss.use_perceptual = False          # no pretext encoder needed for a checkpoint
  config.perceptual.init_generator = False
  config.data.dir = data_dir
  return config


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
  """A converted smoke phantom and a step-0 checkpoint of the smoke model, written by the training's own
  Checkpointer (the same state, iterator and config items as a training run; untrained weights)."""
  from flax import nnx

  from vcect_jax import checkpoint
  from vcect_jax import methods

  root = str(tmp_path_factory.mktemp("eval_smoke"))
  data_dir = _ensure_dataset(_config(), root)
  config = _config(data_dir)
  run_dir = os.path.join(root, "run")
  state = nnx.state(methods.create(config).create_state(steps_per_epoch=1))
  checkpointer = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False)
  checkpointer.save(0, state, {}, config)
  checkpointer.close()
  return {"data_dir": data_dir, "run_dir": run_dir, "root": root}


def _eval_config(smoke_checkpoint, **eval_fields):
  config = _config()
  config.mode = "eval"
  config.eval.checkpoint = smoke_checkpoint["run_dir"]
  config.eval.split = "train"                 # the smoke phantom's largest split (3 cases)
  config.eval.batch_size = 4
  config.eval.update(eval_fields)
  return config


@pytest.fixture(scope="module")
def report(smoke_checkpoint):
  config = _eval_config(smoke_checkpoint, report_dir=os.path.join(smoke_checkpoint["root"], "report"))
  return evaluate.run(config, smoke_checkpoint["root"])


def test_report_files(report):
  names = sorted(os.path.basename(p) for p in report["files"])
  assert names == ["enhancement_arterial.png", "figure7_arterial_axial.png", "figure7_arterial_coronal.png",
                   "metrics_arterial.csv", "metrics_arterial.json", "table_arterial.md"]
  for path in report["files"]:
    assert os.path.getsize(path) > 0
    if path.endswith(".png"):
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert report["cases"] == 3 and report["step"] == 0 and report["phase"] == "arterial"

  files = {os.path.basename(p): p for p in report["files"]}
  with open(files["metrics_arterial.json"]) as f:
    data = json.load(f)  # strict JSON: nan written as null
  assert set(data["overall"]) == {"model", "identity"}
  case = next(iter(data["cases"].values()))
  assert {"paper", "hu", "organs", "snu_roi", "through_plane", "slices"} <= set(case["methods"]["model"])
  assert len(case["methods"]["model"]["slices"]) == case["slices"]

  table = open(files["table_arterial.md"]).read()
  assert "| Proposed-AP (step 0) |" in table and "| Identity-AP |" in table
  assert "PSNR (dB) ↑" in table and "MAE (HU) ↓" in table and "aorta" in table

  with open(files["metrics_arterial.csv"]) as f:
    rows = list(csv.DictReader(f))
  overall = {(r["method"], r["metric"]): r for r in rows if r["case"] == "overall"}
  assert int(overall[("identity", "hu/mae")]["n"]) == 3
  assert float(overall[("model", "paper/psnr")]["value"]) == pytest.approx(
      report["overall"]["model"]["paper/psnr"]["mean"])
  assert len([r for r in rows if r["case"] != "overall" and r["metric"] == "hu/mae"]) == 2 * 3


def _cases_from_records(data_dir, split="train"):
  """case_id -> (pre_hu current (S, H, W), post_hu, body_mask, labels), slices sorted, read straight from the
  records without the evaluation code."""
  from data_prep import records

  source = records.load_split(os.path.join(data_dir, "arterial"), split)
  grouped = {}
  for i in range(len(source)):
    e = source[i]
    grouped.setdefault(e["case_id"].decode(), []).append(e)
  out = {}
  for case_id, examples in grouped.items():
    examples.sort(key=lambda e: int(e["slice_index"]))
    out[case_id] = tuple(np.stack([np.asarray(e[k]) for e in examples]) for k in ("pre", "post", "body_mask",
                                                                                   "labels"))
  return out


def test_identity_row_matches_metrics_on_the_records(report, smoke_checkpoint):
  with open(os.path.join(report["report_dir"], "metrics_arterial.json")) as f:
    data = json.load(f)
  cases = _cases_from_records(smoke_checkpoint["data_dir"])
  assert set(cases) == set(data["cases"])
  mae, psnr8, ssim_hu, liver_ratio = [], [], [], []
  for case_id, (pre, post, mask, labels) in cases.items():
    got = data["cases"][case_id]["methods"]["identity"]
    identity = pre[:, 1]
    mae.append(metrics.mae_hu(identity, post, mask))
    assert got["hu"]["mae"] == pytest.approx(mae[-1], rel=1e-9)
    ssim_hu.append(metrics.hu_ssim(identity, post, mask))
    assert got["hu"]["ssim"] == pytest.approx(ssim_hu[-1], rel=1e-9)
    psnr8.append(np.mean([metrics.paper_psnr(metrics.window_8bit(identity[s]), metrics.window_8bit(post[s]))
                          for s in range(len(post))]))
    assert got["paper"]["psnr"] == pytest.approx(psnr8[-1], rel=1e-9)
    organ = labels == metrics.ORGAN_LABELS["aorta"]
    assert got["organs"]["aorta"]["real_mean"] == pytest.approx(post[organ].mean(), rel=1e-6)
    assert got["organs"]["aorta"]["enhancement_ratio"] == 0.0  # the identity learns no enhancement
  overall = data["overall"]["identity"]
  assert overall["hu/mae"]["mean"] == pytest.approx(np.mean(mae))
  assert overall["hu/mae"]["std"] == pytest.approx(np.std(mae))
  assert overall["hu/ssim"]["mean"] == pytest.approx(np.mean(ssim_hu))
  assert overall["paper/psnr"]["mean"] == pytest.approx(np.mean(psnr8))


def test_model_row_is_the_generator_on_the_records(report, smoke_checkpoint):
  """The model's MAE of one case recomputed from the checkpoint's generator and the virtual-HU rule."""
  from vcect_jax import checkpoint

  loaded = checkpoint.load_generator(smoke_checkpoint["run_dir"])
  window = hu.Window.from_config(loaded.config.data.window)
  case_id, (pre, post, mask, _) = next(iter(_cases_from_records(smoke_checkpoint["data_dir"]).items()))
  x = np.moveaxis(hu.hu_to_model(pre.astype(np.float32), window), 1, -1)
  prediction = np.asarray(loaded.generator(x))[..., 0]
  virtual = evaluate.virtual_hu(prediction, pre[:, 1], window)
  with open(os.path.join(report["report_dir"], "metrics_arterial.json")) as f:
    got = json.load(f)["cases"][case_id]["methods"]["model"]["hu"]["mae"]
  assert got == pytest.approx(metrics.mae_hu(virtual, post, mask), abs=1e-3)


def test_virtual_hu_rule():
  window = hu.Window()  # -170 .. 230 HU
  pre = np.array([[-1000.0, -100.0, 50.0, 700.0, -150.0]])
  prediction = np.array([[0.0, 2.0, -0.5, 0.0, 0.0]])   # model space: 30, 430 (clipped to 230), -70, 30, 30 HU
  # Outside the window: the input; well inside: the virtual value; 20 HU inside the edge (half the 40 HU margin,
  # weight smoothstep(0.5) = 0.5): halfway between -150 and 30.
  np.testing.assert_allclose(evaluate.virtual_hu(prediction, pre, window),
                             [[-1000.0, 230.0, -70.0, 700.0, -60.0]], atol=1e-4)
  np.testing.assert_allclose(evaluate.virtual_hu(prediction, pre.astype(np.int16), window),
                             [[-1000.0, 230.0, -70.0, 700.0, -60.0]], atol=1e-4)


def test_summarize_skips_nan_and_keeps_inf():
  out = evaluate.summarize([{"a": 1.0, "b": math.nan, "c": math.inf}, {"a": 3.0, "b": math.nan, "c": 2.0}])
  assert out["a"] == {"mean": 2.0, "std": 1.0, "n": 2}
  assert out["b"]["n"] == 0 and math.isnan(out["b"]["mean"])
  assert out["c"]["mean"] == math.inf and out["c"]["n"] == 2


def test_clear_errors(smoke_checkpoint, tmp_path, monkeypatch):
  root = smoke_checkpoint["root"]
  with pytest.raises(evaluate.EvaluationError, match="set --config.eval.checkpoint"):
    evaluate.run(_eval_config(smoke_checkpoint, checkpoint=""), root)
  with pytest.raises(evaluate.EvaluationError, match="does not exist"):
    evaluate.run(_eval_config(smoke_checkpoint, checkpoint=str(tmp_path / "nowhere")), root)
  with pytest.raises(evaluate.EvaluationError, match="no checkpoint"):
    evaluate.run(_eval_config(smoke_checkpoint, checkpoint=str(tmp_path)), root)
  config = _eval_config(smoke_checkpoint)
  config.phase = "portal"
  with pytest.raises(evaluate.EvaluationError, match="trained for the arterial phase"):
    evaluate.run(config, root)
  with pytest.raises(evaluate.EvaluationError, match="no split 'nonsense'|cannot read"):
    evaluate.run(_eval_config(smoke_checkpoint, split="nonsense"), root)
  from vcect_jax import input_pipeline
  monkeypatch.setattr(input_pipeline, "load_source", lambda *args: [])
  with pytest.raises(evaluate.EvaluationError, match="has no examples"):
    evaluate.run(_eval_config(smoke_checkpoint), root)
  with pytest.raises(evaluate.EvaluationError, match="no examples"):
    evaluate.evaluate_source([], None, hu.Window())


@pytest.mark.parametrize("name,field", [("no_discriminator", ("loss", "use_discriminator")),
                                        ("no_perceptual", ("loss", "use_perceptual")),
                                        ("no_dual_path", ("dual_path", "enabled"))])
def test_ablation_configs_differ_from_their_phase_config_by_one_switch(name, field):
  import importlib

  from configs import portal

  ablation = importlib.import_module(f"configs.ablations.{name}").get_config("portal,smoke")
  proposed = portal.get_config("smoke")
  assert ablation[field[0]][field[1]] is False and proposed[field[0]][field[1]] is True
  ablation[field[0]][field[1]] = True
  assert ablation.to_dict() == proposed.to_dict()
  with pytest.raises(ValueError, match="phase"):
    importlib.import_module(f"configs.ablations.{name}").get_config("venous")


def test_perceptual_heatmaps_figure(tmp_path):
  """Figure 5: heatmaps are zero where virtual = real and the figure is written (a fresh encoder suffices)."""
  from flax import nnx

  from vcect_jax import models
  from vcect_jax import report as report_lib

  gen = smoke_config().model.generator
  encoder = models.Encoder(gen.in_channels, gen.widths, rngs=nnx.Rngs(0))
  encoder.eval()
  rng = np.random.default_rng(0)
  real = rng.uniform(-200, 250, (3, 32, 32)).astype(np.float32)
  figures = [{"case_id": "same", "real": real, "virtual": real.copy()},
             {"case_id": "other", "real": real, "virtual": real + 80.0}]
  evaluate.add_perceptual_heatmaps(figures, encoder, hu.Window())
  assert figures[0]["heatmaps"].shape == (4, 32, 32)
  np.testing.assert_allclose(figures[0]["heatmaps"], 0.0, atol=1e-12)
  assert (figures[1]["heatmaps"] >= 0).all() and figures[1]["heatmaps"].max() > 0
  path = report_lib.figure_perceptual(figures, str(tmp_path / "figure5.png"))
  assert os.path.getsize(path) > 0
