"""Drift correction (``drift_correction="flow_euler"``): the output of a computed step after forecast
steps equals a hand computation of the interpolation correction on every family; forecast steps,
block states and statistics are untouched; it resets with the generation, runs through step dispatch
and refuses what it cannot do."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import first, run_loop

import fx_fastcache as fastcache
from fx_fastcache.calibration import store_put
from fx_fastcache.runtime.drift import DAMPING_KEY
from fx_fastcache.step_dispatch import StepDispatch
from fx_fastcache.zoo import make_tiny

STEPS = [1000.0, 900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0]
COMPUTED = (0, 1, 4, 7)  # steps 2, 3 forecast, 4 computes (and is corrected); 5, 6 forecast, 7 corrected


class NoTimestep(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    def forward(self, x):
        return self.blocks[1](self.blocks[0](x))


def _scheduled(tm, **config):
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", fallback="forecast", **config)
    n = len(opt.block_names())
    rows = torch.tensor([s not in COMPUTED for s in range(len(STEPS))])
    fastcache.set_schedule(opt, rows.unsqueeze(1).expand(len(STEPS), n).contiguous())
    return opt


def _hand(v: list[torch.Tensor], t: list[float], c: int, c2: int, beta: float) -> torch.Tensor:
    """The output of computed step ``c2`` after forecast steps ``c+1 .. c2-1``:
    v(c2) + σ(c2+1)/Δσ(c2) · D with D = Σ_k Δσ_k/σ_{k+1} · (v_i(k) − v_f(k)), v_i interpolated between
    v(c) and v(c2) + β D (β = 1: the velocity at the corrected latent).  D is found by fixed-point
    iteration (the library solves the linear equation in closed form)."""
    t_next = t[c2] + (t[c2] - t[c2 - 1])  # the next step, taken as long as the previous one
    total = torch.zeros_like(v[c2])
    for _ in range(60):
        new = torch.zeros_like(v[c2])
        for k in range(c + 1, c2):
            v_i = v[c] + (t[k] - t[c]) / (t[c2] - t[c]) * (v[c2] + beta * total - v[c])
            new = new + (t[k + 1] - t[k]) / t[k + 1] * (v_i - v[k])
        total = new
    return v[c2] + t_next / (t_next - t[c2]) * total


def test_corrected_steps_match_hand_computation(tiny):
    ref, opt = _scheduled(tiny), _scheduled(tiny, drift_correction="flow_euler")
    a = run_loop(ref, tiny, STEPS)
    for beta in (0.0, 1.5):  # one capture serves both dampings: a buffer write, then a fresh generation
        store_put(opt.store, DAMPING_KEY, torch.tensor(beta))  # what search_plan fits (0 until then); in place
        fastcache.reset(opt)
        b = run_loop(opt, tiny, STEPS)
        assert float(opt.store.tensors[DAMPING_KEY]) == beta  # the graph read it, and reset kept it
        for s in range(len(STEPS)):
            if s in (4, 7):  # each run of forecast steps is taken back once, from the computed step before it
                torch.testing.assert_close(b[s], _hand(a, STEPS, 1 if s == 4 else 4, s, beta), rtol=1e-4, atol=1e-4)
                if beta:  # on a falling schedule a positive damping shrinks the correction
                    plain = _hand(a, STEPS, 1 if s == 4 else 4, s, 0.0) - a[s]
                    assert float((b[s] - a[s]).norm()) < 0.99 * float(plain.norm())
                assert not torch.allclose(b[s], a[s], rtol=1e-3, atol=1e-3)  # the correction is not a no-op
            else:  # computed steps with nothing forecast before them, and forecast steps, are unchanged
                torch.testing.assert_close(b[s], a[s], rtol=0, atol=0)
        assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == \
            fastcache.get_cache_statistics(ref)["blocks_approximated"]


#: The output stages the generic tests run: the drift correction alone, and with the noise forecast before it
#: (tests/test_noise_forecast.py), on a model whose output is a velocity of the latents' shape.
STAGES = [("tiny-dit", dict(drift_correction="flow_euler")),
          ("tiny-sd3", dict(drift_correction="flow_euler", noise_forecast="flow_euler"))]


@pytest.mark.parametrize("name,stages", STAGES, ids=["drift", "drift+noise"])
def test_new_generation_and_reset_start_fresh(name, stages):
    tm = make_tiny(name)
    opt = _scheduled(tm, **stages)
    a = run_loop(opt, tm, STEPS)
    b = run_loop(opt, tm, STEPS)  # the timestep jumps back up: a new generation
    fastcache.reset(opt)
    c = run_loop(opt, tm, STEPS)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(x, z, rtol=0, atol=0)


@pytest.mark.parametrize("name,stages", STAGES, ids=["drift", "drift+noise"])
@pytest.mark.parametrize("decide", ["host", "device"])
def test_step_dispatch_matches_in_graph_guards(decide, name, stages):
    """Specialised copies pass the decision as a plain bool: same outputs as the in-graph cond."""
    tm = make_tiny(name)
    if decide == "host":
        ref, opt = (_scheduled(tm, **stages) for _ in range(2))
    else:  # a step policy decided in the graph; a low threshold forecasts most steps after warm-up
        ref, opt = (fastcache.optimize(tm.model, backend="eager", policy="step_forecast", fallback="forecast",
                                       cache_ratio_threshold=0.5, **stages) for _ in range(2))
    want = run_loop(ref, tm, STEPS)
    disp = StepDispatch(opt, compile_mode="eager", decide=decide)
    with torch.no_grad():
        got = [first(disp(**tm.make_inputs(t, 2))).clone() for t in STEPS]
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert fastcache.get_cache_statistics(ref)["blocks_approximated"] > 0


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"drift_correction='euler' is invalid: choose one of \('none', 'flow_euler'\)"):
        fastcache.FastCacheConfig(drift_correction="euler")
    with pytest.raises(ValueError, match="policy='chi2' decides per block"):
        fastcache.FastCacheConfig(policy="chi2", drift_correction="flow_euler")
    from fx_fastcache.export import installed_schedule
    from fx_fastcache.export.onnx import stateless_module

    tm = make_tiny("tiny-dit")
    opt = _scheduled(tm, drift_correction="flow_euler")
    with pytest.raises(ValueError, match="drift_correction='flow_euler' is not supported by export"):
        stateless_module(opt, installed_schedule(opt, steps=len(STEPS)), tm.make_inputs(STEPS[0], 2))
    opt = fastcache.optimize(NoTimestep(), backend="eager", drift_correction="flow_euler")
    with pytest.raises(ValueError, match="has no timestep input, and the correction needs"):
        opt(torch.randn(2, 3, 4))


def test_pipelines_flow_euler_only_and_one_state_per_cache_context():
    from fx_fastcache.tiny_pipelines import make_tiny_pipeline

    tp = make_tiny_pipeline("pixart")
    with pytest.raises(ValueError, match="uses DPMSolverMultistepScheduler, whose step the correction would get wrong"):
        fastcache.enable_fastcache(tp.pipe, backend="eager", drift_correction="flow_euler")
    fastcache.enable_fastcache(tp.pipe, backend="eager")
    with pytest.raises(ValueError, match="uses DPMSolverMultistepScheduler"):  # nor switched on afterwards
        fastcache.configure(tp.pipe, drift_correction="flow_euler")
    assert tp.pipe.transformer.fastcache_config.drift_correction == "none"
    fastcache.disable_fastcache(tp.pipe)
    tp = make_tiny_pipeline("flux")
    kw = tp.call_kwargs(seed=0, num_inference_steps=4, negative_prompt="blurry", true_cfg_scale=2.0)
    images = {}
    for dc in ("none", "flow_euler"):
        tr = fastcache.enable_fastcache(tp.pipe, backend="eager", policy="schedule", drift_correction=dc)
        rows = torch.tensor([False, False, True, False])  # step 2 forecast, step 3 computed (and corrected)
        fastcache.set_schedule(tp.pipe, rows.unsqueeze(1).expand(4, len(tr.block_names())).contiguous())
        images[dc] = torch.as_tensor(np.asarray(tp.pipe(**kw).images))
        if dc == "flow_euler":
            v_c = [state[key]["fastcache_drift.v_c"] for state in tr.contexts().values() for key in state]
            assert len(v_c) == 2 and not torch.equal(v_c[0], v_c[1])  # cond and uncond keep their own
        fastcache.disable_fastcache(tp.pipe)
    assert not torch.allclose(images["none"], images["flow_euler"])

# inductor: tests/test_noise_forecast.py compiles the drift correction and the noise forecast together
