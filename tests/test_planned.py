"""policy="planned": the steps to compute chosen offline over calibration runs."""
from __future__ import annotations

import itertools
import logging
import re

import numpy as np
import pytest
import torch

import fx_fastcache as fastcache
from fx_fastcache.policies.planned import PROTECT_KEY, blend_errors, budget, forecast_errors, plan
from fx_fastcache.tiny_pipelines import make_tiny_pipeline
from fx_fastcache.zoo import make_tiny

STEPS = 8


def _euler(model, tm, seed: int = 0, steps: int = STEPS):
    """A flow-matching Euler loop over ``steps`` calls of ``model`` from seeded noise."""
    kw = tm.make_inputs(1000.0)
    x = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
    sig = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            v = model(**dict(kw, hidden_states=x, timestep=tm.make_inputs(float(sig[i]) * 1000.0)["timestep"]))[0]
            v = v[:, : x.shape[1]] if v.ndim == 4 else v  # learned-sigma layouts: the velocity channels
            x = x + (sig[i + 1] - sig[i]) * v
    return x


def _brute(err, n, m, warmup, max_skip, adjacent=None):
    """The cheapest set of ``m`` computed steps by enumeration (summed error, mean over samples);
    ``adjacent[(q, c, k)]`` replaces ``err[(c − 1, c, k)]`` when ``q`` is computed before ``c − 1``."""
    best = None
    forced = max(1, warmup)
    for rest in itertools.combinations(range(forced, n), m - forced):
        comp = list(range(forced)) + list(rest)
        gaps = [b - a - 1 for a, b in zip(comp, comp[1:] + [n])]
        if max_skip and max(gaps) > max_skip:
            continue
        cost = 0.0
        for i, c in enumerate(comp):
            p = comp[i - 1] if i else -1
            nxt = comp[i + 1] if i + 1 < len(comp) else n
            q = comp[i - 2] if i >= 2 else -1
            table, key = (adjacent, (q, c)) if adjacent is not None and p == c - 1 and q >= 0 else (err, (p, c))
            cost += sum(float(table[key + (k,)].mean()) for k in range(c + 1, nxt))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, comp)
    return best


@pytest.mark.parametrize("warmup,max_skip", [(0, 0), (2, 0), (1, 2), (3, 1)])
def test_plan_finds_the_cheapest_computed_steps(warmup, max_skip):
    g = torch.Generator().manual_seed(warmup * 10 + max_skip)
    n = 7
    err = {(p, c, k): torch.rand(3, generator=g) * (k - c) for c in range(n) for p in range(-1, c)
           for k in range(c + 1, n)}
    plans = plan(err, n, warmup=warmup, max_skip=max_skip)
    for m in range(max(1, warmup), n + 1):
        want = _brute(err, n, m, warmup, max_skip)
        if want is None:
            continue
        got = plans[m - 1].nonzero().flatten().tolist()
        assert len(got) == m
        assert got == want[1], (m, got, want)


@pytest.mark.parametrize("warmup,max_skip", [(0, 0), (3, 0), (1, 2), (2, 1)])
def test_plan_for_the_blended_forecast_finds_the_cheapest_computed_steps(warmup, max_skip):
    """fallback="forecast_blend": after adjacent computed steps the error depends on the step before."""
    g = torch.Generator().manual_seed(100 + warmup * 10 + max_skip)
    n = 8
    err = {(p, c, k): torch.rand(3, generator=g) * (k - c) for c in range(n) for p in range(-1, c)
           for k in range(c + 1, n)}
    adjacent = {(q, c, k): torch.rand(3, generator=g) * (k - c) * 0.6 for c in range(2, n) for q in range(c - 1)
                for k in range(c + 1, n)}
    plans = plan(err, n, warmup=warmup, max_skip=max_skip, adjacent=adjacent)
    differs = 0
    for m in range(max(1, warmup), n + 1):
        want = _brute(err, n, m, warmup, max_skip, adjacent)
        if want is None:
            continue
        got = plans[m - 1].nonzero().flatten().tolist()
        assert got == want[1], (m, got, want)
        differs += got != _brute(err, n, m, warmup, max_skip)[1]
    assert differs  # the adjacent errors changed some plan, so the test sees them


