"""Calibration fits reduce the fallback's error; save/load round trips; wrong model fails."""
from __future__ import annotations

import logging

import pytest
import torch

import fx_fastcache as fastcache
from fx_fastcache.fallbacks.linear import store_keys as linear_keys
from fx_fastcache.policies.chi2 import store_keys as chi2_keys
from fx_fastcache.zoo import make_tiny

from conftest import first

TS = [1000.0, 950.0, 900.0, 850.0, 800.0, 750.0, 700.0, 650.0]


def _drift_inputs(tm, t: float, batch: int = 2) -> dict:
    """Inputs whose hidden state drifts smoothly with t (like a sampler trajectory)."""
    kw = tm.make_inputs(t, batch)
    g = torch.Generator().manual_seed(7)
    d = torch.randn(kw["x"].shape, generator=g)
    kw["x"] = kw["x"] + (1000.0 - t) / 200.0 * d
    return kw


def _calibrated(fallback: str, tm):
    opt = fastcache.optimize(tm.model, backend="eager", fallback=fallback, policy="schedule", warmup_steps=0)
    with fastcache.calibrate(opt):
        with torch.no_grad():
            for t in TS:
                opt(**_drift_inputs(tm, t))
    return opt


def _skip_last_block_every_other_step(opt, n_blocks: int) -> None:
    table = torch.zeros(len(TS), n_blocks, dtype=torch.bool)
    table[1::2, -1] = True
    fastcache.set_schedule(opt, table)


def _error_vs_full(opt, tm) -> float:
    err = 0.0
    fastcache.reset(opt)
    with torch.no_grad():
        for t in TS:
            kw = _drift_inputs(tm, t)
            err += float((first(opt(**kw)) - first(tm.model(**kw))).pow(2).sum())
    return err


def test_fitted_linear_correction_reduces_fallback_error():
    tm = make_tiny("tiny-custom")
    lin = _calibrated("residual_linear", tm)
    plain = fastcache.optimize(tm.model, backend="eager", fallback="residual", policy="schedule", warmup_steps=0)
    for opt in (lin, plain):
        _skip_last_block_every_other_step(opt, 3)
    e_lin, e_plain = _error_vs_full(lin, tm), _error_vs_full(plain, tm)
    assert fastcache.get_cache_statistics(lin)["blocks_approximated"] == 4
    assert e_lin < 0.5 * e_plain, (e_lin, e_plain)
    assert lin.store.calibrated and not plain.store.calibrated


def test_paper_linear_map_is_fitted():
    tm = make_tiny("tiny-custom")
    opt = _calibrated("linear", tm)
    w = [opt.store.tensors[linear_keys(b, opt.spec.stream_arg)[0]] for b in opt.block_names()]
    assert len(w) == 3 and not torch.allclose(w[0], torch.eye(w[0].shape[0]))


