"""The PyTorch half of tests/torch_export_test.py, run as its own process.

torchvision is imported in a process without tensorflow: with PyPI's CUDA
torch wheels, `import torchvision` imports triton, and triton imported after
tensorflow segfaults (torch 2.14.1, triton 3.8.0, tensorflow-cpu 2.21); the
test process has tensorflow loaded by jaxssl's data modules. This process
imports numpy, torch, torchvision and `jaxssl.safetensors_file` only, like a
PyTorch user's.

Usage: python tests/torch_features.py JOBS.json

JOBS.json is a list of jobs, each `{"export": folder with encoder.json and
encoder.safetensors, "images": [NCHW .npy in [0, 1], ...], "out": .npz}`
or, for the README snippet, `{"snippet": code, "images": [...], "out": ...}`.
Each job writes to its `out`:
  features_<i>   the model built by encoder.json's recipe, on images i
                 (normalised first as encoder.json's input says)
  stock_<i>      the same with torchvision's own max-pool (ImageNet stem)
  missing, unexpected  of `load_state_dict(strict=False)` into a stock
                 torchvision model that keeps its fc
  reference_equal      1 if `safetensors.torch.load_file` reads the same
                 tensors (absent when the safetensors package is missing)
For a snippet job, `features_<i>` is the snippet's `features` on images i.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import torch
import torchvision
from torch import nn

from jaxssl import safetensors_file


def _features(model, x, normalize):
  if normalize:
    mean = torch.tensor(normalize['mean']).view(1, -1, 1, 1)
    std = torch.tensor(normalize['std']).view(1, -1, 1, 1)
    x = (x - mean) / std
  with torch.no_grad():
    return model(x).numpy()


def _export_job(job):
  with open(os.path.join(job['export'], 'encoder.json')) as f:
    description = json.load(f)
  path = os.path.join(job['export'], description['weights'])
  state = {k: torch.from_numpy(v)
           for k, v in safetensors_file.read(path).items()}
  scope = {'state': state}
  exec(description['recipe'], scope)  # pylint: disable=exec-used
  model = scope['model']
  images = [torch.from_numpy(np.load(p)) for p in job['images']]
  normalize = description['input']['normalize']
  out = {f'features_{i}': _features(model, x, normalize)
         for i, x in enumerate(images)}
  if description['stem'] == 'imagenet':
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    out.update({f'stock_{i}': _features(model, x, normalize)
                for i, x in enumerate(images)})
  stock = getattr(torchvision.models, description['architecture'])()
  if description['stem'] == 'cifar' or description['input']['channels'] != 3:
    stock.conv1 = model.conv1  # the shapes must match to load
  result = stock.load_state_dict(state, strict=False)
  out['missing'] = np.array(sorted(result.missing_keys))
  out['unexpected'] = np.array(sorted(result.unexpected_keys))
  if importlib.util.find_spec('safetensors') is not None:
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    reference = load_file(path)
    out['reference_equal'] = np.array(int(
        reference.keys() == state.keys() and
        all(torch.equal(reference[k], state[k]) for k in state)))
  return out


def _snippet_job(job):
  out = {}
  for i, p in enumerate(job['images']):
    scope = {'images': torch.from_numpy(np.load(p))}
    exec(job['snippet'], scope)  # pylint: disable=exec-used
    out[f'features_{i}'] = scope['features'].numpy()
  return out


def main(jobs_path):
  with open(jobs_path) as f:
    jobs = json.load(f)
  for job in jobs:
    out = _snippet_job(job) if 'snippet' in job else _export_job(job)
    np.savez(job['out'], **out)


if __name__ == '__main__':
  main(sys.argv[1])