def test_blend_errors_average_the_two_forecasts():
    """The blended forecast's error is that of the mean of the forecasts through (c − 1, c) and (q, c)."""
    ts = [1000.0, 800.0, 700.0, 600.0, 300.0]
    res = [[torch.randn(2, 4, 8)] for _ in ts]
    outs = [[torch.randn(2, 4, 8)] for _ in ts]
    err = blend_errors(ts, res, outs)
    assert set(err) == {(q, c, k) for c in range(2, 5) for q in range(c - 1) for k in range(c + 1, 5)}
    q, c, k = 0, 3, 4
    r = [x[0] for x in res]
    a = (ts[k] - ts[c]) / (ts[c] - ts[c - 1])
    b = (ts[k] - ts[c]) / (ts[c] - ts[q])
    r_hat = r[c] + 0.5 * a * (r[c] - r[c - 1]) + 0.5 * b * (r[c] - r[q])
    ln = lambda z: torch.nn.functional.layer_norm(z, z.shape[-1:])  # noqa: E731
    want = (ln(outs[k][0] + r_hat - r[k]) - ln(outs[k][0])).flatten(1).norm(dim=1) * abs(ts[k])  # last step's weight
    torch.testing.assert_close(err[(q, c, k)], want)


def test_forecast_errors_vanish_where_the_forecast_is_exact():
    """Residuals linear in t: a forecast from two computed steps is exact, plain reuse is not."""
    ts = [1000.0, 750.0, 500.0, 250.0]
    base, slope = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    res = [[base + slope * (t / 1000.0)] for t in ts]
    outs = [[torch.randn(2, 4, 8)] for _ in ts]
    err = forecast_errors(ts, res, outs)
    reuse = err[(-1, 1, 3)]  # reuse misses the slope
    assert reuse.min() > 1.0
    assert err[(0, 1, 3)].max() < 1e-4 * reuse.min() and err[(1, 2, 3)].max() < 1e-4 * reuse.min()
    # planned for the residual fallback (order 0): every forecast is plain reuse, whatever p is
    err0 = forecast_errors(ts, res, outs, order=0)
    assert torch.allclose(err0[(0, 1, 3)], reuse) and torch.allclose(err0[(-1, 1, 3)], reuse)
    const = [[base] for _ in ts]  # a constant residual: reuse is exact
    assert forecast_errors(ts, const, outs, order=0)[(0, 1, 3)].max() < 1e-5


def _planned(tm, fallback: str):
    """``policy="planned"`` at 50 % for ``fallback``, calibrated on one 8-step generation."""
    opt = fastcache.optimize(tm.model, backend="eager", policy="planned", fallback=fallback, target_fraction=0.5)
    with fastcache.calibrate(opt):
        _euler(opt, tm, seed=1)
    return opt


@pytest.mark.parametrize("fallback", ["residual", "forecast_blend"])
def test_plan_for_the_fallback_matches_its_schedule(fallback):
    """The plan is made for the configured fallback (reuse; the blended forecast) and the images are
    those of its table under policy="schedule" with that fallback."""
    tm = make_tiny("tiny-dit")
    opt = _planned(tm, fallback)
    fastcache.reset(opt)
    out = _euler(opt, tm)
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] == pytest.approx(0.5)
    ref = fastcache.optimize(tm.model, backend="eager", policy="schedule", fallback=fallback)
    fastcache.set_schedule(ref, opt.installed_schedule())
    assert torch.equal(_euler(ref, tm), out)


