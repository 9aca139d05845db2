"""`--mode=eval`: the evaluations of a frozen encoder, with a random-init
baseline.

The encoder comes from an export or a training workdir (`load_encoder`);
`jaxssl.evaluation.suite` measures it (the linear probe, labelled with its
protocol, kNN and health metrics), and the same measurements of the same
architecture at random init are printed beside it (docs/evaluation.md).
"""

import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from jax.sharding import Mesh

from jaxssl import checkpoint
from jaxssl import cpu_kernels
from jaxssl import datasets
from jaxssl import encoder_export
from jaxssl import models
from jaxssl import parallel
from jaxssl.evaluation import suite

PyTree = Any


def encoder_spec(config: ml_collections.ConfigDict, *, num_channels: int,
                 step: int) -> dict[str, Any]:
  """The JSON spec that lets an exported encoder be rebuilt without config."""
  return {'model': config.model.to_dict(),
          'image_size': config.dataset.image_size,
          'num_channels': num_channels,
          'method': config.method,
          'dataset': config.dataset.name,
          'step': step,
          'format': 'jaxssl-encoder-v1'}


def build_encoder(spec: dict[str, Any], *, kernels: str = 'auto'
                  ) -> tuple[nn.Module, PyTree]:
  """Returns `(encoder module, abstract variables)` for an encoder spec.

  Args:
    spec: an `encoder_spec` (from an export or a training checkpoint).
    kernels: the ops to run it with (`cpu_kernels.select_factories`); any
      choice loads any export, as the variables do not depend on it.
  """
  model = dict(spec['model'])
  # Exports written before jaxssl.cpu_kernels carry `conv_impl`, a runtime
  # choice that no longer belongs to the model; it is ignored.
  model.pop('conv_impl', None)
  factories = cpu_kernels.select_factories(kernels)
  encoder = models.make_encoder(
      ml_collections.ConfigDict(model), image_size=spec['image_size'],
      conv=factories.conv, norm=factories.norm)
  shape = (1, spec['image_size'], spec['image_size'], spec['num_channels'])
  abstract = jax.eval_shape(
      functools.partial(encoder.init, train=False), jax.random.key(0),
      jnp.zeros(shape, jnp.float32))
  abstract = {'params': abstract['params'],
              'batch_stats': abstract.get('batch_stats', {})}
  return encoder, abstract


def load_encoder(source: str, mesh: Mesh, *, prefer_export: bool = True,
                 kernels: str = 'auto'
                 ) -> tuple[dict[str, Any], nn.Module, PyTree]:
  """Loads `(spec, encoder, variables)` from an export or a training run.

  Args:
    source: an exported-encoder directory, or a training workdir (then its
      `export/` if present and `prefer_export`, else the encoder part of its
      newest intact checkpoint, restored partially and checked against the
      checksums saved with it; damaged newer steps are skipped with a
      warning, `encoder_export.restore_newest_good_encoder`).
    mesh: variables are placed replicated on this mesh.
    prefer_export: for a workdir, use its `export/` when there is one.
    kernels: the ops the returned encoder runs with (`build_encoder`).
  """
  path = epath.Path(source)
  if prefer_export and not (path / 'spec').exists() and (
      path / encoder_export.EXPORT_SUBDIR / 'spec').exists():
    path = path / encoder_export.EXPORT_SUBDIR
  replicated = parallel.replicated(mesh)
  if (path / 'spec').exists():
    spec = encoder_export.read_export_spec(str(path))
    encoder, abstract = build_encoder(spec, kernels=kernels)
    variables = encoder_export.load_exported_variables(
        str(path), checkpoint.abstract_with_sharding(abstract, replicated))
    return spec, encoder, variables
  def abstract_for(meta):
    _, abstract = build_encoder(meta['encoder_spec'], kernels=kernels)
    return checkpoint.abstract_with_sharding(abstract, replicated)

  step, meta, variables = encoder_export.restore_newest_good_encoder(
      source, abstract_for)
  spec = dict(meta['encoder_spec'], step=step)
  encoder, _ = build_encoder(spec, kernels=kernels)
  return spec, encoder, variables


def random_encoder_variables(encoder: nn.Module, spec: dict[str, Any],
                             seed: int, mesh: Mesh) -> PyTree:
  """Variables of the same architecture at random init (the baseline)."""
  shape = (1, spec['image_size'], spec['image_size'], spec['num_channels'])
  init = jax.jit(functools.partial(encoder.init, train=False),
                 out_shardings=parallel.replicated(mesh))
  variables = init(jax.random.key(seed), jnp.zeros(shape, jnp.float32))
  return {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}


