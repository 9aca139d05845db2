"""The only training loop: mesh, data, init or restore, steps, checkpoints.

Everything that touches files, clocks and hosts is here; the step itself
(`jaxssl.steps`) is pure and is jitted in `jaxssl.step_setup`, whose
`Setup`, `setup`, `global_batch`, `resolved_values`, `resolved_line` and
`total_train_steps` this module re-exports (they need no TensorFlow; this
module does, for the input pipeline and the evaluation).
"""

from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from jaxssl import checkpoint
from jaxssl import distributed
from jaxssl import encoder_export
from jaxssl import evaluate
from jaxssl import input_pipeline
from jaxssl import parallel
from jaxssl import preemption
from jaxssl import reporting
from jaxssl import resume_guard
from jaxssl import torch_export
from jaxssl.evaluation import retrieval
from jaxssl.evaluation import suite

# Re-exported: the trainer's names for what it builds before reading data.
from jaxssl.step_setup import (  # pylint: disable=unused-import
    Setup, global_batch, resolved_line, resolved_values, setup,
    total_train_steps)


def _check_resumable(saved: dict, current: dict, directory) -> None:
  """Raises ValueError unless the checkpoint's arrays fit this config's state.

  The comparison is of every array's path and shape, so it accepts changes
  that keep the state (dtype, learning rate, number of steps) and refuses
  ones that do not (another encoder, head width or optimizer) before any
  restore is attempted; the checkpoint is not touched.
  """
  for path in sorted(set(saved) | set(current)):
    if saved.get(path) != current.get(path):
      name = '/'.join(path)
      there = saved.get(path, 'no such array')
      here = current.get(path, 'no such array')
      raise ValueError(
          f'{directory} holds a checkpoint that does not fit this config: '
          f'{name} is {there} there and {here} here; use a new --workdir or '
          'the config it was trained with (the checkpoint is left as is)')