def test_blended_calibration_stores_its_errors_and_refuses_another_fallbacks(tmp_path):
    """fallback="forecast_blend": calibration stores the errors after adjacent computed steps; a
    calibration file planned for another fallback is refused by name."""
    from fx_fastcache.policies.planned import ADJACENT_ERRORS_KEY

    tm = make_tiny("tiny-dit")
    opt = _planned(tm, "forecast_blend")
    adj = opt.store.tensors[ADJACENT_ERRORS_KEY]
    assert adj.shape == (STEPS, STEPS, STEPS) and int((~torch.isnan(adj)).sum()) > 0
    path = tmp_path / "forecast.safetensors"
    fastcache.save_calibration(_planned(tm, "forecast"), path)
    with pytest.raises(ValueError, match=r"planned policy='planned' for fallback='forecast'.*calibrate with "
                                         r"fallback='forecast_blend'"):
        fastcache.load_calibration(opt, path)


def _calibrated_tiny():
    """A tiny DiT with ``policy="planned"`` at 50 %, calibrated on two 8-step generations."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5)
    with fastcache.calibrate(opt):
        for seed in (1, 2):
            _euler(opt, tm, seed=seed)
    return tm, opt


@pytest.fixture(scope="module")
def calibrated():
    return _calibrated_tiny()


def test_plan_replaces_the_target_fraction_and_matches_its_schedule(calibrated):
    tm, opt = calibrated
    fastcache.configure(opt, target_fraction=0.5)
    fastcache.reset(opt)
    out = _euler(opt, tm)
    st = fastcache.get_cache_statistics(opt)
    assert st["block_approx_ratio"] == pytest.approx(0.5)
    table = opt.installed_schedule()
    computed = (~table[:, 0]).nonzero().flatten().tolist()
    assert computed[:2] == [0, 1]  # warm-up steps always compute
    assert len(computed) + int(table[:, 0].sum()) >= budget(0.5, STEPS)
    # the same table through policy="schedule" gives the same images: nothing else differs
    ref = fastcache.optimize(tm.model, backend="eager", policy="schedule")
    fastcache.set_schedule(ref, table)
    assert torch.equal(_euler(ref, tm), out)
    eager = _euler(tm.model, tm)
    assert (out - eager).abs().max() > 0  # it did approximate


def test_calibration_keeps_its_schedule_and_names_another(calibrated, tmp_path):
    """The plans' noise schedule is the first calibration generation's timesteps (as the clock reads them); the
    policy says when a generation of the same length ran others, and the schedule is saved with the plans (a file
    saved before it loads, and the check then has nothing to compare)."""
    from fx_fastcache.policies import POLICIES
    from fx_fastcache.policies.planned import TIMESTEPS_KEY

    tm, opt = calibrated
    made = [float(t) * 1000.0 for t in torch.linspace(1.0, 0.0, STEPS + 1)[:-1]]
    torch.testing.assert_close(opt.store.tensors[TIMESTEPS_KEY], torch.tensor(made))
    check = POLICIES["planned"].schedule_mismatch
    assert check(opt.store, made) is None and check(opt.store, made[:-1]) is None  # the length: steps_mismatch's
    assert check(opt.store, [t + 0.5 for t in made]) is None  # within the tolerance (1e-3 of 1000)
    shifted = [3 * t / (1000 + 2 * t) * 1000 for t in made]
    why = check(opt.store, shifted)
    assert why is not None and "[1000, 875, 750" in why and "[1000, 954.5, 900" in why and "calibrate" in why
    path = tmp_path / "plans.safetensors"
    fastcache.save_calibration(opt, path)
    other = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5)
    fastcache.load_calibration(other, path)
    assert check(other.store, shifted) == why
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta, kept = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != TIMESTEPS_KEY}
    save_file(kept, str(tmp_path / "old.safetensors"), metadata=meta)
    fastcache.load_calibration(other, tmp_path / "old.safetensors")
    assert TIMESTEPS_KEY not in other.store.tensors and check(other.store, shifted) is None


def test_target_fraction_changes_without_recapture(calibrated):
    tm, opt = calibrated
    graphs = list(opt.entries())
    for target, want in ((0.25, 0.25), (0.75, 0.75), (0.0, 0.0)):
        fastcache.configure(opt, target_fraction=target)
        fastcache.reset(opt)
        _euler(opt, tm)
        assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] == pytest.approx(want)
    assert list(opt.entries()) == graphs


def test_plan_saves_and_loads(calibrated, tmp_path):
    tm, opt = calibrated
    fastcache.configure(opt, target_fraction=0.5)
    path = tmp_path / "plan.safetensors"
    fastcache.save_calibration(opt, path)
    other = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.25)
    fastcache.load_calibration(other, path)
    _euler(other, tm)
    assert fastcache.get_cache_statistics(other)["block_approx_ratio"] == pytest.approx(0.25)  # its own target


@pytest.mark.parametrize("change", [dict(warmup_steps=4), dict(warmup_steps=1, max_skip_steps=1)], ids=["warmup", "max_skip"])
def test_new_warmup_or_max_skip_replans(change, tmp_path):
    """The plans are made under warmup_steps / max_skip_steps; configured (or loaded) under others, they are
    made again, as if calibrated with those (the old plan replaced less than asked, silently)."""
    tm, opt = _calibrated_tiny()
    path = tmp_path / "plan.safetensors"
    fastcache.save_calibration(opt, path)
    ref = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5, **change)
    with fastcache.calibrate(ref):
        for seed in (1, 2):
            _euler(ref, tm, seed=seed)
    loaded = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5, **change)
    fastcache.load_calibration(loaded, path)
    fastcache.configure(opt, **change)
    for model in (opt, loaded):
        assert torch.equal(model.installed_schedule(), ref.installed_schedule())
        fastcache.reset(model)
        _euler(model, tm)
        assert fastcache.get_cache_statistics(model)["block_approx_ratio"] == pytest.approx(0.5)
    assert not torch.equal(ref.installed_schedule(), _calibrated_tiny()[1].installed_schedule())  # a new plan


def test_calibrating_again_with_another_step_count_plans_for_it(tmp_path):
    """The plans, errors and searches are sized by the step count: a new calibration with another count
    replaces them (it failed on the old tensors' size), as a fresh model would plan."""
    tm, opt = _calibrated_tiny()
    fastcache.search_plan(opt, lambda: _euler(opt, tm, seed=3), max_runs=2)
    with fastcache.calibrate(opt):
        for seed in (1, 2):
            _euler(opt, tm, seed=seed, steps=12)
    fresh = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5)
    with fastcache.calibrate(fresh):
        for seed in (1, 2):
            _euler(fresh, tm, seed=seed, steps=12)
    assert torch.equal(opt.installed_schedule(), fresh.installed_schedule())
    _euler(opt, tm, steps=12)
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] == pytest.approx(0.5)
    eight, twelve = tmp_path / "8.safetensors", tmp_path / "12.safetensors"  # loading swaps step counts too
    fastcache.save_calibration(_calibrated_tiny()[1], eight)
    fastcache.save_calibration(fresh, twelve)
    fastcache.load_calibration(opt, eight)
    assert opt.installed_schedule().shape[0] <= 8
    fastcache.load_calibration(opt, twelve)
    assert torch.equal(opt.installed_schedule(), fresh.installed_schedule())