def test_save_load_round_trip_restores_identical_outputs(tmp_path):
    tm = make_tiny("tiny-custom")
    opt = _calibrated("residual_linear", tm)
    _skip_last_block_every_other_step(opt, 3)
    path = tmp_path / "calib.safetensors"
    fastcache.save_calibration(opt, path)
    fastcache.reset(opt)
    with torch.no_grad():
        ref = [first(opt(**_drift_inputs(tm, t))) for t in TS]

    fresh = fastcache.optimize(tm.model, backend="eager", fallback="residual_linear", policy="schedule",
                               warmup_steps=0)
    fastcache.load_calibration(fresh, path)
    _skip_last_block_every_other_step(fresh, 3)
    with torch.no_grad():
        out = [first(fresh(**_drift_inputs(tm, t))) for t in TS]
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_loading_onto_a_different_model_fails_clearly(tmp_path):
    tm = make_tiny("tiny-custom")
    opt = _calibrated("residual_linear", tm)
    path = tmp_path / "calib.safetensors"
    fastcache.save_calibration(opt, path)
    other = fastcache.optimize(make_tiny("tiny-custom", seed=1).model, backend="eager", fallback="residual_linear")
    with pytest.raises(ValueError, match="fitted on another model"):
        fastcache.load_calibration(other, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastcache.load_calibration(other, tmp_path / "missing.safetensors")


def test_chi2_calibration_sets_per_block_scales_and_dof():
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", policy="chi2", fallback="residual")
    with fastcache.calibrate(opt):
        with torch.no_grad():
            for t in TS:
                opt(**_drift_inputs(tm, t))
    scales = [float(opt.store.tensors[chi2_keys(b)[0]]) for b in opt.block_names()]
    dofs = [float(opt.store.tensors[chi2_keys(b)[1]]) for b in opt.block_names()]
    assert len(scales) == 3 and abs(sum(scales) / 3 - 1.0) < 1e-5 and len(set(scales)) == 3
    assert all(1.0 <= d < 10 * 16 for d in dofs)  # far below N·D: tokens are correlated
    taus = [float(g.decider.tau) for g in opt.entries()[0].guards]
    assert len(set(round(t, 6) for t in taus)) == 3  # blocks decide with their own bound


def test_uncalibrated_use_logs_once(caplog):
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", fallback="residual_linear")
    with caplog.at_level(logging.WARNING, logger="fx_fastcache"):
        with torch.no_grad():
            opt(**tm.make_inputs(1000.0, 2))
            opt(**tm.make_inputs(1000.0, 3))  # a second capture does not repeat it
    msgs = [r for r in caplog.records if "uncalibrated" in r.getMessage()]
    assert len(msgs) == 1 and "calibrate" in msgs[0].getMessage()
    caplog.clear()
    fresh = fastcache.optimize(tm.model, backend="eager", fallback="residual_linear")
    with caplog.at_level(logging.WARNING, logger="fx_fastcache"), fastcache.calibrate(fresh), torch.no_grad():
        fresh(**tm.make_inputs(1000.0, 2))  # captured inside calibrate: not advice to calibrate
    assert not [r for r in caplog.records if "uncalibrated" in r.getMessage()]


def test_calibrate_without_calls_is_an_error():
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager")
    with pytest.raises(RuntimeError, match="not called"):
        with fastcache.calibrate(opt):
            pass


def _bf16_inputs(tm, t):
    return {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in tm.make_inputs(t, 2).items()}


def test_policy_fits_stay_float32_in_a_bfloat16_model(tmp_path):
    """A policy's fit (TeaCache's polynomial, coefficients near 5e4) is float32 whatever the model's dtype.
    Loaded into a bfloat16 model not yet called, or kept through ``opt.to(torch.bfloat16)``, it was rounded
    to bfloat16 (the polynomial moved by up to 17 %): the same file gave other decisions depending on whether
    the model had been called before the load.  A fitted fallback's weights follow the model's dtype."""
    timesteps = [1000.0 - 50 * i for i in range(12)]
    tm = make_tiny("tiny-dit")
    tm.model.to(torch.bfloat16)
    cfg = dict(backend="eager", policy="teacache", fallback="residual_linear", cache_ratio_threshold=0.1)
    opt = fastcache.optimize(tm.model, **cfg)
    with torch.no_grad(), fastcache.calibrate(opt):
        for _ in range(2):
            for t in timesteps:
                opt(**_bf16_inputs(tm, t))
    fastcache.save_calibration(opt, tmp_path / "c.safetensors")
    saved = opt.store.tensors["teacache.coeffs"].clone()
    assert saved.dtype == torch.float32
    outs = []
    for called_before in (True, False):
        fresh = fastcache.optimize(make_tiny("tiny-dit").model.to(torch.bfloat16), **cfg)
        with torch.no_grad():
            if called_before:
                fresh(**_bf16_inputs(tm, 1000.0))
                fastcache.reset(fresh)
            fastcache.load_calibration(fresh, tmp_path / "c.safetensors")
            outs.append([first(fresh(**_bf16_inputs(tm, t))) for t in timesteps])
        assert torch.equal(fresh.store.tensors["teacache.coeffs"], saved)
        assert all(v.dtype == torch.bfloat16 for k, v in fresh.store.tensors.items() if "residual_linear" in k)
    assert all(torch.equal(a, b) for a, b in zip(*outs))

    opt32 = fastcache.optimize(make_tiny("tiny-dit").model, **cfg)  # fitted in float32, then moved
    tm32 = make_tiny("tiny-dit")
    with torch.no_grad(), fastcache.calibrate(opt32):
        for _ in range(2):
            for t in timesteps:
                opt32(**tm32.make_inputs(t, 2))
    coeffs = opt32.store.tensors["teacache.coeffs"].clone()
    opt32.to(torch.bfloat16)
    assert torch.equal(opt32.store.tensors["teacache.coeffs"], coeffs)
    assert all(v.dtype == torch.bfloat16 for k, v in opt32.store.tensors.items() if "residual_linear" in k)
    with torch.no_grad():
        assert torch.isfinite(first(opt32(**_bf16_inputs(tm32, 1000.0)))).all()
