"""Noise forecast (``noise_forecast="flow_euler"``): a skipped step's output equals a hand computation of the
velocity of the predicted noise extrapolated in σ, on families whose timestep is σ·1000 and σ; computed
steps, decisions and counts are untouched; it combines with the drift correction (which then corrects the
forecast velocities), resets with the generation, runs through step dispatch and inductor, keeps one state
per cache context and refuses what it cannot do."""
from __future__ import annotations

import pytest
import torch
from conftest import run_loop

import fx_fastcache as fastcache
from fx_fastcache.bench.report import family
from fx_fastcache.bench.runner import parse_method
from fx_fastcache.runtime.drift import DriftCorrection
from fx_fastcache.zoo import make_tiny

from test_drift import COMPUTED, STEPS, _scheduled  # computed 0, 1, 4, 7: steps 2, 3 and 5, 6 forecast

# (new generations, reset and step dispatch: tests/test_drift.py runs them with both output stages on)


def _hand(tm, v: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each step's output: the model's at a computed step; at a skipped one ``(ε̂ − x) / (1 − σ)`` with
    ``ε = x + (1 − σ) v`` of the last two computed steps extrapolated linearly in σ."""
    sig = [t / 1000.0 for t in STEPS]
    kw = tm.make_inputs(STEPS[0], 2)
    x = kw.get("hidden_states", kw.get("x")).float()  # the tiny models' latents stay put
    eps, out = {}, []
    for s in range(len(STEPS)):
        if s in COMPUTED:
            eps[s] = x + (1 - sig[s]) * v[s]
            out.append(v[s])
            continue
        p, c = [k for k in COMPUTED if k < s][-2:]
        e = eps[c] + (sig[s] - sig[c]) / (sig[c] - sig[p]) * (eps[c] - eps[p])
        out.append((e - x) / (1 - sig[s]))
    return out


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux", "tiny-wan"])
def runs(request):
    """The uncached outputs (every step computed) and the noise forecast's, on a model whose timestep is
    σ·1000 (SD3, Wan: 4-d and 5-d latents) or σ (Flux: packed tokens)."""
    tm = make_tiny(request.param)
    plain = fastcache.optimize(tm.model, backend="eager", policy="schedule", fallback="forecast")
    fastcache.set_schedule(plain, torch.zeros(len(STEPS), len(plain.block_names()), dtype=torch.bool))
    opt = _scheduled(tm, noise_forecast="flow_euler")
    return tm, run_loop(plain, tm, STEPS), run_loop(opt, tm, STEPS), opt


def test_skipped_steps_match_hand_computation(runs):
    tm, plain, got, opt = runs
    want = _hand(tm, plain)
    for s in range(len(STEPS)):
        tol = 0 if s in COMPUTED else 1e-4
        torch.testing.assert_close(got[s], want[s], rtol=tol, atol=tol)
    assert not torch.allclose(got[3], run_loop(_scheduled(tm), tm, STEPS)[3], rtol=1e-3, atol=1e-3)  # not a no-op
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == \
        (len(STEPS) - len(COMPUTED)) * len(opt.block_names())


def test_drift_correction_corrects_the_forecast_velocities():
    """With both, skipped steps keep the noise forecast's velocity and computed steps are the drift correction
    of that sequence (the correction's own module, fed step by step)."""
    tm = make_tiny("tiny-sd3")
    noise = run_loop(_scheduled(tm, noise_forecast="flow_euler"), tm, STEPS)
    both = run_loop(_scheduled(tm, noise_forecast="flow_euler", drift_correction="flow_euler"), tm, STEPS)
    drift = DriftCorrection(tuple(noise[0].shape), torch.device("cpu"), torch.zeros(()))
    for s, t in enumerate(STEPS):
        want = drift(torch.tensor(s not in COMPUTED), torch.tensor(s == 0), torch.tensor(t), noise[s])
        torch.testing.assert_close(both[s], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[4], noise[4], rtol=1e-3, atol=1e-3)


def test_inductor_compiles_it_with_the_drift_correction_and_matches_eager():
    tm = make_tiny("tiny-sd3", layers=1)  # one block: a shorter inductor compile
    kw = dict(policy="step_forecast", fallback="forecast", cache_ratio_threshold=0.5, noise_forecast="flow_euler",
              drift_correction="flow_euler")
    eager = fastcache.optimize(tm.model, backend="eager", **kw)
    compiled = fastcache.optimize(tm.model, backend="inductor", **kw)
    for a, b in zip(run_loop(eager, tm), run_loop(compiled, tm)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert fastcache.get_cache_statistics(compiled)["blocks_approximated"] > 0


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"noise_forecast='eps' is invalid: choose one of \('none', 'flow_euler'\)"):
        fastcache.FastCacheConfig(noise_forecast="eps")
    with pytest.raises(ValueError, match="policy='chi2' decides per block"):
        fastcache.FastCacheConfig(policy="chi2", noise_forecast="flow_euler")
    with pytest.raises(ValueError, match=r"timestep_per_sigma=-1.0 is invalid: expected a finite number >= 0"):
        fastcache.FastCacheConfig(timestep_per_sigma=-1)
    for name, why in (("tiny-dit", r"first output \(2, 8, 8, 8\) is not a velocity of its latents' shape \(2, 4, 8, 8\)"),
                      ("tiny-z-image", "latents or its first output is not one tensor"),
                      ("tiny-custom", r"does not know the timestep CustomDiT gets at σ = 1 .*timestep_per_sigma=")):
        tm = make_tiny(name)
        opt = fastcache.optimize(tm.model, backend="eager", noise_forecast="flow_euler")
        with pytest.raises(ValueError, match=why):
            opt(**tm.make_inputs(STEPS[0], 2))
    from fx_fastcache.export import installed_schedule
    from fx_fastcache.export.onnx import stateless_module

    tm = make_tiny("tiny-sd3")
    opt = _scheduled(tm, noise_forecast="flow_euler")
    with pytest.raises(ValueError, match="noise_forecast='flow_euler' is not supported by export"):
        stateless_module(opt, installed_schedule(opt, steps=len(STEPS)), tm.make_inputs(STEPS[0], 2))


def test_a_model_of_no_family_runs_with_its_timestep_scale():
    """A custom model's family declares no timestep at σ = 1: given in the config, σ = t / it (here the
    custom model's timestep is σ·1000, as the SD3 hand computation's)."""
    tm = make_tiny("tiny-custom")
    got = run_loop(_scheduled(tm, noise_forecast="flow_euler", timestep_per_sigma=1000.0), tm, STEPS)
    plain = run_loop(_scheduled(tm, noise_forecast="flow_euler", timestep_per_sigma=1000.0, enable_block_approx=False),
                     tm, STEPS)
    want = _hand(tm, plain)
    for s in range(len(STEPS)):
        torch.testing.assert_close(got[s], want[s], rtol=1e-4, atol=1e-4)


def test_pipelines_flow_matching_only_and_one_state_per_cache_context():
    import numpy as np

    from fx_fastcache.tiny_pipelines import make_tiny_pipeline

    tp = make_tiny_pipeline("pixart")
    with pytest.raises(ValueError, match="uses DPMSolverMultistepScheduler, which is not a flow-matching scheduler"):
        fastcache.enable_fastcache(tp.pipe, backend="eager", noise_forecast="flow_euler")
    tp = make_tiny_pipeline("flux")
    kw = tp.call_kwargs(seed=0, num_inference_steps=4, negative_prompt="blurry", true_cfg_scale=2.0)
    images = {}
    for nf in ("none", "flow_euler"):
        tr = fastcache.enable_fastcache(tp.pipe, backend="eager", policy="schedule", noise_forecast=nf)
        rows = torch.tensor([False, False, True, False])  # step 2 forecast
        fastcache.set_schedule(tp.pipe, rows.unsqueeze(1).expand(4, len(tr.block_names())).contiguous())
        images[nf] = torch.as_tensor(np.asarray(tp.pipe(**kw).images))
        if nf == "flow_euler":
            eps = [state[key]["fastcache_noise.eps_c"] for state in tr.contexts().values() for key in state]
            assert len(eps) == 2 and not torch.equal(eps[0], eps[1])  # cond and uncond keep their own
        fastcache.disable_fastcache(tp.pipe)
    assert not torch.allclose(images["none"], images["flow_euler"])


def test_bench_option():
    m = parse_method("planned/forecast:drift=1:noise=1")
    assert (m.drift, m.noise) == (True, True) and "(drift)(noise)" in m.name
    assert not parse_method("planned/forecast").noise
    with pytest.raises(ValueError, match="noise=2.*noise forecast"):
        parse_method("planned/forecast:noise=2")
    with pytest.raises(ValueError, match="at threshold.*noise_forecast"):
        parse_method("chi2/forecast:noise=1")
    run = {"kind": "fastcache", "policy": "planned", "fallback": "forecast", "drift_correction": True,
           "noise_forecast": True, "searched_plan": [0, 1, 3]}
    assert family(run) == "ours planned+forecast + drift + noise + search"  # a column of its own


def test_search_plan_chooses_it_per_fraction(tmp_path, caplog):
    """search_plan searches each fraction with the noise forecast and without it, keeps the better on its own
    score, installs the choice per budget (switched off, the graph gives the images of a model without the
    forecast) and saves it with the plans."""
    import logging
    import re

    from test_planned import _euler

    from fx_fastcache.policies.planned import NOISE_CHOICES_KEY
    from fx_fastcache.runtime.noise_forecast import ENABLED_KEY

    tm = make_tiny("tiny-sd3")
    kw = dict(backend="eager", policy="planned", target_fraction=0.5, drift_correction="flow_euler")
    opt = fastcache.optimize(tm.model, noise_forecast="flow_euler", **kw)
    with fastcache.calibrate(opt):
        for seed in (1, 2):
            _euler(opt, tm, seed=seed)
    with caplog.at_level(logging.INFO, logger="fx_fastcache"):
        got = fastcache.search_plan(opt, lambda: _euler(opt, tm, seed=3), data_range=2.0, max_runs=4)
    scores = {on: float(s) for on, s in re.findall(r"noise forecast (on|off):.*score (-?[\d.]+)", caplog.text)}
    assert set(scores) == {"on", "off"}, caplog.text
    choice = float(opt.store.tensors[NOISE_CHOICES_KEY][len(got[0.5]) - 1])
    assert float(opt.store.tensors[ENABLED_KEY]) == choice == float(scores["on"] >= scores["off"])

    # switched off, the graph is the fallback's: the outputs of a model without it, on the same schedule
    off, plain = _scheduled(tm, noise_forecast="flow_euler", drift_correction="flow_euler"), \
        _scheduled(tm, drift_correction="flow_euler")
    run_loop(off, tm, STEPS[:1])  # captured: the switch is in its store
    fastcache.reset(off)
    off.store.tensors[ENABLED_KEY].fill_(0.0)
    for a, b in zip(run_loop(off, tm, STEPS), run_loop(plain, tm, STEPS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    off.store.tensors[ENABLED_KEY].fill_(1.0)
    assert not torch.allclose(run_loop(off, tm, STEPS)[3], run_loop(plain, tm, STEPS)[3])

    fastcache.configure(opt, target_fraction=0.25)  # a budget not searched: the forecast on
    assert float(opt.store.tensors[ENABLED_KEY]) == 1.0
    path = tmp_path / "noise.safetensors"
    fastcache.configure(opt, target_fraction=0.5)
    fastcache.save_calibration(opt, path)
    other = fastcache.optimize(tm.model, noise_forecast="flow_euler", **kw)
    fastcache.load_calibration(other, path)
    assert float(other.store.tensors[ENABLED_KEY]) == choice
    torch.testing.assert_close(_euler(other, tm, seed=3), _euler(opt, tm, seed=3), rtol=0, atol=0)