def test_planned_under_step_dispatch_follows_the_plan(calibrated):
    tm, opt = calibrated
    fastcache.configure(opt, target_fraction=0.5)
    fastcache.reset(opt)
    want = _euler(opt, tm)
    disp = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5,
                              execution="step_dispatch", dispatch_compile="eager")
    _euler(disp, tm)
    assert fastcache.get_cache_statistics(disp)["block_approx_ratio"] == 0.0  # uncalibrated: every step computes
    with fastcache.calibrate(disp):
        for seed in (1, 2):
            _euler(disp, tm, seed=seed)
    # no reset: the dispatcher reads the plan calibration installed, and sees each new generation
    # once its table has run out (as the in-graph clock does)
    for _ in range(2):
        assert torch.equal(_euler(disp, tm), want)
    assert fastcache.get_cache_statistics(disp)["block_approx_ratio"] == pytest.approx(0.5)
    fastcache.configure(opt, target_fraction=0.25)
    fastcache.configure(disp, target_fraction=0.25)  # a new plan between generations, still no reset
    want = _euler(opt, tm)
    assert torch.equal(_euler(disp, tm), want) and torch.equal(_euler(disp, tm), want)


@pytest.mark.parametrize("family", ["tiny-pixart", "tiny-flux", "tiny-wan"])
def test_planned_on_other_families(family):
    tm = make_tiny(family)
    opt = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5)
    with fastcache.calibrate(opt):
        _euler(opt, tm, seed=1)
    fastcache.reset(opt)
    out = _euler(opt, tm)
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] == pytest.approx(0.5)
    ref = fastcache.optimize(tm.model, backend="eager", policy="schedule")
    fastcache.set_schedule(ref, opt.installed_schedule())
    assert torch.equal(_euler(ref, tm), out)


