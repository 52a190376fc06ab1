"""step_forecast's calibrated scale: calibration replays the rule on the recorded probes and fits the
threshold scale so that the default threshold replaces about CALIBRATION_TARGET of the steps."""
from __future__ import annotations

import logging

import pytest
import torch

import fx_fastcache as fastcache
from fx_fastcache.policies.step_forecast import CALIBRATION_TARGET, REFERENCE_THRESHOLD, fit_scale, simulate
from fx_fastcache.zoo import make_tiny

from conftest import run_loop


def _probes(n=20, curve=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(2, 64, generator=g) for _ in range(3))
    ts = [1000.0 * (1 - i / n) for i in range(n)]
    return ts, [a + b * (t / 1000) + curve * c * (t / 1000) ** 4 for t in ts]


def test_simulate_computes_warmup_and_respects_the_cap():
    ts, us = _probes()
    assert simulate(us, ts, tau=0.0)[:3] == [0, 1, 2] and len(simulate(us, ts, tau=0.0)) == 20
    everything = simulate(us, ts, tau=1e9, warmup=2)
    assert everything == [0, 1]
    capped = simulate(us, ts, tau=1e9, warmup=2, max_skip=3)
    assert capped == [0, 1, 5, 9, 13, 17]


@pytest.mark.parametrize("curve", [0.1, 1.0])
def test_fit_scale_reaches_the_target_whatever_the_raw_scale(curve):
    ts, us = _probes(curve=curve)
    scale, frac = fit_scale([(ts, us)], warmup=2, max_skip=0)
    assert frac >= CALIBRATION_TARGET
    computed = simulate(us, ts, scale * REFERENCE_THRESHOLD)
    assert 1 - len(computed) / len(us) == pytest.approx(frac)
    # just below the fitted tau the target is not reached
    assert 1 - len(simulate(us, ts, 0.95 * scale * REFERENCE_THRESHOLD)) / len(us) < CALIBRATION_TARGET


def _generate(tm, fn, seeds):
    from fx_fastcache.trained import sample

    return sample(tm, [(s + 3) % 10 for s in seeds], seeds, steps=20, model=fn)


@pytest.mark.slow
def test_calibrated_default_replaces_about_the_target_on_a_trained_model(caplog):
    from fx_fastcache.trained import load_trained

    tm = load_trained("dit-mnist")
    opt = fastcache.optimize(tm.model, backend="eager", policy="step_forecast", fallback="forecast")
    with caplog.at_level(logging.INFO, logger="fx_fastcache"):
        raw = _generate(tm, opt, [0])
        raw_frac = fastcache.get_cache_statistics(opt)["block_approx_ratio"]
        with fastcache.calibrate(opt):
            _generate(tm, opt, [0])
    scale = float(opt.store.tensors["step_forecast.scale"])
    assert scale != 1.0 and "step_forecast scale" in caplog.text
    fastcache.reset(opt)
    img = _generate(tm, opt, [0])  # same seed: the replay saw exactly these probes (up to the cache's drift)
    frac = fastcache.get_cache_statistics(opt)["block_approx_ratio"]
    assert 0.45 <= frac <= 0.65, (frac, raw_frac, scale)
    ref = _generate(tm, None, [0])
    assert torch.isfinite(img).all() and (img - ref).abs().max() < 0.5
    del raw


def test_calibration_runs_too_short_for_the_target_fit_no_scale(caplog):
    """4-step calibration runs with warm-up 2 replace at most 50 %: the bisection ended at its upper
    bound, a scale that skipped 90 % of a 20-step generation (6 dB on dit-mnist), silently."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager")
    with caplog.at_level(logging.WARNING, logger="fx_fastcache"), fastcache.calibrate(opt):
        run_loop(opt, tm, timesteps=[1000.0, 750.0, 500.0, 250.0])
    assert float(opt.store.tensors["step_forecast.scale"]) == 1.0  # the uncalibrated scale
    assert any("scale not fitted" in r.getMessage() and "at most 50%" in r.getMessage() for r in caplog.records)


def test_teacache_says_when_its_rescaling_is_not_fitted(caplog):
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", policy="teacache")
    with caplog.at_level(logging.WARNING, logger="fx_fastcache"), fastcache.calibrate(opt):
        run_loop(opt, tm, timesteps=[1000.0, 750.0, 500.0, 250.0])
    assert any("teacache rescaling not fitted" in r.getMessage() for r in caplog.records)