def _jsonable(value):
  """Tuples and lists compare equal, as they do after a JSON round trip."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def agreed_latest_step(ckpt: checkpoint.Checkpointer) -> int | None:
  """The latest checkpoint step, checked to be the same on every process.

  A collective: every process must call it. A workdir that is not one
  shared directory (say a local path on each host) fails here, on every
  process, instead of restoring different states.
  """
  step = ckpt.latest_step()
  steps = distributed.process_values(-1 if step is None else step)
  differs = [q for q, other in enumerate(steps) if other != steps[0]]
  if differs:
    q = differs[0]
    first, other = ('none' if s < 0 else f'step {s}'
                    for s in (steps[0], steps[q]))
    raise ValueError(
        f'processes see different latest checkpoints in {ckpt.directory} '
        f'(process 0: {first}, process {q}: {other}); '
        'every process needs the same --workdir, on storage they all share')
  return step


def restore_or_init(s: Setup, ckpt: checkpoint.Checkpointer, *,
                    allow_config_change: bool = False):
  """Returns `(state, start_step)` from the newest good checkpoint or init.

  A damaged newest step falls back to the previous good one
  (`Checkpointer.restore_newest_good`); a step whose resume keys or array
  shapes differ from this config's is refused (`resume_guard`).
  """
  agreed_latest_step(ckpt)
  abstract = checkpoint.abstract_with_sharding(
      jax.eval_shape(s.init_fn), parallel.replicated(s.mesh))
  current = resume_guard.resume_keys(s.config, total_steps=s.total_steps,
                                     process_count=jax.process_count())

  def check_fits(step, meta, saved_shapes):
    resume_guard.check_resume_keys(meta.get('resume_keys'), current,
                                   step=step, allow_change=allow_config_change)
    _check_resumable(saved_shapes, checkpoint.shapes_by_path(abstract),
                     ckpt.directory)

  restored = ckpt.restore_newest_good(abstract, check_fits)
  if restored is None:
    return s.init_fn(), 0
  start, state, _ = restored
  if len(set(distributed.process_values(start))) > 1:
    raise ValueError(f'processes restored different steps from '
                     f'{ckpt.directory}; every process needs the same '
                     '--workdir, on storage they all share')
  return state, start


def train(s: Setup, workdir: str, *, allow_config_change: bool = False):
  """Runs (or resumes) pretraining to `s.total_steps`; returns the state.

  `allow_config_change`: resume even if a `resume_guard` key changed.
  """
  config = s.config
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  state, start = restore_or_init(s, ckpt,
                                 allow_config_change=allow_config_change)
  if jax.process_index() == 0:
    print(f'{config.method}: {s.total_steps} steps ({s.steps_per_epoch} per '
          f'epoch) at global batch {config.global_batch_size} on '
          f'{s.mesh.devices.size} devices, {jax.process_count()} process(es); '
          f'{"resuming from step " + str(start) if start else "from scratch"}'
          f'; {s.factories.describe()}', flush=True)
    print(resolved_line(s.resolved), flush=True)
  if start >= s.total_steps:
    return state
  batches = input_pipeline.pretrain_batches(
      config, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count())
  reporter = reporting.Reporter(workdir, total_steps=s.total_steps,
                                global_batch_size=config.global_batch_size,
                                start_step=start)
  meta = {'config': _jsonable(config.to_dict()),
          'resolved': _jsonable(s.resolved),
          'encoder_spec': evaluate.encoder_spec(
              config, num_channels=s.info.image_shape[-1], step=0),
          'resume_keys': resume_guard.resume_keys(
              config, total_steps=s.total_steps,
              process_count=jax.process_count())}
  stopped_at = None
  try:
    with preemption.StopRequests(s.mesh) as stop:
      for step in range(start + 1, s.total_steps + 1):
        state, metrics = s.train_step(state,
                                      global_batch(next(batches), s.mesh))
        reporter.add(metrics)
        # A signal stops every process after the same step (a collective,
        # answered one step late so the host does not wait for the device).
        stopping = stop.should_stop()
        last = step == s.total_steps or stopping
        if step % config.log_every_steps == 0 or last:
          reporter.write(step)
        if config.eval_every_steps and step % config.eval_every_steps == 0:
          reporter.write_monitors(step, suite.monitors(
              config, s.method.encoder,
              s.method.encoder_variables(state.params, state.batch_stats),
              s.mesh, s.info.num_classes))
        if step % config.checkpoint_every_steps == 0 or last:
          reporter.check_finite(step)
          ckpt.save(step, state, meta)
        if stopping:
          stopped_at = step
          break
  finally:
    ckpt.wait()
    reporter.close()
  if stopped_at is not None:
    raise preemption.Preempted(stop.reason(), stopped_at, str(ckpt.directory))
  return state


def export(s: Setup, state, destination: str) -> str:
  """Writes the encoder of `state` (params + BN statistics) to `destination`."""
  variables = s.method.encoder_variables(state.params, state.batch_stats)
  spec = evaluate.encoder_spec(s.config, num_channels=s.info.image_shape[-1],
                               step=int(state.step))
  encoder_export.export_encoder(destination, variables, spec)
  if jax.process_index() == 0:
    print(f'exported the encoder at step {int(state.step)} to {destination}',
          flush=True)
  return destination


def run(config: ml_collections.ConfigDict, workdir: str, *,
        allow_config_change: bool = False) -> dict[str, Any]:
  """Pretrains, exports the encoder and, if configured, evaluates it.

  `allow_config_change`: see `train`.

  Returns:
    `{'step': final step, 'eval': `evaluate.run`'s results or None}`.
  """
  s = setup(config)
  if config.eval_after_training or config.eval_every_steps:
    evaluate.check_eval_config(config, s.mesh)
  state = train(s, workdir, allow_config_change=allow_config_change)
  destination = str(epath.Path(workdir) / encoder_export.EXPORT_SUBDIR)
  export(s, state, destination)
  results = None
  step = int(np.asarray(state.step))
  if config.eval_after_training:
    results = evaluate.run(config, destination, s.mesh,
                           results_path=str(epath.Path(workdir)
                                            / 'evaluation.json'))
    # The final figures join the monitors' curves in TensorBoard.
    reporting.write_scalars(workdir, step,
                            reporting.evaluation_scalars(results['encoder']))
  if config.pictures_after_training:
    retrieval.write_pictures(
        config, workdir, s.method.encoder,
        s.method.encoder_variables(state.params, state.batch_stats), s.mesh,
        title=f'{config.method} (step {step})')
  return {'step': int(np.asarray(state.step)), 'eval': results}


def export_latest(workdir: str, *, export_format: str = 'orbax',
                  source: str | None = None) -> str:
  """Exports the encoder of `workdir`'s latest checkpoint.

  Only the encoder is read from the checkpoint (a partial restore).

  Args:
    workdir: the run directory; the export goes to its `export/` ('orbax')
      or `torch_export/` ('torch').
    export_format: 'orbax' (`jaxssl.encoder_export`, what evaluation loads)
      or 'torch' (`jaxssl.torch_export`: torchvision safetensors + JSON).
    source: read the encoder from here instead (an exported encoder or
      another training workdir).

  Returns:
    The directory written.
  """
  mesh = parallel.make_mesh()
  spec, _, variables = evaluate.load_encoder(source or workdir, mesh,
                                             prefer_export=False)
  if export_format == 'torch':
    destination = str(epath.Path(workdir) / torch_export.TORCH_SUBDIR)
    weights = torch_export.export_torch(destination, variables, spec)
    what = (f'as torchvision {spec["model"]["encoder"]} to {weights} '
            f'(and {torch_export.SPEC_FILE})')
  else:
    destination = str(epath.Path(workdir) / encoder_export.EXPORT_SUBDIR)
    encoder_export.export_encoder(destination, variables, spec)
    what = f'to {destination}'
  if jax.process_index() == 0:
    print(f'exported the encoder at step {spec["step"]} {what}', flush=True)
  return destination