def check_eval_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Raises ValueError before any compile (and before any pretraining) for
  evaluation settings that cannot work: batch sizes, missing splits, kNN's
  k against the train split."""
  devices = mesh.devices.size
  size = config.linear_eval.feature_batch_size
  if size % devices or size % jax.process_count():
    raise ValueError(
        f'linear_eval.feature_batch_size={size} must be divisible by the '
        f'device count {devices} and the process count '
        f'{jax.process_count()}')
  builder = datasets.get_builder(config.dataset)
  sizes = {}
  for key in ('eval_train_split', 'eval_test_split'):
    try:
      sizes[key] = datasets.split_num_examples(builder, config.dataset[key])
    except ValueError as e:
      raise ValueError(f'dataset.{key}: {e}') from None
  train = sizes['eval_train_split']
  if config.knn_eval.enabled and max(config.knn_eval.ks) > train:
    raise ValueError(
        f'knn_eval.ks={tuple(config.knn_eval.ks)} has a k above the '
        f'{train} images of dataset.eval_train_split='
        f"'{config.dataset.eval_train_split}'; use ks <= {train}")


def run(config: ml_collections.ConfigDict, source: str, mesh: Mesh,
        results_path: str | None = None) -> dict[str, Any]:
  """Evaluates `source` and, if configured, the random-init baseline.

  Args:
    config: the run config (dataset, linear_eval, knn_eval, health).
    source: exported-encoder directory or training workdir.
    mesh: device mesh for feature extraction.
    results_path: where process 0 writes the results as JSON (optional).

  Returns:
    `{'encoder': {...}, 'random_init': {...} or None, 'spec': {...},
    'dataset': name, 'settings': {...}}`, each encoder's entry as
    `jaxssl.evaluation.suite.evaluate_encoder` returns it.
  """
  check_eval_config(config, mesh)
  spec, encoder, variables = load_encoder(source, mesh,
                                          kernels=config.kernels)
  if spec['image_size'] != config.dataset.image_size:
    raise ValueError(
        f'the encoder was trained at image_size={spec["image_size"]} but '
        f'dataset.image_size={config.dataset.image_size}; evaluate at the '
        'training size')
  num_classes = datasets.dataset_info(config.dataset).num_classes
  measure = functools.partial(suite.evaluate_encoder, config, encoder,
                              mesh=mesh, num_classes=num_classes)
  results = {'spec': spec, 'dataset': config.dataset.name,
             'settings': {'knn_temperature': config.knn_eval.temperature,
                          'health_num_samples': config.health.num_samples},
             'encoder': measure(variables), 'random_init': None}
  if config.linear_eval.random_init_baseline:
    results['random_init'] = measure(
        random_encoder_variables(encoder, spec, config.seed, mesh))
  if jax.process_index() == 0:
    print(format_results(results), flush=True)
    if results_path:
      epath.Path(results_path).parent.mkdir(parents=True, exist_ok=True)
      epath.Path(results_path).write_text(json.dumps(results, indent=2))
  return results


def _columns(enc: dict[str, Any]) -> list[tuple[str, Any]]:
  """`(title, entry -> cell text)` of every measurement in `enc`."""
  percent = lambda x: f'{100 * x:.2f}%'
  columns = []
  for protocol in enc['linear']:
    columns += [(f'linear-{protocol}',
                 lambda r, p=protocol: percent(r['linear'][p]['top1'])),
                ('top-5', lambda r, p=protocol: percent(r['linear'][p]['top5']))]
  for name in enc['knn'] or {}:
    columns.append((f'kNN-{name[1:]}',
                    lambda r, n=name: percent(r['knn'][n]['top1'])))
  if enc['health']:
    columns += [('RankMe', lambda r: f'{r["health"]["rankme"]:.1f}'),
                ('align', lambda r: f'{r["health"]["alignment"]:.3f}'),
                ('uniform', lambda r: f'{r["health"]["uniformity"]:.3f}')]
  for fraction in enc.get('finetune') or {}:
    columns.append((f'FT-{100 * float(fraction):g}%',
                    lambda r, f=fraction: percent(r['finetune'][f]['top1'])))
  return columns


def _notes(results: dict[str, Any]) -> str:
  """One line saying what each kind of column measured."""
  enc, settings = results['encoder'], results.get('settings', {})
  notes = [f'linear-{", linear-".join(enc["linear"])}: top-1 and top-5 of '
           'those linear protocols (docs/evaluation.md)']
  if enc['knn']:
    notes.append(f'kNN-k: top-1 of cosine kNN, votes exp(cos / '
                 f'{settings.get("knn_temperature", "T")})')
  if enc['health']:
    notes.append(f'RankMe, alignment, uniformity (t = 2): the first '
                 f'{settings.get("health_num_samples", "N")} test images')
  if enc.get('finetune'):
    notes.append('FT-x%: top-1 after fine-tuning every layer on x% of the '
                 'train labels (the random-init row: the same training from '
                 'scratch)')
  return '; '.join(notes)


def format_results(results: dict[str, Any]) -> str:
  """A small table, one row per encoder, and what each column measured."""
  enc = results['encoder']
  columns = _columns(enc)
  rows = [(f'{results["spec"]["method"]} (step {results["spec"]["step"]})',
           enc)]
  if results['random_init']:
    rows.append(('random init (baseline)', results['random_init']))
  widths = [max(len(title), 7) + 2 for title, _ in columns]
  lines = [f'evaluation on {results["dataset"]}: {enc["num_train"]} train / '
           f'{enc["num_test"]} test images, {enc["feature_dim"]}-d features',
           f'{"encoder":<26}' + ''.join(
               f'{title:>{w}}' for (title, _), w in zip(columns, widths))]
  for name, r in rows:
    lines.append(f'{name:<26}' + ''.join(
        f'{cell(r):>{w}}' for (_, cell), w in zip(columns, widths)))
  return '\n'.join(lines + [_notes(results)])
