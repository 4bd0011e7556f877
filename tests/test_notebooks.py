"""The Colab notebooks (colab/*.ipynb) run headless on the CPU with their smoke settings, and are stored clean.

Each notebook is executed by nbclient in a fresh kernel, with `VCECT_NOTEBOOK_SMOKE=1` (the notebooks' parameters
cell then picks the `:smoke` configs) and its work directories in a temporary folder. Colab-only and TPU-only
cells are guarded by `notebook.in_colab()` / `notebook.tpu_runtime()` and do nothing here.
"""

import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def test_the_three_notebooks_exist():
  assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_train_tpu.ipynb", "03_inference.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
  notebook = json.loads(path.read_text())
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: strip the outputs"
  tagged = [c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_hold_no_definitions(path):
  """Notebooks drive the library: functions and classes belong in vcect_jax/notebook.py."""
  notebook = json.loads(path.read_text())
  for cell in notebook["cells"]:
    source = "".join(cell["source"])
    if cell["cell_type"] == "code":
      assert "def " not in source and "class " not in source, f"{path.name}: move this into the library:\n{source}"


# ------------------------------------------------------------------------------------------------ the helpers
def test_smoke_mode_reads_the_environment(monkeypatch):
  from vcect_jax import notebook

  for value, expected in (("1", True), ("yes", True), ("0", False), ("", False), ("false", False)):
    monkeypatch.setenv(notebook.SMOKE_ENV, value)
    assert notebook.smoke_mode() is expected


def test_load_config_applies_overrides_and_refuses_unknown_fields():
  from vcect_jax import notebook

  config = notebook.load_config("configs/portal.py:smoke", {"train.steps": 3, "data.dir": "gs://bucket/x"})
  assert (config.phase, config.train.steps, config.data.dir, config.data.image_size) == ("portal", 3, "gs://bucket/x",
                                                                                         32)
  with pytest.raises(ValueError, match="train.stepz"):
    notebook.load_config("configs/portal.py:smoke", {"train.stepz": 3})
  with pytest.raises(FileNotFoundError):
    notebook.load_config("configs/nothing.py")


def test_uploads_and_downloads(tmp_path):
  import io
  import zipfile

  from vcect_jax import notebook

  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("series/IM1.dcm", b"one")
    archive.writestr("series/IM2.dcm", b"two")
  folder = notebook.save_uploads({"series.zip": buffer.getvalue()}, str(tmp_path / "up"))
  assert pathlib.Path(folder) == tmp_path / "up" / "series"  # the one series folder the archive held
  assert (pathlib.Path(folder) / "IM2.dcm").read_bytes() == b"two"
  loose = notebook.save_uploads({"a.dcm": b"a", "../b.dcm": b"b"}, str(tmp_path / "loose"))
  assert sorted(p.name for p in pathlib.Path(loose).iterdir()) == ["a.dcm", "b.dcm"]  # names only, no paths
  evil = io.BytesIO()
  with zipfile.ZipFile(evil, "w") as archive:
    archive.writestr("../outside.dcm", b"x")
  with pytest.raises(ValueError, match="outside"):
    notebook.save_uploads({"evil.zip": evil.getvalue()}, str(tmp_path / "evil"))
  assert not (tmp_path / "outside.dcm").exists()
  packed = notebook.zip_folder(folder)
  assert sorted(zipfile.ZipFile(packed).namelist()) == ["series/IM1.dcm", "series/IM2.dcm"]


def test_draw_series_shows_axial_and_coronal_views():
  import matplotlib

  matplotlib.use("Agg")
  import numpy as np

  from vcect_jax import notebook

  volume = np.zeros((6, 16, 16), np.int16)
  figure = notebook.draw_series({"non-contrast": volume, "virtual arterial": volume + 100}, level=40, width=400,
                                axial_index=2, spacing_mm=(5.0, 1.0))
  axes = figure.axes
  assert len(axes) == 4 and axes[0].get_images()[0].get_array().shape == (16, 16)
  assert axes[2].get_images()[0].get_array().shape == (6, 16)  # coronal: slices x columns
  assert axes[0].get_images()[0].get_clim() == (-160, 240)
  with pytest.raises(ValueError, match="one shape"):
    notebook.draw_series({"a": volume, "b": volume[:, :8]})


# What each notebook must have produced under its working folder (beyond running without an error).
PRODUCTS = {
    "01_quickstart": ["workdir/notebook_smoke/data/dicom/preview.png",
                      "workdir/notebook_smoke/report/figure7_arterial_axial.png",
                      "workdir/notebook_smoke/report/enhancement_arterial.png",
                      "workdir/notebook_smoke/report/table_arterial.md"],
    "02_train_tpu": ["workdir/tpu_smoke/checkpoints/6"],
    "03_inference": ["workdir/notebook_inference/virtual/arterial", "workdir/notebook_inference/virtual/portal",
                     "workdir/notebook_inference/virtual/delayed", "workdir/notebook_inference/virtual.zip"],
}
# Inline figures each notebook shows (matplotlib figures and PNG files).
MIN_IMAGES = {"01_quickstart": 6, "02_train_tpu": 1, "03_inference": 1}


def _execute(path: pathlib.Path, cwd: pathlib.Path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}}).execute()
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  # What interactive widgets (the series viewer's sliders) drew goes into their Output widgets' state.
  widgets = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
  for model in widgets.get("state", {}).values():
    outputs.extend(model.get("state", {}).get("outputs", []))
  return outputs


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the notebooks' kernels: their smoke networks are the same in every phase."""
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless(path, tmp_path, monkeypatch, compilation_cache):
  pytest.importorskip("ipykernel")
  # The kernel inherits this environment: smoke settings, the CPU, the repository on the import path.
  monkeypatch.setenv("VCECT_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", compilation_cache)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  outputs = _execute(path, tmp_path)  # raises CellExecutionError, with the cell and its traceback, on a failure
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= MIN_IMAGES[path.stem], f"{path.name}: {len(images)} inline images"
  missing = [p for p in PRODUCTS[path.stem] if not (tmp_path / p).exists()]
  assert not missing, f"{path.name} did not write {missing}"
  if path.stem == "02_train_tpu":  # the second run resumed: it found the final checkpoint of the first
    text = "".join(o.get("text", "") for o in outputs)
    assert "newest checkpoint before this run: None" in text and "newest checkpoint: 6" in text, text[-2000:]
  if path.stem == "03_inference":
    import zipfile  # pylint: disable=import-outside-toplevel

    names = zipfile.ZipFile(tmp_path / PRODUCTS[path.stem][-1]).namelist()
    assert {n.split("/")[1] for n in names if n.endswith(".dcm")} == {"arterial", "portal", "delayed"}
