"""Benchmarks kept out of the installed package; see benchmarks/README.md."""
