"""Bad inputs and faults, one test per class: each gets the right behaviour or an error naming the
value and the fix, and the model works afterwards (a new generation equals a fresh model's)."""
from __future__ import annotations

import copy
import logging
import pickle
import re
import threading

import pytest
import torch

import fx_fastcache as fastcache
from fx_fastcache.zoo import make_tiny

from conftest import TIMESTEPS, calibrated_file, first, run_loop

CFG = dict(backend="eager", cache_ratio_threshold=10.0, fallback="forecast")  # skips whatever it may


def _noise(tm, seed: int, t: float) -> dict:
    kw = tm.make_inputs(t, 2)
    kw["hidden_states"] = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
    return kw


def _generation(model, tm, seed: int, timesteps) -> list[torch.Tensor]:
    """A sampling loop whose latents drift a little per step, as a sampler's do."""
    outs = []
    with torch.no_grad():
        kw = _noise(tm, seed, timesteps[0])
        for t in timesteps:
            kw["timestep"] = torch.full_like(kw["timestep"], t)
            out = first(model(**kw)).clone()
            kw["hidden_states"] = kw["hidden_states"] - 0.05 * out[:, : kw["hidden_states"].shape[1]]
            outs.append(out)
    return outs


def _assert_works_like_a_fresh_model(opt, tm) -> None:
    fastcache.reset(opt)
    fresh = fastcache.optimize(tm.model, **CFG)
    for a, b in zip(_generation(opt, tm, 5, TIMESTEPS), _generation(fresh, tm, 5, TIMESTEPS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- new generations ---------------------------------------------------------------------------
def test_aborted_generation_then_one_at_a_lower_timestep_starts_fresh():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, **CFG)
    _generation(opt, tm, 1, [1000.0, 900.0, 800.0, 700.0, 600.0])  # the sampler dies here
    later = [500.0, 400.0, 300.0, 200.0, 100.0]
    got = _generation(opt, tm, 2, later)  # a new generation from fresh noise, timestep still going down
    fresh = fastcache.optimize(tm.model, **CFG)
    want = _generation(fresh, tm, 2, later)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] > 0  # it still approximates


def test_every_call_a_new_generation_warns_once(caplog):
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, **CFG)
    with caplog.at_level(logging.WARNING, logger="fx_fastcache"):
        run_loop(opt, tm, [100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0])  # timesteps going up
    warnings = [r for r in caplog.records if "started a new generation" in r.getMessage()]
    assert len(warnings) == 1 and "timesteps decrease" in warnings[0].getMessage()
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == 0
    _assert_works_like_a_fresh_model(opt, tm)


def test_nan_timestep_starts_a_new_generation():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, **CFG)
    run_loop(opt, tm, TIMESTEPS[:4])
    with torch.no_grad():
        opt(**tm.make_inputs(float("nan"), 2))
    (entry,) = opt.entries()
    assert float(entry.clock.step) == 0
    _assert_works_like_a_fresh_model(opt, tm)


