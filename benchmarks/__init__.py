"""rebuild's benchmarks (not tests): `python -m benchmarks`; see benchmarks/README.md."""
