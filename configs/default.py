"""Every configuration field of vcect-jax, with its meaning and the paper's default.

Phase configs (`arterial.py`, `portal.py`, `delayed.py`) and `pretrain.py` start from `get_config()` here and
change only what differs. Variants are chosen with `--config=configs/arterial.py:smoke` (see each file).
Command-line overrides work on any field: `--config.train.steps=100`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # What `vcect_jax.main` runs: 'train' (the training `method` below), 'pretrain' (pretext intensity classifier),
  # 'prepare' (only the data step: the embedded phantom when `data.dir` is empty), 'eval' (evaluate a checkpoint,
  # section `eval`).
  config.mode = "train"
  # The training method (vcect_jax/methods): 'dual_path_gan' (the paper's model), or the baselines 'pix2pix',
  # 'cyclegan', 'cut' (configs/baselines/). Pretext pretraining is the method 'pretext', chosen by mode='pretrain'.
  config.method = "dual_path_gan"
  # Contrast phase to synthesise: 'arterial', 'portal' or 'delayed'.
  config.phase = "arterial"
  config.seed = 0

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  # Root of a converted dataset (the `--output` of `python -m data_prep.convert`, holding manifest.json).
  # Empty: generate and convert the embedded synthetic phantom under `workdir/data` (once; later runs reuse it).
  data.dir = ""
  # Image side in pixels; the converter resizes to it (paper: 256).
  data.image_size = 256
  # CT window applied at training time (paper section 4.2: W400/L30, i.e. HU -170..230).
  data.window = ml_collections.ConfigDict({"level": 30.0, "width": 400.0})
  # Cross-validation (paper section 4.3.2: 5-fold for hyper-parameter selection): fold k of `num_folds` is the test
  # split, the rest train/validation. -1: the split fractions instead. With `data.dir` empty the phantom is
  # converted per fold (`<workdir>/data/converted_fold<k>`); a given `data.dir` must have been converted with
  # `python -m data_prep.convert --fold=k --num_folds=N`.
  data.fold = -1
  data.num_folds = 5
  # The embedded phantom's conversion (with `data.dir` empty): `--deformable` of `python -m data_prep.convert`
  # ('none': the paper's alignment; 'demons' or 'bspline': a 3-D deformable registration that undoes breathing).
  data.deformable = "none"
  # The embedded phantom's `--through_plane` ('nearest': the paper's nearest slice; 'resample': linear along z;
  # 'local': each region takes the contrast slice within 10 mm that matches it best, undoing each organ's breathing
  # shift).
  data.through_plane = "nearest"
  # Phantom used when `data.dir` is empty.
  data.phantom = ml_collections.ConfigDict({
      "cases": 10,            # number of synthetic cases (about one in five is excluded for large motion)
      "slices": 24,           # slices per series
      "size": 512,            # phantom matrix before the converter's resize
      "slice_thickness": 5.0,  # mm
      "pixel_spacing": 0.75,  # mm
      "seed": 0,
      "split_fractions": (0.6, 0.2, 0.2),  # train / validation / test, by case
      # The patient's motion between the scans, scaled: 1 breathing, table and in-plane motion as in real studies;
      # 0 contrast series on the non-contrast anatomy (perfectly aligned pairs: what the method learns without
      # misalignment; benchmarks/RESULTS.md, issue 12, round 7).
      "motion_scale": 1.0,
  })

  # ---- model / perceptual / pretrain (issue 4)
  config.model = model = ml_collections.ConfigDict()
  # Computation dtype of the generator and the discriminator: 'float32', or 'bfloat16' (mixed precision, for GPU and
  # TPU: bf16 convolutions, float32 parameters, optimiser states, BatchNorm statistics and losses; slower on CPU).
  # The generator and discriminator sections below follow it (`--config.model.compute_dtype=bfloat16`).
  model.compute_dtype = "float32"
  # Generator (paper section 3.1): dense multi-resolution encoder (blocks at /1, /2, /4, /8, /16) + U-Net decoder.
  model.generator = ml_collections.ConfigDict({
      "in_channels": 3,                       # previous, current, next non-contrast slices
      "widths": (32, 64, 128, 256, 512),      # encoder block widths; H, W must be multiples of 2**(len-1)
      "residual": False,                      # True: predict the enhancement added to the middle input slice
      "output_activation": "none",            # 'none' (linear, model space) or 'tanh' (bounded to [-1, 1])
      "bn_momentum": 0.9,                     # BatchNorm running-statistics momentum
      "compute_dtype": model.get_ref("compute_dtype"),  # follows model.compute_dtype
  })
  # Conditional patch discriminator: sees concat(non-contrast input, real or virtual contrast slice).
  model.discriminator = ml_collections.ConfigDict({
      "input_channels": 3,                    # must equal model.generator.in_channels
      "target_channels": 1,
      "widths": (64, 128, 256, 512),          # four conv + BatchNorm + LeakyReLU blocks
      "strides": (1, 2, 2, 2),                # feature sizes 256, 128, 64, 32 for a 256 input (paper)
      "kernel_size": 4,
      "negative_slope": 0.2,                  # LeakyReLU slope
      "bn_momentum": 0.9,
      "compute_dtype": model.get_ref("compute_dtype"),  # follows model.compute_dtype
  })
  # Pretext intensity-level classifier: the generator's encoder + three fully connected layers.
  model.classifier = ml_collections.ConfigDict({
      "hidden": (256, 64),                    # sizes of the two hidden FC layers (the third outputs the classes)
      "num_classes": 4,                       # must equal len(pretrain.alphas)
  })

  # Perceptual loss from the frozen pretext encoder (paper section 3.2).
  config.perceptual = perceptual = ml_collections.ConfigDict()
  # Orbax checkpoint directory written by `mode='pretrain'` (`<its workdir>/pretext`, e.g.
  # "workdir/pretrain/pretext"). Empty: training pretrains one first, under `<its workdir>/pretrain/pretext`,
  # on the training split of its own data.
  perceptual.pretext_checkpoint = ""
  # Weights of the MSE at the last four encoder blocks (/2, /4, /8, /16); the paper sums them with weight 1.
  perceptual.weights = (1.0, 1.0, 1.0, 1.0)
  # Initialise the generator's encoder from the pretext encoder (paper section 4.3.2).
  perceptual.init_generator = True

  # Pretext pretraining (`mode='pretrain'`, configs/pretrain.py; paper section 4.3.1).
  config.pretrain = pretrain = ml_collections.ConfigDict()
  # Intensity coefficients applied to the windowed [0, 1] intensities; one class each.
  pretrain.alphas = (0.5, 1.0, 1.5, 2.0)
  # False (paper): scaled intensities may exceed 1. True clips them at 1, like the authors' code (uint8 at 255).
  pretrain.clip = False
  pretrain.learning_rate = 1e-4
  pretrain.epochs = 10
  pretrain.decay_epochs = 8                   # learning rate times decay_factor after this many epochs
  pretrain.decay_factor = 0.1
  pretrain.batch_size = 2                     # slices per step; each enters with all alphas (4x the examples)
  # > 0: train this many steps instead of `epochs`; as with `train.steps`, the decay comes at step
  # steps * decay_epochs / epochs, so it moves with `steps` (logged at the start).
  pretrain.steps = 0
  # Non-contrast slices: 'records' (`pre` of converted records under records_dir, splits train/validation),
  # 'phantom' (in-memory synthetic cases from data.phantom), 'dicom' (the non-contrast series of a DICOM folder,
  # dicom_dir), 'npy' (int16 HU (N, 3, H, W) files npy_train and npy_validation), or 'auto' ('records' when
  # data.dir is set, else 'phantom').
  pretrain.source = "auto"
  pretrain.records_dir = ""                   # empty: data.dir/<phase>
  pretrain.dicom_dir = ""                     # source 'dicom': a folder of non-contrast CT series (e.g. NLST)
  pretrain.npy_train = ""
  pretrain.npy_validation = ""
  pretrain.validation_cases = 2               # phantom source: the last cases form the validation split
  pretrain.eval_batch_size = 8                # slices per evaluation batch
  pretrain.max_eval_slices = 0                # > 0: evaluate on at most this many validation slices
  pretrain.log_every = 50                     # steps between training-loss summaries (and the finite-loss check)
  pretrain.checkpoint_every = 1000            # steps between checkpoints of the run (exact resume)

  # ---------------------------------------------------------------- GAN training (issue 5)
  # Loss terms (paper eq. 1, 3). Ablations of Table 2: use_discriminator=False, use_perceptual=False and
  # dual_path.enabled=False.
  config.loss = loss = ml_collections.ConfigDict()
  loss.use_discriminator = True
  loss.use_perceptual = True
  loss.adversarial_weight = 1.0
  loss.pixel_weight = 1.0                     # lambda1 of eq. 3 (the authors' code uses 0.1)
  loss.perceptual_weight = 1.0                # weight of the summed perceptual terms (the paper: 1)
  loss.pixel = "mse"                          # pixel term: 'mse' (the paper), 'l1' (pix2pix; the median), 'l1+mse'
  loss.pixel_mse_weight = 1.0                 # 'l1+mse' only: the pixel term is L1 + this * MSE (lambda1 scales both)
  # > 0: the adversarial weight ramps linearly from 0 to adversarial_weight over this many generator steps
  # (the pixel and perceptual terms shape the output first). 0: the paper, full weight from the first step.
  loss.adversarial_warmup_steps = 0
  # > 0: each pixel's pixel term is weighted 1 + this * (real - non-contrast - threshold) / 100 HU where the real
  # slice enhances beyond the threshold (the few pixels of excreted contrast or an aorta weigh more than the many
  # that never enhance). 0: the paper's unweighted term.
  loss.pixel_enhancement_weight = 0.0
  loss.pixel_enhancement_threshold_hu = 50.0  # enhancement (HU) below which a pixel keeps weight 1
  # The weighting applies only where the non-contrast pixel lies within this HU range (low, high): tissue that can
  # enhance. Fat, air and bone do not, so a large enhancement there is the pairs' misalignment (a rib or the body's
  # outline moved), which the weighting would otherwise teach with extra weight. (): every pixel.
  loss.pixel_enhancement_pre_hu = ()
  # > 0: the pixel term adds this times the mean L1 difference between the virtual and real images' horizontal and
  # vertical finite differences (after the gradient difference loss of Mathieu et al. 2016 / Nie et al. 2018): the model
  # learns to remove the input's noise, which the residual output passes on and the real slice does not share.
  # 0: the paper's term.
  loss.pixel_gradient_weight = 0.0

  # Registration of each virtual image onto its real target during training (not in the paper; RegGAN, Kong et al.
  # 2021): a small network warps the virtual image before the pixel term, so that the pairs' misalignment is taken
  # up by a smooth in-plane deformation instead of blurring the generator's enhancement (vcect_jax/models/
  # registration.py). Inference never warps. The pixel term becomes pixel(warp(virtual), real) + smooth_weight *
  # mean squared gradient of the deformation (pixels per pixel), and the perceptual term compares warp(virtual)
  # too; the adversarial term judges the unwarped image. The network trains with the generator's optimiser
  # settings. Dual-path GAN only.
  config.registration = registration = ml_collections.ConfigDict()
  registration.enabled = False
  registration.smooth_weight = 0.5           # RegGAN's smoothness / correction weights, 10 / 20
  registration.widths = (16, 32, 32)         # channels at full, half and quarter resolution
  # > 0: the pixel term also compares the unwarped virtual image (the one inference shows) with the real slice, with
  # this weight: an anchor against edges and noise that the warp would otherwise take up. 0: RegGAN's term alone.
  registration.unwarped_weight = 0.0
  # True: the gradient difference term (`loss.pixel_gradient_weight`) compares the unwarped virtual image, the rest of
  # the pixel term the warped one. Through the warp's interpolation the term's gradient loses the pixel-scale detail
  # that asks the generator to remove the input's noise (issue 12, round 21: 0.86-0.91 of it kept in the arterial
  # liver with the warp, 0.32 with this). False: the whole pixel term on the warped image (RegGAN).
  registration.gradient_term_unwarped = False

  # Dual-path schema (paper section 3.3, eq. 4).
  config.dual_path = dual = ml_collections.ConfigDict()
  dual.enabled = True
  dual.global_weight = 0.6                    # lambda2
  dual.local_weight = 0.4                     # lambda3
  dual.shared_generator = True                # False: the local path has a generator of its own

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 2                        # global batch, split over all devices
  train.epochs = 50
  train.decay_epochs = 40                     # both learning rates times decay_factor after this many epochs
  train.decay_factor = 0.1
  # > 0: train this many steps instead of `epochs`. The learning-rate decay then comes at the same fraction of the
  # run, step steps * decay_epochs / epochs (the baselines: their linear decay spread over the steps), so it moves
  # with `steps`: a run extended from 4000 to 8000 steps (same workdir) does not continue the schedule it started,
  # it decays later. The decay step is logged at the start of every run.
  train.steps = 0
  train.generator_lr = 5e-5
  train.discriminator_lr = 2e-4
  train.b1 = 0.9                              # Adam betas (PyTorch defaults; the authors' code uses 0.5)
  train.b2 = 0.999
  train.weight_decay = 5e-4
  # 'l2': added to the gradient before Adam, as torch.optim.Adam(weight_decay=...) which the paper used;
  # 'decoupled': AdamW.
  train.weight_decay_mode = "l2"
  # > 0: the evaluated, exported and inferred generator is an exponential moving average of the trained one's
  # weights (decay per step, ramped as min(decay, (1 + step) / (10 + step)); BatchNorm statistics copied). 0: off
  # (the paper: the trained generator itself; checkpoints then hold no average).
  train.ema_decay = 0.0
  train.log_every = 50                        # steps between scalar summaries (and the finite-loss check)
  train.image_every = 500                     # steps between image grids and perceptual heatmaps
  train.eval_every = 1000                     # steps between validation metrics
  train.eval_examples = 64                    # validation slices per evaluation (0: the whole split)
  train.eval_batch_size = 8
  train.checkpoint_every = 1000
  train.keep_checkpoints = 3
  train.async_checkpoints = True

  # Evaluation (`mode='eval'`): `python -m vcect_jax.main --config=configs/arterial.py --config.mode=eval
  # --config.eval.checkpoint=PATH`. The checkpoint carries its config; only the data comes from this config.
  config.eval = ev = ml_collections.ConfigDict()
  ev.checkpoint = ""                          # a training workdir, its checkpoints/ folder, or one step folder
  ev.split = "test"                           # 'train', 'validation' or 'test'
  ev.batch_size = 8                           # slices per generator call
  ev.max_cases = 0                            # > 0: evaluate at most this many cases (quick looks)
  ev.report_dir = ""                          # empty: <workdir>/report

  # grain input pipeline.
  config.input = inp = ml_collections.ConfigDict()
  inp.worker_count = 0                        # > 0: decode records in this many worker processes
  inp.augment = ml_collections.ConfigDict({"enabled": False, "flip_lr": True, "max_shift_px": 4})

  # Multi-host (TPU pods, multi-node GPU): jax.distributed.initialize() before anything else.
  config.distributed = ml_collections.ConfigDict({
      "enabled": False,
      "coordinator_address": "",              # empty: auto-detect (TPU, SLURM)
      "num_processes": 1,
      "process_id": 0,
  })

  return config