def test_uncalibrated_computes_everything_and_says_so(caplog, monkeypatch):
    from fx_fastcache.policies import planned

    monkeypatch.setattr(planned, "_warned_uncalibrated", False)
    tm = make_tiny("tiny-dit")
    with caplog.at_level(logging.INFO, logger="fx_fastcache.policies.planned"):
        opt = fastcache.optimize(tm.model, backend="eager", policy="planned")
        out = _euler(opt, tm)
    assert torch.equal(out, _euler(tm.model, tm))
    assert any("uncalibrated, so every step computes" in r.getMessage() for r in caplog.records)


def test_bad_inputs_name_the_fix():
    tm = make_tiny("tiny-dit")
    with pytest.raises(ValueError, match="target_fraction=1.2 is invalid"):
        fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=1.2)
    with pytest.raises(ValueError, match=r"fallback='linear' cannot be planned.*'forecast'"):
        fastcache.optimize(tm.model, backend="eager", policy="planned", fallback="linear")
    opt = fastcache.optimize(tm.model, backend="eager", policy="planned")
    with pytest.raises(ValueError, match="use policy='schedule'"):
        fastcache.set_schedule(opt, torch.zeros(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"ran \[4, 8\] steps"), fastcache.calibrate(opt):
        _euler(opt, tm, steps=4)
        _euler(opt, tm, steps=8)


def test_plan_exports_to_onnx(calibrated, tmp_path):
    """The plan is a schedule: exported with it, onnxruntime reproduces the planned PyTorch run."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fx_fastcache.export import installed_schedule
    from fx_fastcache.export.onnx import export_onnx
    from fx_fastcache.export.runner import OnnxRunner

    tm, opt = calibrated
    fastcache.configure(opt, target_fraction=0.5)
    sched = installed_schedule(opt, model_name="tiny-dit", steps=STEPS)
    assert sched.steps == STEPS and sched.skip_ratio == pytest.approx(0.5)
    sched.save(tmp_path / "plan.json")  # saved like a recorded schedule
    ex = export_onnx(tm.model, sched, tm.make_inputs(1000.0), tmp_path / "plan.onnx")
    fastcache.reset(opt)
    want = _euler(opt, tm)
    got = _euler(OnnxRunner(ex.path), tm)
    assert float((want - got).abs().max()) <= 1e-3
    with pytest.raises(ValueError, match="replays no table"):
        installed_schedule(fastcache.optimize(tm.model, backend="eager"))


SCHEDULE_WARNING = "chose its computed steps for the calibration's timesteps"


def _messages(caplog, words: str = "") -> list[str]:
    """fx-fastcache's log messages that contain ``words``."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("fx_fastcache") and words in r.getMessage()]


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_planned_pipeline_and_a_step_count_it_was_not_planned_for(family, caplog):
    """A pipeline plans on its own calibration call (Wan: two cache contexts per step) and warns when
    called with another number of steps (``num_inference_steps``, custom sigmas, image-to-image strength),
    or, after the call, with the calibrated step count on other timesteps (a shifted or custom schedule)."""
    tp = make_tiny_pipeline(family)
    fastcache.enable_fastcache(tp.pipe, backend="eager", policy="planned", target_fraction=0.5)
    with fastcache.calibrate(tp.pipe.transformer):
        tp.pipe(**tp.call_kwargs(seed=1, num_inference_steps=6))
    with caplog.at_level(logging.WARNING, logger="fx_fastcache.pipelines"):
        tp.pipe(**tp.call_kwargs(seed=0, num_inference_steps=6))
        assert not _messages(caplog)  # the calibrated schedule (Wan: CFG as two calls per step, one timestep each)
    st = fastcache.get_cache_statistics(tp.pipe)
    assert st["block_approx_ratio"] == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING, logger="fx_fastcache.pipelines"):
        tp.pipe(**tp.call_kwargs(seed=0, num_inference_steps=4))
        assert any("calibrated on 6-step generations, this one runs 4 steps" in r.getMessage() for r in caplog.records)
        assert not _messages(caplog, SCHEDULE_WARNING)  # another step count: said once, by the check above
        caplog.clear()
        sched = tp.pipe.scheduler  # the same step count on a schedule shifted further
        tp.pipe.scheduler = type(sched).from_config(sched.config, shift=sched.config.shift * 2)
        tp.pipe(**tp.call_kwargs(seed=0, num_inference_steps=6))
        tp.pipe(**tp.call_kwargs(seed=0, num_inference_steps=6))
        tp.pipe.scheduler = sched
        assert len(_messages(caplog, SCHEDULE_WARNING)) == 1 == len(_messages(caplog))  # once per model
        if family == "sd3":  # custom sigmas set the step count, whatever num_inference_steps says
            caplog.clear()
            tp.pipe(**tp.call_kwargs(seed=0, num_inference_steps=4, sigmas=[1.0, 0.8, 0.6, 0.4, 0.3, 0.2]))
            assert not _messages(caplog)  # 6 steps: the count fits (their other timesteps were said once above)
            # image-to-image at strength 0.5 runs half the steps (the check counted num_inference_steps)
            from diffusers import StableDiffusion3Img2ImgPipeline
            from PIL import Image

            i2i = StableDiffusion3Img2ImgPipeline.from_pipe(tp.pipe)
            fastcache.enable_fastcache(i2i)  # adopts the shared transformer
            side = tp.pipe.default_sample_size * tp.pipe.vae_scale_factor
            kw = dict(image=Image.new("RGB", (side, side), (120, 30, 200)), strength=0.5)
            caplog.clear()
            i2i(**tp.call_kwargs(seed=0, **dict(kw, num_inference_steps=12)))
            i2i(**tp.call_kwargs(seed=0, **dict(kw, sigmas=torch.linspace(1.0, 0.1, 12).tolist())))  # also 6
            # 6 steps, the count fits; strength 0.5 runs the lower half of the noise levels: another schedule
            assert len(_messages(caplog, SCHEDULE_WARNING)) == 1 == len(_messages(caplog))
            i2i(**tp.call_kwargs(seed=0, **dict(kw, num_inference_steps=6)))
            assert any("calibrated on 6-step generations, this one runs 3 steps" in r.getMessage()
                       for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("family, dispatch_compile", [("dit", "default"), ("wan", "eager")])
def test_planned_pipeline_calibrated_under_dispatch(family, dispatch_compile):
    """``calibrate(pipe)`` of a pipeline whose transformer runs step dispatch (compiled: what
    ``execution="auto"`` picks on CUDA for a plan; Wan: two cache contexts per step, its copies run eager
    to spare a compile) fits the same plan as the in-graph guards, and the dispatched pipeline then
    generates what the in-graph one does."""
    images = {}
    for execution, compile_mode in (("in_graph", None), ("step_dispatch", dispatch_compile)):
        tp = make_tiny_pipeline(family)
        fastcache.enable_fastcache(tp.pipe, backend="eager", policy="planned", target_fraction=0.5,
                                   execution=execution, dispatch_compile=compile_mode)
        with fastcache.calibrate(tp.pipe):
            tp.pipe(**tp.call_kwargs(seed=1, num_inference_steps=6))
        out = tp.pipe(**tp.call_kwargs(seed=0, num_inference_steps=6))
        images[execution] = torch.as_tensor(np.asarray(out.frames if hasattr(out, "frames") else out.images))
        assert fastcache.get_cache_statistics(tp.pipe)["block_approx_ratio"] == pytest.approx(0.5)
    torch.testing.assert_close(images["step_dispatch"], images["in_graph"], rtol=1e-4, atol=1e-4)


def test_measure_sensitivity_weighs_steps_and_replans(calibrated):
    tm, opt = calibrated
    fastcache.configure(opt, target_fraction=0.5)
    before = opt.installed_schedule().clone()
    calls = []

    def generate():
        calls.append(opt.installed_schedule())
        return _euler(opt, tm, seed=3)

    def metric(out, ref):  # make step 3 look very sensitive: the new plan must compute it
        table = calls[-1]
        return float((out - ref).abs().max()) * (1e6 if table.shape[0] > 3 and bool(table[3].any()) else 1.0)

    weights = fastcache.measure_sensitivity(opt, generate, metric=metric)
    assert len(calls) == 1 + STEPS - 2  # the full run, then each skippable step alone
    assert weights[:2] == [1.0, 1.0] and weights[3] > 1e3 * max(w for i, w in enumerate(weights) if i not in (0, 1, 3))
    after = opt.installed_schedule()
    assert not bool(after[3].any()), "the sensitive step is computed now"
    assert int(after[:, 0].sum()) == int(before[:, 0].sum())  # same budget
    fastcache.reset(opt)
    _euler(opt, tm)
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="policy='planned'"):
        fastcache.measure_sensitivity(fastcache.optimize(tm.model, backend="eager"), generate)
    with pytest.raises(TypeError, match="final output as a tensor"):
        fastcache.measure_sensitivity(opt, lambda: None)


