"""Benchmarks: `python -m jaxssl.bench <subcommand> [--json] ...`.

Each subcommand is a module registered in `jaxssl.bench.__main__.SUBCOMMANDS`
that provides:
- `HELP`: a one-line summary for `--help`;
- `add_arguments(parser)`: its own argparse options;
- `run(args) -> dict`: performs the measurements and returns a
  JSON-serialisable report;
- `format_report(report) -> str`: the human-readable table.

The dispatcher adds `--json` to every subcommand (print the report as JSON
instead of the table). Importing this package does not import jax, so
benchmarks that measure process memory can do it in fresh subprocesses.
"""
