"""Run-time controls on an optimized model: ``opt.to``, structural ``configure``, ``max_skip_steps``,
the device check of the inputs and the calibration file's shape check."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fx_fastcache as fastcache
from fx_fastcache.zoo import make_tiny

from conftest import TIMESTEPS, calibrated_file, first, run_loop


def _approximated_per_block(opt) -> list[int]:
    return [b["approximated"] for b in fastcache.get_cache_statistics(opt)["per_block"]]


def test_to_dtype_recaptures_and_matches_the_converted_model():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    run_loop(opt, tm, TIMESTEPS[:2])
    assert fastcache.get_cache_statistics(opt)["graphs"] == 1
    opt.to(torch.float64)
    assert fastcache.get_cache_statistics(opt)["graphs"] == 0  # the float32 graph is gone
    assert opt.dtype == torch.float64
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            kw = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in tm.make_inputs(t, 2).items()}
            torch.testing.assert_close(first(opt(**kw)), first(tm.model(**kw)), rtol=0, atol=0)
    assert fastcache.get_cache_statistics(opt)["graphs"] == 1


def test_to_where_the_model_is_keeps_its_graphs_and_moving_back_and_forth_warns_once(caplog):
    """accelerate's offload hooks call ``.to(device)`` at every forward: a no-op move used to drop the graphs
    (a re-capture per call); a real move still re-captures, and a second one after capture says what it costs."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    run_loop(opt, tm, TIMESTEPS[:2])
    (entry,) = opt.entries()
    opt.to("cpu")
    opt.float()
    assert opt.entries() == [entry]
    with caplog.at_level(logging.WARNING, logger="fx_fastcache"):
        for dtype in (torch.float64, torch.float32, torch.float64):
            opt.to(dtype)
            assert opt.entries() == []
            kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in tm.make_inputs(TIMESTEPS[0], 2).items()}
            with torch.no_grad():
                torch.testing.assert_close(first(opt(**kw)), first(tm.model(**kw)), rtol=0, atol=0)
    moved = [r for r in caplog.records if "moved to another device or dtype" in r.getMessage()]
    assert len(moved) == 1


def test_structural_configure_recaptures_with_the_new_fallback():
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", fallback="forecast", cache_ratio_threshold=10.0)
    run_loop(opt, tm)
    (entry,) = opt.entries()
    assert type(entry.guards[0].fallback).__name__ == "ForecastFallback"
    fastcache.configure(opt, fallback="residual")
    assert opt.entries() == []  # re-captured at the next call
    run_loop(opt, tm)
    (entry,) = opt.entries()
    assert type(entry.guards[0].fallback).__name__ == "ResidualFallback"
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] > 0
    fastcache.configure(opt, enable_block_approx=False)  # a run-time field: same graph
    assert opt.entries() == [entry]
    fastcache.reset(opt)
    ref = run_loop(tm.model, tm)
    for a, b in zip(run_loop(opt, tm), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("max_skip,expected", [(0, 4), (1, 2), (2, 3)])
def test_max_skip_steps_bounds_consecutive_skips(max_skip, expected):
    """6 steps, warm-up 2, a threshold that skips whatever it may: steps 2-5 skip unless capped."""
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", fallback="residual", cache_ratio_threshold=10.0,
                             max_skip_steps=max_skip)
    run_loop(opt, tm)
    assert _approximated_per_block(opt) == [expected] * 3


def test_input_on_another_device_is_an_error_naming_both():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager")
    kw = tm.make_inputs(1000.0, 2)
    kw["hidden_states"] = kw["hidden_states"].to("meta")
    with pytest.raises(ValueError, match=r"'hidden_states' is on meta but the model is on cpu"):
        opt(**kw)
    run_loop(opt, tm, TIMESTEPS[:2])  # the model still works


def test_calibration_file_with_a_wrong_shape_is_refused_and_changes_nothing(tmp_path):
    tm = make_tiny("tiny-custom")
    opt, path = calibrated_file(tm, tmp_path / "calib.safetensors", fallback="residual_linear", policy="schedule")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    victim = sorted(k for k in tensors if k.endswith(".A"))[-1]
    tensors[victim] = tensors[victim][:-1]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    before = {k: v.clone() for k, v in opt.store.tensors.items()}
    with pytest.raises(ValueError, match=rf"bad.safetensors.*{victim}.*has shape"):
        fastcache.load_calibration(opt, bad)
    for k, v in before.items():  # nothing was half-loaded
        torch.testing.assert_close(opt.store.tensors[k], v, rtol=0, atol=0)
    fastcache.load_calibration(opt, path)  # the good file still loads