def test_sensitivity_and_protection_treat_a_broken_sample_as_the_worst():
    """A NaN in a skipped run's output: protect_steps let it pass (its PSNR was NaN, not below the floor), and
    measure_sensitivity stored NaN weights that made every plan compute everything; a NaN or negative
    metric likewise.  Now the step is protected, and the weights are refused by name."""
    tm, opt = _calibrated_tiny()
    kept = opt.installed_schedule().clone()
    runs = []

    def generate():  # sample 0 breaks whenever a step is skipped
        out = _euler(opt, tm, seed=3)
        if runs:
            out[0, 0, 0, 0] = float("nan")
        runs.append(1)
        return out

    for metric, says in ((None, "generate() returned non-finite values"),
                         (lambda out, ref: float("nan"), "metric(out, ref) returned nan"),
                         (lambda out, ref: -1.0, "metric(out, ref) returned -1.0")):
        runs.clear()
        with pytest.raises(ValueError, match=r"measure_sensitivity: with step 2 skipped, .*" + re.escape(says)):
            fastcache.measure_sensitivity(opt, generate, metric=metric)
        assert torch.equal(opt.installed_schedule(), kept)
    runs.clear()
    assert fastcache.protect_steps(opt, generate, floor_db=20.0, data_range=2.0) == list(range(2, STEPS))
    with pytest.raises(ValueError, match="measure_sensitivity: generate\\(\\) returned a 0-d tensor"):
        fastcache.measure_sensitivity(opt, lambda: torch.zeros(()))
    for bad in (True, float("nan")):
        with pytest.raises(ValueError, match=re.escape(f"floor_db={bad!r} must be a PSNR")):
            fastcache.protect_steps(opt, generate, floor_db=bad)
    shapes = iter([(2, 4, 8, 8), (1, 4, 8, 8)])
    with pytest.raises(ValueError, match=re.escape("returned shape (2, 4, 8, 8), then (1, 4, 8, 8)")):
        fastcache.protect_steps(opt, lambda: torch.zeros(next(shapes)), floor_db=20.0, data_range=2.0)


