"""What the Colab notebooks in `colab/` need beyond the library's jobs: configs by name, runs, inline TensorBoard
data, a series viewer, uploads and downloads. The notebooks call these and hold no logic of their own.

    from vcect_jax import notebook
    config = notebook.load_config("configs/arterial.py:demo", {"train.steps": 100})
    notebook.run(config, "workdir/demo_arterial")            # the same dispatch as `python -m vcect_jax.main`
    notebook.plot_scalars("workdir/demo_arterial", ["train_g_loss", "eval_mae_hu"])
    notebook.show_image_grid("workdir/demo_arterial")        # the last non-contrast | virtual | real | diff grid
    notebook.series_viewer({"non-contrast": pre_hu, "virtual arterial": virtual_hu}, spacing_mm=(5.0, 0.75))

Headless runs (CI): `VCECT_NOTEBOOK_SMOKE=1` makes `smoke_mode()` true; the notebooks then choose their smoke
configs and small sizes in their parameters cell.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pathlib
import sys
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np

SMOKE_ENV = "VCECT_NOTEBOOK_SMOKE"
# What the notebooks' smoke runs of several phases leave out, to stay within a minute or two on a CPU: the
# pretext encoder (its pretraining and the perceptual loss) and all but two training steps.
SMOKE_TRAIN_OVERRIDES = {"loss.use_perceptual": False, "perceptual.init_generator": False, "train.steps": 2}
IMAGE_GRID_TAG = "pre_virtual_real_absdiff"   # the training loop's comparison grid (vcect_jax.summaries)
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ environment
def smoke_mode() -> bool:
  """True when the notebooks should run their smallest settings (`VCECT_NOTEBOOK_SMOKE=1`, set by the tests)."""
  return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def in_colab() -> bool:
  return "google.colab" in sys.modules


def tpu_runtime() -> bool:
  """True on a machine with TPU chips attached (a Colab TPU runtime, a Cloud TPU VM), checked without JAX."""
  return (os.path.exists("/dev/accel0") or bool(list(pathlib.Path("/dev").glob("vfio/[0-9]*")))
          or "COLAB_TPU_ADDR" in os.environ or "TPU_NAME" in os.environ)


def describe_devices() -> str:
  """One line per process and the mesh the training loop builds over every device (axis 'data')."""
  import jax  # pylint: disable=g-import-not-at-top

  from vcect_jax import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh()
  kinds = sorted({d.device_kind for d in jax.devices()})
  return (f"backend {jax.default_backend()}: {jax.device_count()} device(s) ({', '.join(kinds)}), "
          f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}; a global batch must be a multiple of "
          f"{jax.device_count()}")


# ------------------------------------------------------------------------------------------------ configs and runs
def load_config(spec: str, overrides: Mapping[str, object] | None = None):
  """The config that `--config=SPEC --config.KEY=VALUE ...` would give `python -m vcect_jax.main`.

  Args:
    spec: a config file and optional variant, e.g. 'configs/arterial.py:demo' (relative to the repository).
    overrides: dotted field -> value, e.g. {'train.steps': 100, 'data.dir': 'gs://bucket/converted'}.
  """
  path, _, variant = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_absolute() and not file.exists():
    file = REPO_ROOT / file
  if not file.exists():
    raise FileNotFoundError(f"config file {path} not found (give a path such as configs/arterial.py:demo)")
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # configs/*.py import `configs.default`
  module_spec = importlib.util.spec_from_file_location(f"_vcect_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for key, value in (overrides or {}).items():
    parent = config
    *parents, leaf = key.split(".")
    for name in parents:
      parent = parent[name]
    if leaf not in parent:
      raise ValueError(f"unknown config field {key!r}")
    parent[leaf] = value
  return config


def run(config, workdir: str):
  """Runs `config.mode` (train, pretrain, prepare, eval) in `workdir`, as `python -m vcect_jax.main` does.

  Progress and results are logged to the notebook; a rerun of the same training continues from the newest
  checkpoint in `workdir` (which is how a run survives a runtime restart when `workdir` is on Drive or GCS).
  """
  from vcect_jax import runtime  # pylint: disable=g-import-not-at-top

  _log_info()
  runtime.initialize(config)
  return runtime.dispatch(config, workdir)


def _log_info() -> None:
  """The jobs' INFO lines (progress, ETA, what was written where) in the notebook's output."""
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()


def fit_batch_to_devices(config) -> int:
  """Raises `train.batch_size` to the next multiple of the device count (the paper's 2 on an 8-core TPU: 8);
  returns the batch size now configured."""
  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.device_count()
  batch = int(config.train.batch_size)
  fitted = -(-batch // devices) * devices
  if fitted != batch:
    config.train.batch_size = fitted
  return fitted


def latest_checkpoint_step(workdir: str) -> int | None:
  """The newest step under `<workdir>/checkpoints` (None before the first checkpoint)."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  folder = epath.Path(workdir) / "checkpoints"
  if not folder.exists():
    return None
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
  return max(steps) if steps else None


def train_phases(checkpoints: Mapping[str, str], variant: str, workdir: str,
                 overrides: Mapping[str, object] | None = None) -> dict[str, str]:
  """A checkpoint per contrast phase: the given ones, and `configs/<phase>.py:<variant>` (with `overrides`)
  trained on the embedded phantom for the phases given as "" (one phantom dataset under `workdir`, shared by the
  phases, and one pretext encoder per CT window: `pretrain.pretext_per_window`; a phase already trained under
  `<workdir>/<phase>` is reused).

  Returns phase -> checkpoint path (a training work directory).
  """
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top
  from vcect_jax import runtime  # pylint: disable=g-import-not-at-top

  out, data_dir, pretexts = {}, None, {}
  for phase, path in checkpoints.items():
    if path:
      out[phase] = path
      continue
    config = load_config(f"configs/{phase}.py:{variant}" if variant else f"configs/{phase}.py", overrides)
    if data_dir is None:
      _log_info()
      data_dir = prepare.ensure_dataset(config.copy_and_resolve_references(), workdir)
    config.data.dir = data_dir
    if runtime.pretrains_first(config):
      config.perceptual.pretext_checkpoint = pretrain.pretext_per_window(config, workdir, pretexts)
    out[phase] = os.path.join(workdir, phase)
    run(config, out[phase])
  return out


# ------------------------------------------------------------------------------------------------ TensorBoard data
def _accumulator(logdir: str):
  from tensorboard.backend.event_processing import event_accumulator as ea  # pylint: disable=g-import-not-at-top

  acc = ea.EventAccumulator(str(logdir), size_guidance={ea.TENSORS: 0, ea.SCALARS: 0, ea.IMAGES: 0})
  acc.Reload()
  return acc


def scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every scalar summary of one run directory: tag -> (steps, values), in step order."""
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  acc = _accumulator(logdir)
  out = {}
  for tag in acc.Tags().get("tensors", []):
    events = acc.Tensors(tag)
    values = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
    if not values or np.asarray(values[0]).ndim != 0:
      continue  # images are string tensors of rank 1
    steps = np.array([e.step for e in events])
    order = np.argsort(steps, kind="stable")
    out[tag] = (steps[order], np.asarray(values, np.float64)[order])
  for tag in acc.Tags().get("scalars", []):
    events = acc.Scalars(tag)
    out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], np.float64))
  return out


def image_grids(logdir: str, tag: str = IMAGE_GRID_TAG) -> list[tuple[int, list[np.ndarray]]]:
  """The images of one summary tag: [(step, [H x W (x C) uint8 images])], in step order."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  acc = _accumulator(logdir)
  if tag not in acc.Tags().get("tensors", []):
    raise ValueError(f"no image summary {tag!r} in {logdir}; tags there: {sorted(acc.Tags().get('tensors', []))}")
  out = []
  for event in sorted(acc.Tensors(tag), key=lambda e: e.step):
    encoded = tensor_util.make_ndarray(event.tensor_proto)[2:]  # width, height, then one PNG per image
    out.append((event.step, [np.asarray(Image.open(io.BytesIO(png))) for png in encoded]))
  return out


def plot_scalars(logdir: str, tags: Sequence[str] | None = None, columns: int = 3):
  """A matplotlib figure with one panel per scalar tag (all `train_*`/`eval_*` tags when none are named)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  data = scalars(logdir)
  if tags is None:
    tags = sorted(t for t in data if t.startswith(("train_", "eval_")))
  missing = [t for t in tags if t not in data]
  if missing:
    raise ValueError(f"no scalar summaries {missing} in {logdir}; there are: {sorted(data)}")
  rows = max(1, -(-len(tags) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
  for ax, tag in zip(axes.flat, tags):
    steps, values = data[tag]
    ax.plot(steps, values, marker="o" if len(steps) < 20 else None)
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel("step")
  for ax in list(axes.flat)[len(tags):]:
    ax.axis("off")
  fig.tight_layout()
  return fig


def show_image_grid(logdir: str, tag: str = IMAGE_GRID_TAG, step: int | None = None):
  """The image grid written at `step` (default: the last one) as a matplotlib figure, one row per example.

  The training loop's grid has the panels non-contrast | virtual | real | |virtual - real| side by side.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  grids = image_grids(logdir, tag)
  if not grids:
    raise ValueError(f"no {tag} images written yet in {logdir}")
  chosen = grids[-1] if step is None else dict(grids).get(step)
  if chosen is None:
    raise ValueError(f"no {tag} image at step {step}; steps: {[s for s, _ in grids]}")
  step, images = chosen if step is None else (step, chosen)
  fig, axes = plt.subplots(len(images), 1, figsize=(10, 2.8 * len(images)), squeeze=False)
  for i, (ax, image) in enumerate(zip(axes[:, 0], images)):
    ax.imshow(image, cmap="gray")
    ax.set_title(f"{tag}, step {step}, example {i}", fontsize=9)  # the panels carry their own labels
    ax.axis("off")
  fig.tight_layout()
  return fig


def show_files(paths: Sequence[str]) -> None:
  """Displays PNG files inline (report figures, previews)."""
  from IPython.display import Image  # pylint: disable=g-import-not-at-top
  from IPython.display import display  # pylint: disable=g-import-not-at-top

  for path in paths:
    print(path)
    display(Image(filename=str(path)))


# ------------------------------------------------------------------------------------------------ series viewer
def read_series(path: str) -> tuple[np.ndarray, tuple[float, float]]:
  """A DICOM series folder or NIfTI file -> ((S, H, W) HU, (slice spacing mm, pixel spacing mm)).

  The reader is inference's (`vcect_jax.infer.read_input`): slices sorted by position, HU, geometry checks.
  """
  from vcect_jax import infer  # pylint: disable=g-import-not-at-top

  series = infer.read_input(path)
  return np.asarray(series.hu), (float(series.slice_spacing_mm), float(series.pixel_spacing_mm[0]))


def draw_series(volumes: Mapping[str, np.ndarray], level: float = 30.0, width: float = 400.0,
                axial_index: int | None = None, coronal_row: int | None = None,
                spacing_mm: tuple[float, float] = (1.0, 1.0)):
  """Side-by-side views of volumes on one grid: one column per volume, an axial row and a coronal row.

  Args:
    volumes: name -> (S, H, W) HU, all of the same shape (e.g. non-contrast and the virtual phases).
    level, width: the display window in HU.
    axial_index: the axial slice (default: the middle one); coronal_row: the image row of the coronal
      reformat (default: the middle row).
    spacing_mm: (slice spacing, pixel spacing), for the coronal aspect ratio.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  shapes = {name: np.shape(v) for name, v in volumes.items()}
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 3:
    raise ValueError(f"volumes must be (S, H, W) arrays of one shape, got {shapes}")
  s, h, _ = next(iter(shapes.values()))
  axial_index = s // 2 if axial_index is None else int(np.clip(axial_index, 0, s - 1))
  coronal_row = h // 2 if coronal_row is None else int(np.clip(coronal_row, 0, h - 1))
  low, high = level - width / 2, level + width / 2
  aspect = spacing_mm[0] / spacing_mm[1]
  coronal_height = max(s * aspect / h, 0.15)  # the coronal view's height relative to the axial one
  fig, axes = plt.subplots(2, len(volumes), figsize=(3.2 * len(volumes), 3.4 * (1 + coronal_height) + 0.6),
                           squeeze=False, gridspec_kw={"height_ratios": [1.0, coronal_height]})
  for column, (name, volume) in enumerate(volumes.items()):
    volume = np.asarray(volume)
    axes[0, column].imshow(volume[axial_index], cmap="gray", vmin=low, vmax=high)
    axes[0, column].axhline(coronal_row, color="tab:orange", linewidth=0.6)
    axes[0, column].set_title(f"{name}\naxial {axial_index + 1}/{s}", fontsize=9)
    axes[1, column].imshow(volume[:, coronal_row], cmap="gray", vmin=low, vmax=high, aspect=aspect)
    axes[1, column].axhline(axial_index, color="tab:orange", linewidth=0.6)
    axes[1, column].set_title(f"coronal, row {coronal_row}", fontsize=9)
  for ax in axes.flat:
    ax.axis("off")
  from vcect_jax import hu  # pylint: disable=g-import-not-at-top
  fig.suptitle(f"window {hu.Window(level, width).label}", fontsize=10)
  fig.tight_layout()
  return fig


def series_viewer(volumes: Mapping[str, np.ndarray], spacing_mm: tuple[float, float] = (1.0, 1.0),
                  level: float = 30.0, width: float = 400.0):
  """Interactive `draw_series` with sliders for window level and width, axial slice and coronal row.

  Without ipywidgets (headless runs) it draws the default view once and returns the figure.
  """
  try:
    import ipywidgets as widgets  # pylint: disable=g-import-not-at-top
  except ImportError:
    return draw_series(volumes, level, width, spacing_mm=spacing_mm)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  s, h, _ = np.shape(next(iter(volumes.values())))

  def show(level, width, axial, coronal):
    draw_series(volumes, level, width, axial, coronal, spacing_mm)
    plt.show()

  return widgets.interact(
      show,
      level=widgets.IntSlider(value=int(level), min=-1000, max=1000, step=10, description="level (HU)"),
      width=widgets.IntSlider(value=int(width), min=50, max=2500, step=25, description="width (HU)"),
      axial=widgets.IntSlider(value=s // 2, min=0, max=s - 1, description="axial slice"),
      coronal=widgets.IntSlider(value=h // 2, min=0, max=h - 1, description="coronal row"))


# ------------------------------------------------------------------------------------------------ files
def save_uploads(uploaded: Mapping[str, bytes], folder: str) -> str:
  """Writes uploaded files (`google.colab.files.upload()`) into `folder`, unpacking .zip archives there.

  Returns the folder to give `vcect_jax.infer` as input: the only sub-folder when an archive held one series
  folder, else `folder`.
  """
  root = pathlib.Path(folder)
  root.mkdir(parents=True, exist_ok=True)
  for name, data in uploaded.items():
    safe = pathlib.Path(name).name
    if safe.lower().endswith(".zip"):
      with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for member in archive.infolist():
          target = (root / member.filename).resolve()
          if root.resolve() not in target.parents and target != root.resolve():
            raise ValueError(f"{safe}: archive member {member.filename!r} points outside the folder")
        archive.extractall(root)
    else:
      (root / safe).write_bytes(data)
  entries = [p for p in root.iterdir() if not p.name.startswith(".")]
  if len(entries) == 1 and entries[0].is_dir():
    return str(entries[0])
  return str(root)


def zip_folder(folder: str, archive: str | None = None) -> str:
  """`folder` packed into a .zip archive (default: `<folder>.zip`), for download; returns its path."""
  folder_path = pathlib.Path(folder)
  if not folder_path.is_dir():
    raise FileNotFoundError(f"{folder} is not a folder")
  archive = archive or str(folder_path) + ".zip"
  with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
    for path in sorted(folder_path.rglob("*")):
      if path.is_file():
        out.write(path, path.relative_to(folder_path.parent))
  return archive
