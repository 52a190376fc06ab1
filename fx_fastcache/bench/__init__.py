"""Benchmarks and quality instruments for fx_fastcache (see :mod:`fx_fastcache.bench.metrics`)."""
