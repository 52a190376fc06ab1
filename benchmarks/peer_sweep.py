"""Sweep groups for issue #13: our step rule against diffusers' TaylorSeer and MagCache.

Each group is one process (1 thread) so the groups can run side by side and be merged with
``fx_fastcache.bench.report.merge``; every group generates the same 16 evaluation images
(seeds 1000-1015) and calibrates on seeds 0-3, like ``fx-fastcache bench``.

    python benchmarks/peer_sweep.py --model dit-mnist --group taylorseer --out out/sweep
    python benchmarks/peer_sweep.py --merge out/sweep/dit-mnist-*.json --stem bench13-dit-mnist --out docs

Groups (per-method grids, chosen to span 45-70 % replaced on 20 steps):
* ``taylorseer``: orders 1 and 2; ``disable_cache_before_step`` 3 with intervals 2, 3, 4 and
  2 with intervals 3, 5 (fractions 45, 55, 65, 60, 70 %).
* ``magcache``: K = 3 (retention 0.2: at most 60 %) thresholds 0.03-0.24; K = 4 with retention
  0.1 (reaches 75 %); K = 2.
* ``compact``: a selection of the above in one process, most informative first.
* ``ours``: ``step_forecast/forecast`` thresholds 0.06-0.13; ``ours_cap``: the same with
  ``max_skip_steps`` 2 and 3.
* ``planned``: ``planned/forecast`` at target fractions 0.45-0.70.
* ``planned_sens``: the same after ``fastcache.measure_sensitivity``.
* ``planned_reuse``: ``planned/residual`` (the plan made for plain reuse) at the same fractions.
* ``planned_blend``: ``planned/forecast_blend`` (the plan made for the blended forecast) at the same
  fractions.  ``planned_blend_protect``: the same after ``fastcache.protect_steps`` (floor 34 dB).
* ``planned_protect``: ``planned/forecast`` after ``fastcache.protect_steps`` (floor 34 dB on 32
  calibration seeds, 0-31) at the same fractions; ``planned_protect_low``: floor 28 dB.
* ``third``: every default and peer on a model nothing was tuned on (``--model out/sd3-mnist``).
* ``heldout``: the same for a model trained after every rule was fixed (``--model flux-mnist``,
  ninth session), with ``planned`` for both forecast fallbacks, ``protect_steps`` and TaylorSeer order 2.
* ``drift``: ``planned`` and the step rule with ``drift_correction="flow_euler"`` (tenth session);
  ``drift_blend``, ``drift_protect``, ``drift_sens``: with ``forecast_blend``, ``protect_steps`` (34 dB)
  and ``measure_sensitivity``.
* ``search``: ``planned`` with ``drift_correction`` and ``fastcache.search_plan`` (16 calibration seeds,
  0-15; eleventh session; fixed-interval start plans since the twelfth) at 0.45-0.70; ``search_hi``: only
  0.6 and 0.7 (a third of the time); ``search_worst``: 0.6 and 0.7 with ``objective="worst_quarter"`` on 32
  calibration seeds, 0-31 (twelfth session).
* ``shifted``: for ``--shift 3`` (the schedule SD3 and Flux pipelines sample with; twenty-seventh session): both
  defaults, the step rule with the noise forecast, ``search_plan`` with the drift correction with and without the
  noise forecast, and every peer (TaylorSeer, MagCache with its ratios calibrated on that schedule, diffusers' FBC,
  TeaCache, cache-dit F1B0 and its best settings).
* ``fifth`` and ``fifth_peers``: the ``shifted`` group's methods, split in two processes, for a fifth model trained
  after every rule was fixed (``--model out/wan-mnist``, the Wan-style model of ``benchmarks/train_mnist_family.py
  --kind wan``, thirtieth session), on the uniform schedule and with ``--shift 3`` (Wan pipelines' ``flow_shift`` at
  480p): committed before its weights existed, and nothing on it was looked at before these groups ran (then the
  one-line default, ``benchmarks/plan_vs_interval.py out/wan-mnist --default``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch


def groups():
    from fx_fastcache.bench import parse_method

    def m(spec, thr):
        return replace(parse_method(spec), thresholds=tuple(thr))

    fractions = (0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
    ours_now = [m("none", ()), m("step_forecast/forecast", (0.05, 0.07, 0.1, 0.13)),
                m("step_forecast/forecast:noise=1", (0.05, 0.07, 0.1, 0.13)),
                m("planned/forecast:drift=1:search=1", fractions),
                m("planned/forecast:drift=1:noise=1:search=1", fractions)]
    peers_now = [m("none", ()), m("diffusers_taylorseer:order=1:before=3", (2, 3, 4)),
                 m("diffusers_taylorseer:order=1:before=2", (3, 5)),
                 m("diffusers_taylorseer:order=2:before=2", (3, 5)),
                 m("diffusers_magcache:max_skip=3:retention=0.2", (0.03, 0.06, 0.12, 0.24)),
                 m("diffusers_magcache:max_skip=4:retention=0.1", (0.12, 0.24)),
                 m("diffusers_fbc", (0.1, 0.2, 0.3)),
                 m("teacache", (0.1, 0.2, 0.3, 0.4)),
                 m("cache_dit", (0.12, 0.24, 0.4, 0.6, 1.0)),
                 m("cache_dit:taylorseer=1", (0.12, 0.24, 0.4, 0.6, 1.0)),
                 m("cache_dit:max_skip=3:taylorseer=1", (0.12, 0.24, 0.4, 0.6, 1.0)),
                 m("cache_dit:max_skip=2:taylorseer=1", (0.12, 0.24, 0.4, 0.6, 1.0))]
    return {
        "taylorseer": [m("none", ())] + [
            m(f"diffusers_taylorseer:order={o}:before={b}", ivs)
            for o in (1, 2) for b, ivs in ((3, (2, 3, 4)), (2, (3, 5)))],
        "magcache": [m("none", ()),
                     m("diffusers_magcache:max_skip=3:retention=0.2", (0.03, 0.06, 0.12, 0.24)),
                     m("diffusers_magcache:max_skip=4:retention=0.1", (0.06, 0.12, 0.24)),
                     m("diffusers_magcache:max_skip=2:retention=0.2", (0.06, 0.24))],
        "ours": [m("none", ()), m("step_forecast/forecast", (0.06, 0.07, 0.08, 0.09, 0.11, 0.13))],
        # the steps to compute planned in calibration (its sweep is target_fraction)
        "planned": [m("none", ()), m("planned/forecast", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        # the same, re-planned after fastcache.measure_sensitivity (one generation per step on the calibration seeds)
        "planned_sens": [m("none", ()), m("planned/forecast:sens=1", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        # the same plan made for, and run with, plain residual reuse (a zero-order hold, as MagCache)
        "planned_reuse": [m("none", ()), m("planned/residual", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        # the plan made for the blended forecast (fallback="forecast_blend", eighth session)
        "planned_blend": [m("none", ()), m("planned/forecast_blend", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        "planned_blend_protect": [m("none", ()),
                                  m("planned/forecast_blend:protect=34", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        # the steps whose skip alone breaks one of 32 calibration images always compute (fastcache.protect_steps)
        "planned_protect": [m("none", ()), m("planned/forecast:protect=34", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        "planned_protect_low": [m("none", ()), m("planned/forecast:protect=28", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        # a model no rule was tuned on (the SD3-style model trained by benchmarks/train_mnist_family.py):
        # both defaults untouched, then each method's grid across 45-70 %
        "third": [m("none", ()), m("step_forecast/forecast", (0.07, 0.085, 0.1, 0.13)),
                  m("planned/forecast", (0.55, 0.45, 0.6, 0.65, 0.7)),
                  m("diffusers_taylorseer:order=1:before=3", (2, 3, 4)),
                  m("diffusers_taylorseer:order=1:before=2", (3, 5)),
                  m("diffusers_magcache:max_skip=3:retention=0.2", (0.06, 0.24)),
                  m("diffusers_magcache:max_skip=4:retention=0.1", (0.24,)),
                  m("diffusers_fbc", (0.1, 0.2, 0.3))],
        # a model trained after every rule and default was fixed (flux-mnist, ninth session): nothing on it
        # was looked at before this group ran
        "heldout": [m("none", ()), m("step_forecast/forecast", (0.07, 0.085, 0.1, 0.13)),
                    m("planned/forecast", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7)),
                    m("planned/forecast_blend", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7)),
                    m("planned/forecast:protect=34", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7)),
                    m("diffusers_taylorseer:order=1:before=3", (2, 3, 4)),
                    m("diffusers_taylorseer:order=1:before=2", (3, 5)),
                    m("diffusers_taylorseer:order=2:before=2", (3, 5)),
                    m("diffusers_magcache:max_skip=3:retention=0.2", (0.03, 0.06, 0.12, 0.24)),
                    m("diffusers_magcache:max_skip=4:retention=0.1", (0.12, 0.24)),
                    m("diffusers_fbc", (0.1, 0.2, 0.3))],
        # one process, most informative runs first (for a loaded machine: partial results still cover 45-70 %)
        "compact": [m("none", ()), m("step_forecast/forecast", (0.07, 0.09, 0.11)),
                    m("diffusers_taylorseer:order=1:before=2", (3, 5)),
                    m("diffusers_magcache:max_skip=3:retention=0.2", (0.06, 0.24)),
                    m("diffusers_magcache:max_skip=4:retention=0.1", (0.24,)),
                    m("diffusers_taylorseer:order=1:before=3", (2, 4)),
                    m("diffusers_taylorseer:order=2:before=2", (3, 5)),
                    m("step_forecast/forecast", (0.08, 0.13))],
        # the calibrated default (step_forecast's fitted scale) and two thresholds around it
        "default": [m("none", ()), m("step_forecast/forecast", (0.07, 0.085, 0.06))],
        # follow-ups: TaylorSeer's before=3 schedules and MagCache below 55 %
        "extra": [m("none", ()), m("diffusers_taylorseer:order=1:before=3", (3, 2)),
                  m("diffusers_magcache:max_skip=3:retention=0.2", (0.01, 0.02))],
        # drift correction (drift_correction="flow_euler", tenth session): both defaults' rules with it
        "drift": [m("none", ()), m("planned/forecast:drift=1", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7)),
                  m("step_forecast/forecast:drift=1", (0.07, 0.085, 0.1, 0.13))],
        "drift_blend": [m("none", ()), m("planned/forecast_blend:drift=1", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        "drift_protect": [m("none", ()), m("planned/forecast:protect=34:drift=1", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        "drift_sens": [m("none", ()), m("planned/forecast:sens=1:drift=1", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        "search": [m("none", ()), m("planned/forecast:drift=1:search=1", (0.45, 0.5, 0.55, 0.6, 0.65, 0.7))],
        "search_hi": [m("none", ()), m("planned/forecast:drift=1:search=1", (0.6, 0.7))],
        "search_worst": [m("none", ()),
                         m("planned/forecast:drift=1:search=worst_quarter:search_images=32", (0.6, 0.7))],
        "mag_low": [m("none", ()), m("diffusers_magcache:max_skip=3:retention=0.2", (0.01, 0.02))],
        "ours_cap": [m("none", ()), m("step_forecast/forecast:max_skip=2", (0.13, 0.2)),
                     m("step_forecast/forecast:max_skip=3", (0.13, 0.2))],
        # both defaults, the step rule with the noise forecast, search_plan with and without it, every peer
        "shifted": ours_now + peers_now[1:],
        "fifth": ours_now,
        "fifth_peers": peers_now,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-mnist")
    p.add_argument("--group", choices=sorted(groups()), default=None)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--shift", type=float, default=1.0, help="the sampler's schedule shift (1 = uniform; 3 = SD3's)")
    p.add_argument("--out", default="out/sweep")
    p.add_argument("--merge", nargs="*", default=None, help="merge these JSON results instead of running")
    p.add_argument("--stem", default=None)
    p.add_argument("--families", nargs="*", default=None, help="columns of the fraction table (default: all)")
    a = p.parse_args(argv)
    from fx_fastcache.bench import run_benchmark, write_all
    from fx_fastcache.bench.report import fraction_table, merge, write_json

    if a.merge:
        res = merge([json.loads(Path(f).read_text()) for f in a.merge])
        stem = a.stem or "merged"
        paths = write_all(res, a.out, stem)
        table = fraction_table(res, families=a.families)
        (Path(a.out) / f"{stem}-fractions.md").write_text(table)
        print(table)
        print("wrote", *paths.values(), Path(a.out) / f"{stem}-fractions.md")
        return 0
    if a.group is None:
        p.error("--group or --merge is required")
    torch.set_num_threads(1)
    tag = "" if a.shift == 1 else f"-shift{a.shift:g}"
    stem = f"{Path(a.model).name}{tag}-{a.group}"
    done = []

    def on_run(rec):
        done.append(rec)
        write_json({"setup": {"model": a.model, "partial": True}, "runs": done}, Path(a.out) / f"{stem}.partial.json")
        print(f"{rec['method']:<48} thr={rec.get('threshold')} replaced={100 * rec['replaced_fraction']:5.1f}% "
              f"PSNR {rec['psnr_mean']:6.2f} ({rec['psnr_worst']:6.2f}) state={rec.get('state_bytes')}", flush=True)

    Path(a.out).mkdir(parents=True, exist_ok=True)
    res = run_benchmark(a.model, groups()[a.group], n_images=a.images, timing_images=0, on_run=on_run, shift=a.shift,
                        reference_cache=str(Path(a.out) / f"{Path(a.model).name}{tag}-reference.pt"))
    write_json(res, Path(a.out) / f"{stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