def test_protect_steps_computes_the_steps_that_break_a_sample(tmp_path, caplog):
    tm, opt = _calibrated_tiny()  # its own: protecting steps changes the plans
    before = opt.installed_schedule().clone()
    calls = []

    def generate():  # skipping step 5 alone breaks sample 0 (a change far above the floor)
        table = opt.installed_schedule()
        calls.append(table)
        out = _euler(opt, tm, seed=3).clone()
        if table.shape[0] > 5 and bool(table[5].any()):
            out[0] += 10.0
        return out

    steps = fastcache.protect_steps(opt, generate, floor_db=1.0, data_range=1.0)
    assert steps == [5]
    assert len(calls) == 1 + STEPS - 2  # the full run, then each skippable step alone
    after = opt.installed_schedule()
    assert not bool(after[5].any()) and int(after[:, 0].sum()) == int(before[:, 0].sum())  # same budget
    with caplog.at_level(logging.WARNING, logger="fx_fastcache.policies.planned"):
        fastcache.configure(opt, target_fraction=0.75)  # every budget's plan computes it
    assert not bool(opt.installed_schedule()[5].any())
    # 2 computed steps of 8 cannot hold the 2 warm-up steps and step 5: it says so, and computes 3
    assert any("cannot replace target_fraction=0.75" in r.getMessage() and "[5] need 3" in r.getMessage()
               for r in caplog.records)
    path = tmp_path / "protected.safetensors"
    fastcache.save_calibration(opt, path)
    other = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.75)
    fastcache.load_calibration(other, path)
    _euler(other, tm)
    assert not bool(other.installed_schedule()[5].any())
    plain = tmp_path / "plain.safetensors"  # a file saved without protect_steps loads as saved
    fastcache.save_calibration(_calibrated_tiny()[1], plain)
    fastcache.load_calibration(other, plain)
    assert PROTECT_KEY not in other.store.tensors and bool(other.installed_schedule()[5].any())

    kept = opt.installed_schedule().clone()
    with pytest.raises(ValueError, match="floor_db=0"):
        fastcache.protect_steps(opt, generate, floor_db=0)
    with pytest.raises(ValueError, match="data_range=-2"):
        fastcache.protect_steps(opt, generate, floor_db=30, data_range=-2)
    with pytest.raises(TypeError, match="final output as a tensor"):
        fastcache.protect_steps(opt, lambda: None, floor_db=30)
    with pytest.raises(ValueError, match="batch first"):
        fastcache.protect_steps(opt, lambda: _euler(opt, tm).sum(), floor_db=30)
    assert torch.equal(opt.installed_schedule(), kept)  # a failed run leaves the plan as it was
    with pytest.raises(ValueError, match="policy='planned'"):
        fastcache.protect_steps(fastcache.optimize(tm.model, backend="eager"), generate, floor_db=30)
    with pytest.raises(ValueError, match="calibrated"):
        fastcache.protect_steps(fastcache.optimize(tm.model, backend="eager", policy="planned"), generate,
                                floor_db=30)


