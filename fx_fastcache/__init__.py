"""fx-fastcache: FastCache for Diffusion Transformers as FX graph rewrites.

    import fx_fastcache as fastcache
    opt = fastcache.optimize(model, backend="inductor")
    with fastcache.calibrate(opt):
        run_a_few_sampling_loops(opt)
    stats = fastcache.get_cache_statistics(opt)
"""
from __future__ import annotations

from .api import (
                  calibrate,
                  configure,
                  fit_output_rule,
                  get_cache_statistics,
                  load_calibration,
                  measure_sensitivity,
                  optimize,
                  protect_steps,
                  reset,
                  save_calibration,
                  search_plan,
                  set_schedule,
)
from .config import FastCacheConfig
from .families import BlockListSpec
from .module import FastCacheModule
from .pipelines import disable_fastcache, enable_fastcache

__version__ = "0.1.0"

__all__ = ["FastCacheConfig", "FastCacheModule", "BlockListSpec", "optimize", "calibrate", "save_calibration", "load_calibration",
           "get_cache_statistics", "reset", "configure", "set_schedule", "measure_sensitivity", "protect_steps",
           "search_plan", "fit_output_rule", "enable_fastcache",
           "disable_fastcache", "__version__"]
