"""The keys a resumed run may not change, and the one-line refusal."""

import pytest

from helpers import load_config
from jaxssl import resume_guard


def _keys(**overrides):
  config = load_config('simclr_tiny', **overrides)
  return resume_guard.resume_keys(config, total_steps=8, process_count=1)


def test_records_what_fixes_data_order_and_schedule():
  assert _keys() == {
      'seed': 0, 'method': 'simclr', 'global_batch_size': 32,
      'dataset.name': 'fashion_mnist', 'dataset.image_folder': '',
      'dataset.train_split': 'train[:2048]', 'dataset.num_shards': 1,
      'total_steps': 8, 'online_probe.enabled': True}


@pytest.mark.parametrize('key, override, saved, new', [
    ('seed', {'seed': 3}, '0', '3'),
    ('global_batch_size', {'global_batch_size': 64}, '32', '64'),
    ('dataset.train_split', {'dataset.train_split': 'train'},
     "'train[:2048]'", "'train'"),
    ('dataset.num_shards', {'dataset.num_shards': 2}, '1', '2'),
])
def test_a_changed_key_is_refused_in_one_line(key, override, saved, new):
  with pytest.raises(ValueError) as error:
    resume_guard.check_resume_keys(_keys(), _keys(**override), step=8,
                                   allow_change=False)
  assert str(error.value) == (
      f'{key} was {saved} at checkpoint step 8 and is {new} now: resuming '
      'would silently change the data order or the schedule; restore the '
      'old value, use a new --workdir, or pass --allow_config_change to '
      'resume anyway')


def test_allow_change_resumes_with_a_warning(capsys):
  resume_guard.check_resume_keys(_keys(), _keys(seed=3), step=8,
                                 allow_change=True)
  assert capsys.readouterr().err == (
      'jaxssl: warning: seed was 0 at checkpoint step 8 and is 3 now; '
      'resuming anyway (--allow_config_change)\n')


def test_harmless_keys_and_old_checkpoints_pass(capsys):
  harmless = _keys(log_every_steps=1, eval_after_training=False,
                   **{'linear_eval.num_epochs': 3,
                      'optim.base_learning_rate': 0.5})
  resume_guard.check_resume_keys(_keys(), harmless, step=8,
                                 allow_change=False)
  resume_guard.check_resume_keys(None, _keys(seed=3), step=8,
                                 allow_change=False)
  assert capsys.readouterr().err == ''