# -- threads -------------------------------------------------------------------------------------
@pytest.mark.parametrize("execution", ["in_graph", "step_dispatch"])
def test_concurrent_first_calls_capture_once_and_both_succeed(execution):
    """Under step dispatch the call lock was skipped (the dispatcher was called directly)."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False, execution=execution,
                             **({"dispatch_compile": "eager"} if execution == "step_dispatch" else {}))
    owned = []  # whether the call lock is held while the dispatcher runs
    if execution == "step_dispatch":
        dispatcher = opt._dispatcher
        opt._dispatcher = lambda *a, **k: (owned.append(opt._call_lock._is_owned()), dispatcher(*a, **k))[1]
    kw = tm.make_inputs(1000.0, 2)
    results, errors = [], []
    barrier = threading.Barrier(2)

    def call():
        try:
            barrier.wait()
            with torch.no_grad():
                results.append(first(opt(**kw)))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert len(results) == 2 and len(opt.entries()) == 1
    assert owned == ([True, True] if execution == "step_dispatch" else [])
    with torch.no_grad():
        ref = first(tm.model(**kw))
    for r in results:
        torch.testing.assert_close(r, ref, rtol=0, atol=0)


# -- copies, pickles, state dicts ---------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_after_capture_works_and_starts_with_empty_cache(how):
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, **CFG)
    _generation(opt, tm, 1, TIMESTEPS)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert twin.entries() == [] and twin.model is not tm.model
    fresh = fastcache.optimize(copy.deepcopy(tm.model), **CFG)
    for a, b in zip(_generation(twin, tm, 5, TIMESTEPS), _generation(fresh, tm, 5, TIMESTEPS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _assert_works_like_a_fresh_model(opt, tm)  # the original is untouched


def test_state_dict_loads_strictly_into_the_original_model():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, **CFG)
    _generation(opt, tm, 1, TIMESTEPS[:3])
    sd = opt.state_dict()
    assert set(sd) == set(tm.model.state_dict())
    other = make_tiny("tiny-dit", seed=1).model
    other.load_state_dict(sd, strict=True)
    opt.load_state_dict(other.state_dict())  # and back: the graphs are dropped and re-captured
    assert opt.entries() == []
    _assert_works_like_a_fresh_model(opt, tm)


# -- gradients and torch modes --------------------------------------------------------------------
def test_inputs_that_require_grad_are_refused_by_name():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, **CFG)
    kw = tm.make_inputs(1000.0, 2)
    kw["hidden_states"].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"inputs hidden_states require grad.*torch.no_grad"):
        opt(**kw)
    _assert_works_like_a_fresh_model(opt, tm)


def test_grad_mode_without_grad_inputs_warns_once(caplog):
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, **CFG)
    with caplog.at_level(logging.WARNING, logger="fx_fastcache"):
        outs = [first(opt(**tm.make_inputs(t, 2))) for t in TIMESTEPS[:2]]  # grad mode on
    assert not any(o.requires_grad for o in outs)
    assert sum("inference-only" in r.getMessage() for r in caplog.records) == 1


def test_first_call_in_inference_mode_then_normal_calls():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, **CFG)
    with torch.inference_mode():
        a = first(opt(**tm.make_inputs(TIMESTEPS[0], 2))).clone()
    with torch.no_grad():
        b = [first(opt(**tm.make_inputs(t, 2))) for t in TIMESTEPS[1:]]
    assert torch.isfinite(a).all() and all(torch.isfinite(x).all() for x in b)
    with torch.inference_mode():  # and back
        first(opt(**tm.make_inputs(TIMESTEPS[0], 2)))
    _assert_works_like_a_fresh_model(opt, tm)


def test_planned_model_calibrated_and_loaded_in_inference_mode_works_outside_it(tmp_path):
    """Store tensors made in inference mode could not be updated in place outside it (a new plan, a file)."""
    tm = make_tiny("tiny-dit")
    planned = dict(backend="eager", policy="planned", target_fraction=0.5)
    opt = fastcache.optimize(tm.model, **planned)
    with torch.inference_mode(), fastcache.calibrate(opt):
        _generation(opt, tm, 1, TIMESTEPS)
    fastcache.configure(opt, target_fraction=0.3)
    grad_in_search = []

    def generate():
        grad_in_search.append(torch.is_grad_enabled())
        return _generation(opt, tm, 2, TIMESTEPS)[-1]

    with torch.no_grad():
        fastcache.search_plan(opt, generate, fractions=[0.3], max_runs=2)
    assert grad_in_search and not any(grad_in_search)  # search_plan keeps the caller's grad mode
    path = tmp_path / "calib.safetensors"
    fastcache.save_calibration(opt, path)
    fastcache.load_calibration(opt, path)
    fresh = fastcache.optimize(tm.model, **planned)
    with torch.inference_mode():
        fastcache.load_calibration(fresh, path)
        fastcache.configure(fresh, target_fraction=0.3)  # the searched plan
    fastcache.reset(opt)
    for a, b in zip(_generation(opt, tm, 5, TIMESTEPS), _generation(fresh, tm, 5, TIMESTEPS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fastcache.get_cache_statistics(fresh)["block_approx_ratio"] > 0


# -- files -----------------------------------------------------------------------------------------
def test_calibration_file_for_another_fitted_fallback_is_refused(tmp_path):
    tm = make_tiny("tiny-custom")
    _, path = calibrated_file(tm, tmp_path / "calib.safetensors", fallback="residual_linear", policy="schedule")
    other = fastcache.optimize(tm.model, backend="eager", fallback="linear", policy="schedule")
    with pytest.raises(ValueError, match=r"calib.safetensors.*fallback='residual_linear'.*fallback='linear'"):
        fastcache.load_calibration(other, path)
    assert not other.store.calibrated


@pytest.mark.parametrize("fitted, other, says", [
    (dict(fallback="residual_linear", policy="step_forecast"), dict(fallback="linear"), "needs its own fit"),
    (dict(fallback="forecast", policy="planned"), dict(fallback="residual"), "needs its own plan"),
    (dict(fallback="forecast", policy="planned"), dict(policy="step_forecast"), "needs its own fit"),
], ids=["fitted-fallback", "planned-fallback", "calibrated-policy"])
def test_configure_away_from_what_the_calibration_fitted_is_refused(tmp_path, fitted, other, says):
    """configure() used to keep fits or a plan made for another fallback or policy, silently (and a file saved
    then claimed them for the new one); it refuses, like load_calibration, and changes nothing."""
    tm = make_tiny("tiny-custom")
    opt, path = calibrated_file(tm, tmp_path / "calib.safetensors", cache_ratio_threshold=10.0, **fitted)
    for model in (opt, fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=10.0, **fitted)):
        if model is not opt:
            fastcache.load_calibration(model, path)  # what a file was fitted for counts the same
        before = [first(x) for x in run_loop(model, tm)]
        with pytest.raises(ValueError, match=rf"configure\({list(other)[0]}=.*{says}.*optimize the model with"):
            fastcache.configure(model, **other)
        assert model.fastcache_config.replace(**fitted) == model.fastcache_config  # unchanged
        fastcache.reset(model)
        for a, b in zip(run_loop(model, tm), before):
            torch.testing.assert_close(first(a), b, rtol=0, atol=0)
    fastcache.configure(fastcache.optimize(tm.model, backend="eager", **fitted), **other)  # uncalibrated: fine


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all"])
def test_damaged_calibration_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    opt = fastcache.optimize(make_tiny("tiny-custom").model, backend="eager")
    with pytest.raises(ValueError, match="broken.safetensors"):
        fastcache.load_calibration(opt, path)


def test_calibration_saved_where_no_file_can_be_written_names_the_path(tmp_path):
    opt, _ = calibrated_file(make_tiny("tiny-custom"), tmp_path / "calib.safetensors")
    with pytest.raises(IsADirectoryError, match=re.escape(f"{str(tmp_path)!r} is a folder; give a file path")):
        fastcache.save_calibration(opt, tmp_path)
    missing = tmp_path / "missing" / "c.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(f"its folder {str(missing.parent)!r} does not exist")):
        fastcache.save_calibration(opt, missing)


def test_calibration_file_of_the_same_model_in_another_dtype_says_how_to_load_it(tmp_path):
    tm = make_tiny("tiny-custom")
    _, path = calibrated_file(tm, tmp_path / "calib.safetensors", fallback="residual_linear")
    cast = fastcache.optimize(copy.deepcopy(tm.model).double(), backend="eager", fallback="residual_linear")
    with pytest.raises(ValueError, match=r"in torch.float32; this model is in torch.float64.*Load the file before "
                                         r"casting"):
        fastcache.load_calibration(cast, path)
    opt = fastcache.optimize(copy.deepcopy(tm.model), backend="eager", fallback="residual_linear")
    fastcache.load_calibration(opt, path)  # what the message advises
    opt.to(torch.float64)
    assert opt.store.calibrated
    # the fallback's weights follow the model's dtype, the policy's fit stays float32
    assert {k: t.dtype for k, t in opt.store.tensors.items() if t.is_floating_point()} == \
        {k: torch.float64 if "residual_linear" in k else torch.float32 for k, t in opt.store.tensors.items()
         if t.is_floating_point()}


def test_damaged_onnx_file_names_the_file(tmp_path):
    from fx_fastcache.export.onnx import read_metadata

    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ValueError, match="model.onnx"):
        read_metadata(path)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        read_metadata(tmp_path / "missing.onnx")
