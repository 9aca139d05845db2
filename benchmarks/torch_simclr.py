"""The SimCLR CIFAR step of `configs/simclr_cifar10.py`, in PyTorch.

Only `benchmarks/compare.py` imports this module, and only when torch is
installed (`pip install -r benchmarks/requirements.txt`). It mirrors
jaxssl's step:
- ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), basic
  blocks of widths 64-512, BatchNorm (momentum 0.9 in jaxssl's convention,
  epsilon 1e-5), zero-initialised last BN scale in every block, a 1x1
  projection shortcut only where the shape changes, global average pool;
- SimCLR v2's 3-layer projection head 512-512-128 (Linear without bias,
  BN, ReLU; the last BN without offset);
- NT-Xent with the 2N views of one batch as candidates, self-similarity
  masked with -1e9, returning SimCLR's `mean(loss_a + loss_b)` = 2 L;
- one LARS step in SimCLR's form (`g += wd p`, trust `eta |p| / |g|`,
  `v = m v + lr trust g`, `p -= v`) on weights; biases and BN parameters
  take plain momentum steps without weight decay.
Both views go through the network as one batch of 2N images, so the BN
statistics span both views, as in jaxssl.
"""

import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  """Two 3x3 convs with BN; the second BN's scale starts at zero."""

  def __init__(self, in_channels: int, filters: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, filters, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters, momentum=0.1, eps=1e-5)
    self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(filters, momentum=0.1, eps=1e-5)
    nn.init.zeros_(self.bn2.weight)
    self.shortcut = None
    if stride != 1 or in_channels != filters:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_channels, filters, 1, stride, bias=False),
          nn.BatchNorm2d(filters, momentum=0.1, eps=1e-5))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18Cifar(nn.Module):
  """ResNet-18 trunk with the CIFAR stem; returns pooled 512-d features."""

  def __init__(self, in_channels: int = 3, width: int = 64):
    super().__init__()
    self.stem = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width, momentum=0.1, eps=1e-5), nn.ReLU())
    blocks, channels = [], width
    for stage in range(4):
      filters = width * 2**stage
      for index in range(2):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks.append(BasicBlock(channels, filters, stride))
        channels = filters
    self.blocks = nn.Sequential(*blocks)
    self.feature_dim = channels

  def forward(self, x):
    return self.blocks(self.stem(x)).mean(dim=(2, 3))


class ProjectionHead(nn.Module):
  """SimCLR v2 head: (Linear, BN, ReLU) x (layers - 1), Linear, BN(no beta)."""

  def __init__(self, in_dim: int, hidden_dim: int, output_dim: int,
               num_layers: int = 3):
    super().__init__()
    layers, dim = [], in_dim
    for i in range(num_layers):
      last = i == num_layers - 1
      out = output_dim if last else hidden_dim
      layers.append(nn.Linear(dim, out, bias=False))
      bn = nn.BatchNorm1d(out, momentum=0.1, eps=1e-5)
      if last:
        nn.init.zeros_(bn.bias)
        bn.bias.requires_grad_(False)  # SimCLR's center=False
      layers.append(bn)
      if not last:
        layers.append(nn.ReLU())
      dim = out
    self.net = nn.Sequential(*layers)

  def forward(self, h):
    return self.net(h)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor,
            temperature: float) -> torch.Tensor:
  """SimCLR's objective `mean(loss_a + loss_b)`, i.e. 2 x NT-Xent's L.

  Args:
    z1: `[batch, dim]` projections of view 1 (the whole batch).
    z2: `[batch, dim]` projections of view 2; row i pairs with row i of z1.
    temperature: tau > 0.

  Returns:
    A scalar: the mean over the 2N anchors of the cross-entropy against
    the other 2N - 1 views, times 2.

  References:
    google-research/simclr `tf2/objective.py:add_contrastive_loss`.
  """
  h = F.normalize(torch.cat([z1, z2]), dim=1, eps=1e-12)
  n = z1.shape[0]
  logits = h @ h.t() / temperature
  logits = logits - 1e9 * torch.eye(2 * n, dtype=logits.dtype,
                                    device=logits.device)
  positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
  return 2.0 * F.cross_entropy(logits, positives.to(logits.device))


class Lars:
  """SimCLR's LARS with momentum, as jaxssl's `lars_variant='simclr'`.

  Weights (`ndim > 1`): `g += wd p; trust = eta |p| / |g|` (1 when either
  norm is 0); `v = m v + lr trust g; p -= v`. Biases and BN parameters:
  `v = m v + lr g; p -= v`.
  """

  def __init__(self, params, *, lr: float, momentum: float = 0.9,
               weight_decay: float = 1e-4, eta: float = 1e-3):
    self.params = [p for p in params if p.requires_grad]
    self.lr, self.momentum = lr, momentum
    self.weight_decay, self.eta = weight_decay, eta
    self.buffers = [torch.zeros_like(p) for p in self.params]

  @torch.no_grad()
  def step(self) -> None:
    for p, v in zip(self.params, self.buffers):
      g = p.grad
      if p.ndim > 1:
        g = g + self.weight_decay * p
        p_norm = torch.linalg.vector_norm(p)
        g_norm = torch.linalg.vector_norm(g)
        trust = torch.where((p_norm > 0) & (g_norm > 0),
                            self.eta * p_norm / g_norm,
                            torch.ones_like(p_norm))
        g = g * trust
      v.mul_(self.momentum).add_(g, alpha=self.lr)
      p.sub_(v)

  def zero_grad(self) -> None:
    for p in self.params:
      p.grad = None


class SimCLRStep:
  """Network, loss and optimizer; `step(views)` is one training step.

  Args:
    temperature: NT-Xent tau (0.5 in the CIFAR recipe).
    lr: LARS learning rate (constant; a schedule costs nothing here).
    channels_last: run the convs in NHWC memory order.
  """

  def __init__(self, *, temperature: float = 0.5, lr: float = 2.0,
               weight_decay: float = 1e-4, channels_last: bool = False,
               seed: int = 0):
    torch.manual_seed(seed)
    self.encoder = ResNet18Cifar()
    self.head = ProjectionHead(self.encoder.feature_dim,
                               self.encoder.feature_dim, 128)
    self.net = nn.Sequential(self.encoder, self.head).train()
    self.memory_format = (torch.channels_last if channels_last
                          else torch.contiguous_format)
    self.net = self.net.to(memory_format=self.memory_format)
    self.temperature = temperature
    self.optimizer = Lars(self.net.parameters(), lr=lr,
                          weight_decay=weight_decay)

  def step(self, views: torch.Tensor) -> float:
    """One update on `views`: float32 `[N, 2, C, H, W]`; returns the loss."""
    n = views.shape[0]
    x = views.reshape((2 * n,) + views.shape[2:]).contiguous(
        memory_format=self.memory_format)
    z = self.net(x).reshape(n, 2, -1)
    loss = nt_xent(z[:, 0], z[:, 1], self.temperature)
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    return float(loss.detach())
