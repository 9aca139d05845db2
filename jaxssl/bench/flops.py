"""Model FLOPs of a step: XLA's cost analysis and an analytic ResNet count.

The two are independent: XLA counts the lowered HLO; the analytic count
comes from the ResNet architecture table alone (2 x 3 x MACs x views), so
their agreement checks both.
"""


def resnet_conv_macs(depth: int, image_size: int, *, in_channels: int,
                     cifar_stem: bool, width_multiplier: int = 1) -> int:
  """Multiply-accumulates of a ResNet v1.5 trunk's convolutions, one image.

  Counted from the architecture table alone (not from the model code):
  stem, then per block its convs and the projection shortcut where the
  shape changes. BatchNorm, ReLU and pooling are not counted.

  Args:
    depth: 18, 34, 50, 101 or 152.
    image_size: input side.
    in_channels: input channels.
    cifar_stem: 3x3 stride-1 stem without max-pool (else 7x7/2 + pool/2).
    width_multiplier: scales every channel count.

  Returns:
    MACs of one forward pass (ResNet-50 at 224: about 4.09e9).

  References:
    He et al., 2016, Table 1 (FLOPs there are multiply-adds).
  """
  from jaxssl.models import resnet  # pylint: disable=g-import-not-at-top
  block, stages = resnet.ARCHITECTURES[depth]
  width = 64 * width_multiplier
  side = image_size
  if cifar_stem:
    macs = side * side * 9 * in_channels * width
  else:
    side = -(-side // 2)
    macs = side * side * 49 * in_channels * width
    side = -(-side // 2)  # 3x3 stride-2 'SAME' max-pool
  channels = width
  for stage, blocks in enumerate(stages):
    filters = width * 2**stage
    for index in range(blocks):
      stride = 2 if stage > 0 and index == 0 else 1
      out_side = (side - 1) // stride + 1
      out_area = out_side * out_side
      if block.expansion == 1:
        out = filters
        macs += out_area * 9 * (channels * filters + filters * filters)
      else:
        out = 4 * filters
        macs += side * side * channels * filters
        macs += out_area * (9 * filters * filters + filters * out)
      if stride != 1 or channels != out:
        macs += out_area * channels * out
      channels, side = out, out_side
  return macs


def analytic_step_flops(config, num_channels: int) -> float | None:
  """2 x 3 x (conv + projection-head MACs) x views per step, or None.

  The factor 3 is the forward and the two backward products; None for
  encoders other than ResNets.
  """
  from jaxssl import models  # pylint: disable=g-import-not-at-top
  name = config.model.encoder
  if not name.startswith('resnet'):
    return None
  size = config.dataset.image_size
  stem = config.model.stem
  cifar = (size <= models.CIFAR_STEM_MAX_IMAGE_SIZE if stem == 'auto'
           else stem == 'cifar')
  macs = resnet_conv_macs(int(name[len('resnet'):]), size,
                          in_channels=num_channels, cifar_stem=cifar,
                          width_multiplier=config.model.width_multiplier)
  head = config.head
  width = models.feature_dim(config.model)
  hidden = head.hidden_dim or width
  dims = [width] + [hidden] * (head.num_layers - 1) + [head.output_dim]
  macs += sum(a * b for a, b in zip(dims[:-1], dims[1:])) * (
      head.num_layers > 0)
  views = config.global_batch_size * config.augment.num_views
  return 2.0 * 3.0 * macs * views


def xla_flops(lowered) -> float:
  """FLOPs of a lowered program by XLA's HLO cost analysis (0 if absent)."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))
