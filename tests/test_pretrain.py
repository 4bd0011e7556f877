"""Tests of the pretext pretraining: intensity levels, batching, training to high accuracy, checkpoint loading."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain as pretrain_configs
from data_prep import pretext_sources
from vcect_jax import hu
from vcect_jax import models
from vcect_jax import pretrain


def synthetic_stacks(n: int, size: int, seed: int) -> np.ndarray:
  """Phantom-like non-contrast stacks `(n, 3, size, size)` int16 HU: air, a fat-rimmed body of muscle, a liver,
  a spleen, two kidneys, the aorta and a vertebra, at random positions and sizes, with correlated noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  stacks = np.empty((n, 3, size, size), np.int16)

  def ellipse(cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

  for i in range(n):
    cy, cx = 0.5 + rng.uniform(-0.04, 0.04, 2)
    ry, rx = rng.uniform(0.3, 0.4), rng.uniform(0.38, 0.47)
    img = np.full((size, size), -1000.0)
    img[ellipse(cy, cx, ry, rx)] = rng.uniform(-120, -80)                       # subcutaneous fat
    img[ellipse(cy, cx, ry * 0.85, rx * 0.88)] = rng.uniform(40, 55)            # muscle / soft tissue
    img[ellipse(cy - 0.05, cx - 0.15, ry * 0.45, rx * 0.35)] = rng.uniform(50, 70)   # liver
    img[ellipse(cy - 0.08, cx + 0.2, ry * 0.2, rx * 0.15)] = rng.uniform(40, 55)     # spleen
    for side in (-1, 1):
      img[ellipse(cy + 0.1, cx + side * 0.12, 0.06, 0.04)] = rng.uniform(30, 45)   # kidneys
    img[ellipse(cy + 0.02, cx + 0.02, 0.03, 0.03)] = rng.uniform(30, 45)        # aorta
    img[ellipse(cy + 0.2, cx, 0.06, 0.06)] = rng.uniform(200, 400)              # vertebra
    noise = rng.normal(0, 12, (3, size // 4, size // 4)).repeat(4, 1).repeat(4, 2)  # spatially correlated
    stacks[i] = np.clip(img[None] + noise, -1024, 3071).astype(np.int16)
  return stacks


def smoke_config():
  config = pretrain_configs.get_config("smoke")
  # Wider than the shipped smoke networks, so that 40-60 steps reach a high accuracy.
  config.model.generator.widths = (8, 16, 32, 64, 128)
  config.model.classifier.hidden = (32, 16)
  config.pretrain.steps = 60
  config.pretrain.log_every = 20
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One smoke pretraining run on phantom non-contrast slices (data_prep.phantom), shared by the tests below."""
  config = smoke_config()
  config.data.phantom.cases = 4
  config.data.phantom.slices = 8
  train_source, validation_source = pretext_sources.phantom_sources(config)  # the last case validates
  assert len(train_source) == 24 and len(validation_source) == 8
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  return config, pretrain.pretrain(config, workdir, train_source, validation_source)


def test_pretrain_on_synthetic_ellipses(tmp_path):
  config = smoke_config()
  config.pretrain.steps = 40
  size = config.data.image_size
  result = pretrain.pretrain(config, str(tmp_path), pretext_sources.ArraySource(synthetic_stacks(32, size, 0)),
                             pretext_sources.ArraySource(synthetic_stacks(8, size, 1)))
  assert min(result["per_class_accuracy"].values()) > 0.9, result


def test_intensity_levels():
  pre_hu = jnp.asarray(np.array([[[[-1000, -170, 30, 230, 500]]] * 3]), jnp.int16)  # (1, 3, 1, 5)
  x, labels = pretrain.intensity_levels(pre_hu, (0.5, 1.0, 2.0), hu.Window(), clip=False)
  assert x.shape == (3, 1, 5, 3)
  np.testing.assert_array_equal(labels, [0, 1, 2])
  unit = np.array([0.0, 0.0, 0.5, 1.0, 1.0])  # the window clips HU first
  for k, alpha in enumerate((0.5, 1.0, 2.0)):
    np.testing.assert_allclose(x[k, 0, :, 1], unit * alpha * 2 - 1, atol=1e-6)
  clipped, _ = pretrain.intensity_levels(pre_hu, (0.5, 1.0, 2.0), hu.Window(), clip=True)
  np.testing.assert_allclose(clipped[2, 0, :, 1], np.minimum(unit * 2, 1) * 2 - 1, atol=1e-6)


def test_pretraining_resumes_exactly_on_the_shared_loop(tmp_path):
  """Pretext pretraining is a method of the shared loop: 4 steps straight equal 2 steps + a resumed 2."""
  config = smoke_config()
  config.pretrain.steps, config.pretrain.checkpoint_every = 4, 2
  size = config.data.image_size
  sources = (pretext_sources.ArraySource(synthetic_stacks(16, size, 0)),
             pretext_sources.ArraySource(synthetic_stacks(8, size, 1)))
  straight = pretrain.pretrain(config, str(tmp_path / "straight"), *sources)
  config.pretrain.steps = 2
  pretrain.pretrain(config, str(tmp_path / "resumed"), *sources)
  shutil.rmtree(tmp_path / "resumed" / "pretext")  # the export of the short run; its checkpoints stay
  config.pretrain.steps = 4
  resumed = pretrain.pretrain(config, str(tmp_path / "resumed"), *sources)
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2", "4"]
  a, b = jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert straight["per_class_accuracy"] == resumed["per_class_accuracy"]


def test_empty_validation_split_stops_before_training(tmp_path):
  config = smoke_config()
  size = config.data.image_size
  with pytest.raises(ValueError, match="validation split is empty"):
    pretrain.pretrain(config, str(tmp_path), pretext_sources.ArraySource(synthetic_stacks(8, size, 0)),
                      pretext_sources.ArraySource(synthetic_stacks(8, size, 0)[:0]))
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("variant", ["smoke", "demo"])
@pytest.mark.parametrize("phase", ["", "arterial", "portal", "delayed"])
def test_pretrain_variants_share_the_phase_variants_networks_and_window(variant, phase):
  """A pretext checkpoint of configs/pretrain.py:<variant>[,<phase>] must fit configs/<phase>.py:<variant>
  (networks and window: the arterial and delayed `:demo` have their own windows); no phase means arterial."""
  import importlib  # pylint: disable=import-outside-toplevel

  arg = f"{variant},{phase}" if phase else variant
  ours = pretrain_configs.get_config(arg)
  theirs = importlib.import_module(f"configs.{phase or 'arterial'}").get_config(variant)
  assert ours.model.generator.to_dict() == theirs.model.generator.to_dict()
  assert ours.model.classifier.to_dict() == theirs.model.classifier.to_dict()
  assert ours.data.window.to_dict() == theirs.data.window.to_dict()


def test_pretext_per_window_one_encoder_per_window(monkeypatch, tmp_path):
  """Phases that share a data set share a pretext encoder only where their windows agree (the arterial and delayed
  `:demo` have their own): the notebooks' `train_phases` and `benchmarks.paper_tables` pretrain through this."""
  import importlib  # pylint: disable=import-outside-toplevel

  calls = []
  monkeypatch.setattr(pretrain, "ensure_pretext_checkpoint",
                      lambda config, workdir: calls.append(workdir) or os.path.join(workdir, "pretrain", "pretext"))
  made, paths = {}, {}
  for phase in ("arterial", "portal", "delayed"):
    config = importlib.import_module(f"configs.{phase}").get_config("demo")
    paths[phase] = pretrain.pretext_per_window(config, str(tmp_path), made)
  delayed_w400 = importlib.import_module("configs.delayed").get_config("demo")
  delayed_w400.data.window.update(level=30.0, width=400.0)
  paths["delayed W400/L30"] = pretrain.pretext_per_window(delayed_w400, str(tmp_path), made)
  # each window pretrained once, the first under the work directory itself
  assert calls == [str(tmp_path), str(tmp_path / "window_W400_L30"), str(tmp_path / "window_W1000_L330")]
  assert paths["arterial"] == str(tmp_path / "pretrain" / "pretext")
  assert paths["portal"] == paths["delayed W400/L30"]
  assert len({paths["arterial"], paths["portal"], paths["delayed"]}) == 3
  assert set(made) == {(130.0, 600.0), (30.0, 400.0), (330.0, 1000.0)}


def test_pretext_per_window_across_invocations_keeps_each_window_in_its_place(monkeypatch, tmp_path):
  """A second invocation on the same work directory (paper_tables --phases=arterial, then --phases=portal) must not
  hand the encoder already under <workdir>/pretrain (arterial, W600/L130) to another window's runs, nor pretrain a
  second encoder into that place: the other window goes to its window folder, the same window reuses it."""
  import importlib  # pylint: disable=import-outside-toplevel

  existing = pretrain.export_path(str(tmp_path / "pretrain"))
  os.makedirs(existing)
  monkeypatch.setattr(pretrain, "read_description",
                      lambda path: (150, {"window": {"level": 130.0, "width": 600.0}}) if path == existing else
                      (_ for _ in ()).throw(FileNotFoundError(path)))
  calls = []
  monkeypatch.setattr(pretrain, "ensure_pretext_checkpoint",
                      lambda config, workdir: calls.append(workdir) or pretrain.export_path(
                          os.path.join(workdir, "pretrain")))
  made = {}
  portal = pretrain.pretext_per_window(importlib.import_module("configs.portal").get_config("demo"), str(tmp_path),
                                       made)
  assert calls == [str(tmp_path / "window_W400_L30")] and portal != existing
  arterial = pretrain.pretext_per_window(importlib.import_module("configs.arterial").get_config("demo"),
                                         str(tmp_path), made)
  assert arterial == existing and calls[-1] == str(tmp_path)  # the arterial encoder found where it was made


def test_demo_windows_arterial_and_delayed_wider_portal_the_papers():
  from configs import arterial, delayed, portal  # pylint: disable=import-outside-toplevel

  assert arterial.get_config("demo").data.window.to_dict() == {"level": 130.0, "width": 600.0}
  assert delayed.get_config("demo").data.window.to_dict() == {"level": 330.0, "width": 1000.0}
  assert portal.get_config("demo").data.window.to_dict() == {"level": 30.0, "width": 400.0}
  for module in (arterial, portal, delayed):  # the paper's window and unweighted pixel term
    assert module.get_config().data.window.to_dict() == {"level": 30.0, "width": 400.0}
    assert module.get_config().loss.pixel_enhancement_weight == 0.0
  # the delayed `:demo` weighs the excreted contrast's pixels, where the non-contrast pixel can enhance
  assert delayed.get_config("demo").loss.pixel_enhancement_weight == 2.0
  assert tuple(delayed.get_config("demo").loss.pixel_enhancement_pre_hu) == (-20.0, 150.0)
  assert arterial.get_config("demo").loss.pixel_enhancement_weight == 0.0
  with pytest.raises(ValueError, match="unknown variant 'demo,venous'"):
    pretrain_configs.get_config("demo,venous")


def test_pretrain_reaches_high_validation_accuracy(trained):
  _, result = trained
  accuracy = result["per_class_accuracy"]
  assert set(accuracy) == {"0.5", "1", "1.5", "2"}
  assert min(accuracy.values()) > 0.9, accuracy
  assert np.isfinite(result["final_loss"]) and result["steps"] == 60
  assert os.path.isdir(result["checkpoint"])


def test_init_generator_copies_the_encoder_exactly_and_nothing_else(trained):
  config, result = trained
  generator = models.Generator(config.model.generator, rngs=nnx.Rngs(7))
  encoder_before = jax.tree.map(np.array, nnx.state(generator.encoder))
  rest_before = {k: jax.tree.map(np.array, nnx.state(v)) for k, v in vars(generator).items()
                 if isinstance(v, nnx.Module | nnx.List) and k != "encoder"}
  assert rest_before  # the decoder and head exist

  pretrain.init_generator_from_pretext(generator, result["checkpoint"])

  pretext = pretrain.load_pretext_encoder(result["checkpoint"], config)
  expected = jax.tree.leaves(nnx.state(pretext))
  copied = jax.tree.leaves(nnx.state(generator.encoder))
  assert len(expected) == len(copied) > 0
  for a, b in zip(expected, copied):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(encoder_before), copied))
  for name, before in rest_before.items():
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(getattr(generator, name)))):
      np.testing.assert_array_equal(a, b)


