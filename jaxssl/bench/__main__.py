"""Command line of the benchmarks: `python -m jaxssl.bench <subcommand>`.

  python -m jaxssl.bench losses --budget-gib 4
  python -m jaxssl.bench losses --json --views 8192
  python -m jaxssl.bench peak
  python -m jaxssl.bench step --config configs/simclr_cifar10.py --batch 64
  python -m jaxssl.bench input --config configs/simclr_fashion_mnist.py
  python -m jaxssl.bench augment --recipe byol --sizes 224 --json
  python -m jaxssl.bench train --config configs/simclr_fashion_mnist.py
  python -m jaxssl.bench memory --config configs/simclr_cifar10.py \
      --accumulation-steps 1 8 --budget-gib 16

See `jaxssl/bench/__init__.py` for the subcommand contract. The PyTorch
comparison is not part of the package: `python -m benchmarks.compare` from
the repository root (benchmarks/README.md).
"""

import argparse
import json
import sys

from jaxssl.bench import augment
from jaxssl.bench import input as input_bench
from jaxssl.bench import losses
from jaxssl.bench import memory
from jaxssl.bench import peak
from jaxssl.bench import step
from jaxssl.bench import synthetic_train

SUBCOMMANDS = {
    'losses': losses,
    'peak': peak,
    'step': step,
    'input': input_bench,
    'augment': augment,
    'train': synthetic_train,
    'memory': memory,
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m jaxssl.bench',
      description='jaxssl benchmarks; known subcommands: '
      + ', '.join(SUBCOMMANDS))
  sub = parser.add_subparsers(dest='command', required=True,
                              metavar='SUBCOMMAND')
  for name, module in SUBCOMMANDS.items():
    sub_parser = sub.add_parser(name, help=module.HELP,
                                description=module.__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    sub_parser.add_argument('--json', action='store_true',
                            help='print the report as JSON, not a table')
    module.add_arguments(sub_parser)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  module = SUBCOMMANDS[args.command]
  report = module.run(args)
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    print(module.format_report(report))
  # A report with ok=False (an error, a recompiling step) fails the command.
  return 0 if report.get('ok', True) else 1


if __name__ == '__main__':
  sys.exit(main())
