"""What a resumed run may not change: the keys behind data order and schedule.

A checkpoint records the values that fix which images each step sees and
which learning rate it uses: the seed (per-step keys, shuffling), the method,
the global batch size, the dataset and its split, the number of input shards
and the total number of steps (the schedule's length); and whether the state
holds an online probe. A restart whose config
gives any of them another value would continue a different run from the
saved state without a word, so it is refused with one line, unless the user
passes `--allow_config_change` (then it resumes and says what changed).
Other keys (logging and checkpoint frequency, evaluation settings, the
learning rate) may change on a restart.
"""

import sys
from typing import Any

import ml_collections

ALLOW_FLAG = '--allow_config_change'


def resume_keys(config: ml_collections.ConfigDict, *, total_steps: int,
                process_count: int) -> dict[str, Any]:
  """The values a resumed run must keep, by dotted key.

  Args:
    config: the run config.
    total_steps: the run's length in steps (from num_train_steps or
      num_epochs).
    process_count: processes of this run; `dataset.num_shards=0` means one
      shard per process, so the resolved count is recorded.
  """
  return {
      'seed': config.seed,
      'method': config.method,
      'global_batch_size': config.global_batch_size,
      'dataset.name': config.dataset.name,
      'dataset.image_folder': config.dataset.image_folder,
      'dataset.train_split': config.dataset.train_split,
      'dataset.num_shards': config.dataset.num_shards or process_count,
      'total_steps': total_steps,
      # The probe's state is part of the checkpoint, or not.
      'online_probe.enabled': config.online_probe.enabled,
  }


def check_resume_keys(saved: dict[str, Any] | None, current: dict[str, Any],
                      *, step: int, allow_change: bool) -> None:
  """Refuses a resume that changes a key of `resume_keys`.

  Args:
    saved: the values recorded with checkpoint `step` (None: an older
      checkpoint without them; nothing to compare).
    current: `resume_keys` of this run.
    step: the checkpoint's step, for the message.
    allow_change: resume anyway, with a one-line warning per changed key.

  Raises:
    ValueError: one line naming the first changed key, the saved value and
      the new one.
  """
  if saved is None:
    return
  for key in sorted(current):
    if key not in saved or saved[key] == current[key]:
      continue
    change = (f'{key} was {saved[key]!r} at checkpoint step {step} and is '
              f'{current[key]!r} now')
    if not allow_change:
      raise ValueError(
          f'{change}: resuming would silently change the data order or the '
          f'schedule; restore the old value, use a new --workdir, or pass '
          f'{ALLOW_FLAG} to resume anyway')
    print(f'jaxssl: warning: {change}; resuming anyway ({ALLOW_FLAG})',
          file=sys.stderr, flush=True)
