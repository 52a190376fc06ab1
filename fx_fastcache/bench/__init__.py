"""Benchmarks and quality instruments for fx_fastcache.

* :mod:`fx_fastcache.bench.metrics`: PSNR, SSIM, digit classifier, Fréchet distance.
* :func:`run_benchmark`: the methods x thresholds sweep (see :mod:`fx_fastcache.bench.runner`).
* :func:`write_all`: JSON, Markdown table and frontier plot of a sweep.
* :mod:`fx_fastcache.bench.peers`: diffusers' First-Block-Cache and cache-dit, run as their users run them.
"""
from .report import markdown_table, pareto, plot_frontier, write_all
from .runner import (
           DEFAULT_METHODS,
           DEFAULT_THRESHOLDS,
           Method,
           block_flops,
           parse_method,
           parse_methods,
           run_benchmark,
)

__all__ = ["run_benchmark", "write_all", "markdown_table", "plot_frontier", "pareto", "Method", "parse_method",
           "parse_methods", "block_flops", "DEFAULT_METHODS", "DEFAULT_THRESHOLDS"]
