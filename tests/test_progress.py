"""Progress lines with an ETA (data_prep.progress) and the training loop's heartbeat (vcect_jax.summaries)."""

from data_prep import progress as progress_lib


class _Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_reports_first_periodically_and_last_with_an_eta():
  clock, lines = _Clock(), []
  progress = progress_lib.Progress("converting", 10, "cases", emit=lines.append, every_s=10.0, clock=clock)
  clock.now += 4.0
  progress.update(1)
  assert lines == ["converting: 1/10 cases (10%), 0:04 elapsed, ETA 0:36"]
  clock.now += 4.0
  progress.update(2)  # 4 s after the last line: quiet
  assert len(lines) == 1
  clock.now += 32.0
  progress.update(5)
  assert lines[-1] == "converting: 5/10 cases (50%), 0:40 elapsed, ETA 0:40"
  clock.now += 1.0
  progress.update(10)
  assert lines[-1] == "converting: 10/10 cases (100%), 0:41 elapsed" and len(lines) == 3
  assert progress_lib.format_seconds(3725) == "1:02:05"


def test_training_console_shows_a_line_after_a_silence(tmp_path, monkeypatch):
  from vcect_jax import summaries

  clock = _Clock()
  monkeypatch.setattr(summaries.time, "monotonic", clock)
  lines = []
  monkeypatch.setattr(summaries.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  writer = summaries.Writer(str(tmp_path), total_steps=100, console_keys=("loss",))
  assert not writer.heartbeat_due(1)
  clock.now += summaries.HEARTBEAT_S / 2
  assert not writer.heartbeat_due(2)
  clock.now += summaries.HEARTBEAT_S / 2
  assert writer.heartbeat_due(3)  # 2 steps in HEARTBEAT_S seconds: 97 to go
  writer.console(3, {})
  assert len(lines) == 1 and lines[0].startswith("step 3/100 (3%)  ")
  assert f"{2 / summaries.HEARTBEAT_S:.2f} steps/s" in lines[0] and "ETA 0:24:15" in lines[0]
  writer.close()


def test_the_learning_rate_decay_step_is_logged_and_moves_with_train_steps(monkeypatch):
  from configs import arterial
  from vcect_jax.methods import dual_path_gan

  lines = []
  monkeypatch.setattr(dual_path_gan.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  config = arterial.get_config("smoke")  # epochs 50, decay after 40
  steps = {}
  for n in (4, 8):
    config.train.steps = n
    steps[n] = dual_path_gan.decay_step(config.train, steps_per_epoch=10)
    dual_path_gan.DualPathGAN(config)._learning_rates(10)  # pylint: disable=protected-access
    assert f"after step {steps[n]} of {n}" in lines[-1] and "moves the decay" in lines[-1]
  assert steps == {4: 3, 8: 6}
  config.train.steps = 0
  assert dual_path_gan.decay_step(config.train, steps_per_epoch=10) == 400