def test_protect_steps_on_a_larger_batch_than_calibration_compares_with_a_full_run():
    """The single-skip runs may use a new batch size: its capture must not install the plan over them."""
    tm, opt = _calibrated_tiny()  # its own: protecting steps changes the plans
    kw = tm.make_inputs(1000.0)
    big = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    x0 = torch.randn(big["hidden_states"].shape, generator=torch.Generator().manual_seed(5))
    sig = torch.linspace(1.0, 0.0, STEPS + 1)
    ratios = []

    def generate():
        x = x0.clone()
        with torch.no_grad():
            for i in range(STEPS):
                t = torch.full_like(big["timestep"], float(sig[i]) * 1000.0)
                v = opt(**dict(big, hidden_states=x, timestep=t))[0]
                x = x + (sig[i + 1] - sig[i]) * v[:, : x.shape[1]]
        ratios.append(fastcache.get_cache_statistics(opt)["block_approx_ratio"])
        return x

    fastcache.protect_steps(opt, generate, floor_db=99.0)
    assert ratios[0] == 0.0  # the reference computed every step, though its batch was captured now
    assert all(r == pytest.approx(1 / STEPS) for r in ratios[1:])  # then one step skipped per run
    assert not bool(opt.installed_schedule().any())  # every step broke the 99 dB floor: all compute