def test_pretext_encoder_gives_perceptual_features(trained):
  config, result = trained
  encoder = pretrain.load_pretext_encoder(result["checkpoint"], config)
  img = hu.hu_to_model(jnp.asarray(synthetic_stacks(2, config.data.image_size, 5)[:, 1, :, :, None]))
  loss, _ = models.perceptual.perceptual_loss(encoder, img, img)
  assert float(loss) == 0.0
  brighter, _ = models.perceptual.perceptual_loss(encoder, img + 0.2, img)
  assert float(brighter) > 0


def test_missing_checkpoint_gives_a_clear_error(tmp_path):
  config = smoke_config()
  with pytest.raises(FileNotFoundError, match="run the pretext pretraining first"):
    pretrain.load_pretext_encoder(str(tmp_path / "nowhere"), config)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no checkpoint steps"):
    pretrain.load_pretext_encoder(str(tmp_path / "empty"), config)


def test_incompatible_checkpoint_gives_a_clear_error(trained):
  config, result = trained
  other = smoke_config()
  other.model.generator.widths = (8, 16, 32, 64, 64)
  with pytest.raises(ValueError, match="widths"):
    pretrain.load_pretext_encoder(result["checkpoint"], other)
  generator = models.Generator(other.model.generator, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pretrain again"):
    pretrain.init_generator_from_pretext(generator, result["checkpoint"])


def test_checkpoint_of_another_window_is_refused(trained):
  """A pretext encoder pretrained with W400/L30 must not serve a model trained with another window."""
  config, result = trained
  other = config.copy_and_resolve_references()
  other.data.window.update(level=330.0, width=1000.0)
  with pytest.raises(ValueError, match="W400/L30 but the model uses W1000/L330"):
    pretrain.load_pretext_encoder(result["checkpoint"], other)
  generator = models.Generator(config.model.generator, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="window"):
    pretrain.init_generator_from_pretext(generator, result["checkpoint"], other.data.window)
  pretrain.init_generator_from_pretext(generator, result["checkpoint"], config.data.window)  # the same: accepted
  _, description = pretrain.read_description(result["checkpoint"])
  assert description["window"] == {"level": 30.0, "width": 400.0}


def test_config_variants():
  assert pretrain_configs.get_config().mode == "pretrain"
  assert pretrain_configs.get_config("clip").pretrain.clip
  with pytest.raises(ValueError, match="unknown variant"):
    pretrain_configs.get_config("nope")


def test_pretrain_refuses_to_overwrite_a_checkpoint(trained):
  config, result = trained
  source = pretext_sources.ArraySource(synthetic_stacks(8, config.data.image_size, 2))
  with pytest.raises(FileExistsError, match="already exists"):
    pretrain.pretrain(config, os.path.dirname(result["checkpoint"]), source, source)


def test_dicom_folder_source_reads_only_non_contrast_series(tmp_path):
  """pretrain.source='dicom': non-contrast series of a DICOM folder, HU as pydicom reads them, split by study."""
  import pydicom
  from data_prep import phantom

  phantom.generate(tmp_path / "dicom", cases=3, seed=3, size=128, slices=5, pixel_spacing=3.0)
  config = pretrain_configs.get_config("smoke")
  config.data.image_size = 128  # no resize, so HU compare exactly
  config.pretrain.source = "dicom"
  config.pretrain.dicom_dir = str(tmp_path / "dicom")
  config.pretrain.validation_cases = 1
  train_source, val_source = pretext_sources.make_sources(config)
  assert (len(train_source), len(val_source)) == (10, 5)  # 2 + 1 studies x 5 non-contrast slices
  # The validation study's middle slice equals pydicom's HU of the most cranial-but-two non-contrast file.
  files = sorted((tmp_path / "dicom" / "case_0002" / "non_contrast").iterdir())
  slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: -float(d.ImagePositionPatient[2]))
  want = slices[2].pixel_array.astype(np.float32) * float(slices[2].RescaleSlope) + float(slices[2].RescaleIntercept)
  np.testing.assert_array_equal(val_source[2]["pre"][1], want.astype(np.int16))
  np.testing.assert_array_equal(val_source[2]["pre"][0], val_source[1]["pre"][1])
  config.pretrain.dicom_dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="dicom_dir"):
    pretext_sources.make_sources(config)
