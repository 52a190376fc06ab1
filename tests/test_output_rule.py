"""Fitted output rule (``output_rule="fitted"``): the graph's output at every step equals a hand computation of
the table's rule on the computed steps' outputs and latent (SD3, Flux, Wan; identity rows leave the library's
output untouched); ``fit_output_rule`` fits it through the sampler (what it fits is what the graph then plays), keeps
it only where it scores better than the library's rules, installs it per fraction, saves it, drops it when the plan
changes, runs through step dispatch and inductor, and refuses what it cannot do."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import first, run_loop

import fx_fastcache as fastcache
from fx_fastcache.bench.runner import parse_method
from fx_fastcache.policies.planned import PLANS_KEY, RULES_KEY, SEARCH_OBJECTIVES, budget, set_rule_table
from fx_fastcache.policies.rule_fit import FIT_LOSSES, PlanEmulator, emulating, forecast_coefficients, table_rows
from fx_fastcache.runtime.output_rule import COLUMNS, HISTORY, TABLE_KEY, identity_rows
from fx_fastcache.step_dispatch import StepDispatch
from fx_fastcache.zoo import make_tiny

STEPS = 8
FRACTION = 0.5  # 4 of 8 steps computed


def _euler(model, tm, seeds=(3, 4), grad: bool = False) -> torch.Tensor:
    """A flow-matching Euler loop of ``STEPS`` calls (timestep σ·1000) from seeded noise, with gradients if ``grad``."""
    kw = tm.make_inputs(1000.0, len(seeds))
    x = torch.cat([torch.randn((1, *kw["hidden_states"].shape[1:]), generator=torch.Generator().manual_seed(s))
                   for s in seeds])
    sig = torch.linspace(1.0, 0.0, STEPS + 1)
    with torch.set_grad_enabled(grad):
        for i in range(STEPS):
            t = tm.make_inputs(float(sig[i]) * 1000.0, len(seeds))["timestep"]
            x = x + (sig[i + 1] - sig[i]) * first(model(**dict(kw, hidden_states=x, timestep=t)))
    return x


def _planned(tm, **config):
    opt = fastcache.optimize(tm.model, backend=config.pop("backend", "eager"), policy="planned",
                             target_fraction=FRACTION, output_rule="fitted", **config)
    with fastcache.calibrate(opt):
        _euler(opt, tm, seeds=(1,))
    return opt


def _plan(opt) -> list[int]:
    plans = opt.store.tensors[PLANS_KEY]
    return plans[budget(FRACTION, plans.shape[0]) - 1].nonzero().flatten().tolist()


def _rows(plan: list[int], seed: int = 0) -> torch.Tensor:
    """A table with random coefficients (``a`` too) on the steps of ``plan``'s intervals."""
    g = torch.Generator().manual_seed(seed)
    rows = identity_rows(STEPS)
    rows[:, 0] = torch.rand(STEPS, generator=g)
    rows[:, 1:] = torch.randn(STEPS, COLUMNS - 1, generator=g) * 0.5
    return rows


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux", "tiny-wan"])
def planned(request):
    tm = make_tiny(request.param)
    return tm, _planned(tm)


def test_output_matches_hand_computation(planned):
    """Every step: ``a · (the library's output) + Σ_i c_i V_{n−i} + G · x_c``, V the model's own outputs at the last
    computed steps (newest first), x_c the latent at the last one; identity rows: the library's outputs."""
    tm, opt = planned
    plan = _plan(opt)
    set_rule_table(opt.store, None, opt.device)
    fastcache.reset(opt)
    library = run_loop(opt, tm, [1000.0 - 100 * k for k in range(STEPS)])
    plain = run_loop(tm.model, tm, [1000.0 - 100 * k for k in range(STEPS)])
    x = tm.make_inputs(1000.0, 2)["hidden_states"].float()  # run_loop's latents stay put
    rows = _rows(plan)
    set_rule_table(opt.store, rows, opt.device)
    fastcache.reset(opt)
    got = run_loop(opt, tm, [1000.0 - 100 * k for k in range(STEPS)])
    for k in range(STEPS):
        hist = [plain[j].float() for j in reversed(plan) if j <= k][:HISTORY]
        want = rows[k, 0] * library[k].float() + rows[k, 1 + HISTORY] * x
        for i, h in enumerate(hist):
            want = want + rows[k, 1 + i] * h
        torch.testing.assert_close(got[k].float(), want, rtol=1e-4, atol=1e-4)
    set_rule_table(opt.store, None, opt.device)
    fastcache.reset(opt)
    for a, b in zip(run_loop(opt, tm, [1000.0 - 100 * k for k in range(STEPS)]), library):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_graph_plays_what_the_fit_emulates(planned):
    """With the interval coefficients as a table, the graph's generation equals the fit's emulation of it."""
    tm, opt = planned
    plan = _plan(opt)
    sig = torch.linspace(1.0, 0.0, STEPS + 1).tolist()
    coef = forecast_coefficients(plan, sig) + 0.3 * torch.randn(len(plan), HISTORY + 1,
                                                                generator=torch.Generator().manual_seed(1))
    em = PlanEmulator(opt, [k in plan for k in range(STEPS)], coef, sig, checkpoint=False)
    with emulating(opt, em), torch.no_grad():
        emulated = _euler(opt, tm)
    assert all(p.requires_grad for p in tm.model.parameters())  # restored
    set_rule_table(opt.store, table_rows(plan, sig, coef), opt.device)
    fastcache.reset(opt)
    torch.testing.assert_close(_euler(opt, tm), emulated, rtol=1e-4, atol=1e-4)
    set_rule_table(opt.store, None, opt.device)


class Curved(torch.nn.Module):
    """A velocity that depends on σ alone, curved in it: the forecast fallback's line misses the curve, a rule of
    three computed outputs holds it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
        self.base = torch.nn.Parameter(torch.randn(4))

    def forward(self, hidden_states, timestep):
        s = (timestep / 1000.0).reshape(-1, 1, 1)
        h = hidden_states * 0.0 + s * self.base
        for b in self.blocks:
            h = h + torch.tanh(b(h)) * 3.0
        return (h,)


class CurvedInputs:
    def make_inputs(self, t: float, batch: int) -> dict:
        return {"hidden_states": torch.zeros(batch, 6, 4), "timestep": torch.full((batch,), float(t))}


def test_fit_lowers_the_error_keeps_the_better_and_saves(tmp_path, caplog):
    tm = CurvedInputs()
    tm.model = Curved().eval()
    opt = _planned(tm)
    with caplog.at_level(logging.INFO, logger="fx_fastcache"):
        got = fastcache.fit_output_rule(opt, lambda: _euler(opt, tm, grad=True), iters=40, lr=0.005)
    errors = [float(e) for e in re.findall(r"iteration \d+, calibration mean log squared error (-?[\d.]+)", caplog.text)]
    lowest = float(re.search(r"the lowest calibration mean log squared error (-?[\d.]+)", caplog.text).group(1))
    assert len(errors) == 5 and lowest < errors[0] - 1.0, caplog.text
    score = got[FRACTION]
    assert score["kept"] and score["fitted"] > score["library"] + 3.0, score
    plan, n = _plan(opt), STEPS
    rules = opt.store.tensors[RULES_KEY]
    assert rules.shape == (n, n, COLUMNS)
    installed = opt.store.tensors[TABLE_KEY][:n]
    torch.testing.assert_close(installed, rules[budget(FRACTION, n) - 1])
    assert (installed[:, 0] == 0).all() and not torch.equal(installed, identity_rows(n))
    assert torch.equal(rules[budget(0.25, n) - 1], identity_rows(n))  # a fraction not fitted
    cached = _euler(opt, tm)
    fastcache.configure(opt, target_fraction=0.25)
    assert torch.equal(opt.store.tensors[TABLE_KEY][:n], identity_rows(n))
    fastcache.configure(opt, target_fraction=FRACTION)

    seen = []  # search_plan's trial plans run without the rule, which is fitted for its own plan

    def generate():
        seen.append(torch.equal(opt.store.tensors[TABLE_KEY][:n], identity_rows(n)))
        return _euler(opt, tm)

    fastcache.search_plan(opt, generate, max_runs=2)
    assert seen and all(seen)
    assert _plan(opt) == plan  # the search kept the plan (on this model), so its rule is installed again
    torch.testing.assert_close(opt.store.tensors[TABLE_KEY][:n], rules[budget(FRACTION, n) - 1])
    torch.testing.assert_close(_euler(opt, tm), cached, rtol=0, atol=0)

    path = tmp_path / "rule.safetensors"
    fastcache.save_calibration(opt, path)
    other = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=FRACTION,
                               output_rule="fitted")
    fastcache.load_calibration(other, path)
    torch.testing.assert_close(_euler(other, tm), cached, rtol=0, atol=0)
    assert _plan(other) == plan

    with caplog.at_level(logging.WARNING, logger="fx_fastcache"):  # a new plan: the rule is dropped
        fastcache.configure(other, warmup_steps=3)
    assert "drops the output rules fit_output_rule fitted" in caplog.text
    assert torch.equal(other.store.tensors[TABLE_KEY][:n], identity_rows(n))


def test_a_fit_that_loses_is_not_kept(caplog):
    """On a random tiny model the library's block forecast beats a rule of the outputs: the fraction keeps it; the
    choice on held-out generations (``validate``); the fit minimises the objective asked for."""
    tm = make_tiny("tiny-sd3")
    opt = _planned(tm)
    library = _euler(opt, tm)
    got = fastcache.fit_output_rule(opt, lambda: _euler(opt, tm, grad=True), iters=2)[FRACTION]
    assert not got["kept"] and got["fitted"] < got["library"], got
    assert torch.equal(opt.store.tensors[TABLE_KEY][:STEPS], identity_rows(STEPS))
    torch.testing.assert_close(_euler(opt, tm), library, rtol=0, atol=0)

    # the choice on held-out generations: validate() runs three times (uncached, library's rules, rule), generate()
    # only for the fit (once uncached, once per Adam step), and the scores are validate()'s images'
    calls = {"fit": 0, "held": 0}

    def count(kind: str, seeds, grad: bool = False):
        calls[kind] += 1
        return _euler(opt, tm, seeds=seeds, grad=grad)

    held = fastcache.fit_output_rule(opt, lambda: count("fit", (3, 4), grad=True), iters=2,
                                     validate=lambda: count("held", (7, 8)))[FRACTION]
    assert calls == {"fit": 3, "held": 3}, calls
    assert not held["kept"] and held["library"] != got["library"], (held, got)
    again = fastcache.fit_output_rule(opt, lambda: _euler(opt, tm, grad=True), iters=2,
                                      validate=lambda: _euler(opt, tm, seeds=(3, 4)))[FRACTION]
    assert again == got  # the fit's own images as validate(): the same choice and scores as without it

    # objective="worst_quarter" fits the worst quarter's log squared errors (here, of 4 images, the worst one's), not
    # their mean: its first loss is the largest of the four images' and lies above the mean objective's
    assert set(FIT_LOSSES) == set(SEARCH_OBJECTIVES)
    assert float(FIT_LOSSES["worst_quarter"][0](torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0]))) == 4.5  # the worst 2 of 5
    first_loss = {}
    for objective in ("mean", "worst_quarter"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fx_fastcache"):
            fastcache.fit_output_rule(opt, lambda: _euler(opt, tm, seeds=(3, 5, 7, 9), grad=True), iters=1,
                                      objective=objective)
        name = FIT_LOSSES[objective][1]
        first_loss[objective] = float(re.search(rf"iteration 0, calibration {name} log squared error (-?[\d.]+)",
                                                caplog.text).group(1))
    assert first_loss["worst_quarter"] > first_loss["mean"] + 0.01, first_loss  # equal if it fitted the mean


def test_step_dispatch_and_inductor_match_in_graph_eager():
    tm = make_tiny("tiny-sd3", layers=1)  # one block: a shorter inductor compile
    opt = _planned(tm)
    rows = _rows(_plan(opt), seed=2)
    set_rule_table(opt.store, rows, opt.device)
    fastcache.reset(opt)
    want = _euler(opt, tm)
    for decide in ("host", "device"):
        disp = StepDispatch(opt, compile_mode="eager", decide=decide)
        torch.testing.assert_close(_euler(disp, tm), want, rtol=1e-5, atol=1e-5)
        fastcache.reset(opt)
    compiled = _planned(tm, backend="inductor")
    set_rule_table(compiled.store, rows, compiled.device)
    fastcache.reset(compiled)
    torch.testing.assert_close(_euler(compiled, tm), want, rtol=1e-4, atol=1e-4)


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"output_rule='learned' is invalid: choose one of \('none', 'fitted'\)"):
        fastcache.FastCacheConfig(policy="planned", output_rule="learned")
    with pytest.raises(ValueError, match="output_rule.*policy='step_forecast'.*use policy='planned'"):
        fastcache.FastCacheConfig(output_rule="fitted")
    tm = make_tiny("tiny-sd3")
    plain = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=FRACTION)
    with pytest.raises(ValueError, match="output_rule='none'; optimize it with"):
        fastcache.fit_output_rule(plain, lambda: _euler(plain, tm, grad=True))
    fresh = fastcache.optimize(tm.model, backend="eager", policy="planned", output_rule="fitted")
    with pytest.raises(ValueError, match="needs a calibrated policy='planned' model"):
        fastcache.fit_output_rule(fresh, lambda: _euler(fresh, tm, grad=True))
    opt = _planned(tm)
    with pytest.raises(ValueError, match="without gradients.*__wrapped__"):
        fastcache.fit_output_rule(opt, lambda: _euler(opt, tm), iters=1)
    with pytest.raises(ValueError, match="called the model 4 times; the plans are for 8 steps"):
        fastcache.fit_output_rule(opt, lambda: _half(opt, tm))
    with pytest.raises(TypeError, match=r"validate=\[1\] must be a callable like generate\(\)"):
        fastcache.fit_output_rule(opt, lambda: _euler(opt, tm, grad=True), validate=[1])
    for bad in ({"iters": -1}, {"iters": 1.5}, {"lr": 0.0}, {"lr": float("nan")}, {"checkpoint": 1},
                {"objective": "max"}, {"min_gain": -1.0}, {"fractions": 0.5}, {"fractions": [1.5]}):
        with pytest.raises(ValueError, match="fit_output_rule"):
            fastcache.fit_output_rule(opt, lambda: _euler(opt, tm, grad=True), **bad)

    def twice():  # classifier-free guidance as two calls per step
        kw = tm.make_inputs(1000.0, 1)
        opt(**kw)
        return opt(**kw)[0]

    with pytest.raises(ValueError, match="twice at one timestep"):
        fastcache.fit_output_rule(opt, twice)
    dit = make_tiny("tiny-dit")  # a learned variance: the output is not the latents' shape
    with pytest.raises(ValueError, match=r"first output \(2, 8, 8, 8\) is not a tensor of its latents' shape \(2, 4, 8, 8\)"):
        run_loop(fastcache.optimize(dit.model, backend="eager", policy="planned", output_rule="fitted"), dit,
                 [1000.0])
    from fx_fastcache.export import installed_schedule
    from fx_fastcache.export.onnx import stateless_module

    with pytest.raises(ValueError, match="output_rule='fitted' is not supported by export"):
        stateless_module(opt, installed_schedule(opt, steps=STEPS), tm.make_inputs(1000.0, 2))


def _half(opt, tm) -> torch.Tensor:
    """Half the calibrated steps."""
    kw = tm.make_inputs(1000.0, 1)
    x = kw["hidden_states"]
    for t in (1000.0, 750.0, 500.0, 250.0):
        x = x - 0.25 * first(opt(**dict(kw, hidden_states=x, timestep=tm.make_inputs(t, 1)["timestep"])))
    return x


def test_bench_option():
    m = parse_method("planned/forecast:noise=1:search=1:fit=150")
    assert m.fit == 150 and m.output_stages()["output_rule"] == "fitted" and "(fitted rule 150)" in m.name
    assert parse_method("planned/forecast:fit=5:search_images=32").search_images == 32
    assert parse_method("planned/forecast").output_stages()["output_rule"] == "none"
    assert parse_method("planned/forecast:fit=40:fit_lr=0.03").fit_lr == 0.03
    assert "(fitted rule 40, lr 0.03)" in parse_method("planned/forecast:fit=40:fit_lr=0.03").name
    with pytest.raises(ValueError, match="fit=x"):
        parse_method("planned/forecast:fit=x")
    with pytest.raises(ValueError, match="fit_lr=LR.*add ':fit=ITERS'"):
        parse_method("planned/forecast:fit_lr=0.03")
    held = parse_method("planned/forecast:fit=40:fit_holdout=16")
    assert held.fit_holdout == 16 and "chosen on 16 more" in held.name
    assert parse_method("planned/forecast:fit=40").fit_holdout == 0
    with pytest.raises(ValueError, match="fit_holdout=N.*add ':fit=ITERS'"):
        parse_method("planned/forecast:fit_holdout=16")
    with pytest.raises(ValueError, match="fit_holdout=0"):
        parse_method("planned/forecast:fit=40:fit_holdout=0")


def test_a_pipeline_fits_through_its_undecorated_call():
    """enable_fastcache(pipe): ``pipe.__call__.__wrapped__`` is the pipeline's call without ``torch.no_grad``, so a
    generate() of latents fits the rule; a fit that loses leaves the pipeline's images as they were."""
    from fx_fastcache.tiny_pipelines import tiny_flux_pipeline

    tp = tiny_flux_pipeline()
    pipe = tp.pipe
    fastcache.enable_fastcache(pipe, backend="eager", policy="planned", target_fraction=0.5, output_rule="fitted")
    with fastcache.calibrate(pipe):
        pipe(**tp.call_kwargs(seed=1))
    before = pipe(**tp.call_kwargs(seed=3, output_type="latent")).images
    frozen = []  # the text encoders run without gradients during the fit (their activations would be kept)

    def generate():
        frozen.append(not any(p.requires_grad for p in pipe.text_encoder.parameters()))
        return pipe.__call__.__wrapped__(pipe, **tp.call_kwargs(seed=2, output_type="latent")).images

    pipe.text_encoder.requires_grad_(True)
    got = fastcache.fit_output_rule(pipe, generate, iters=2)
    assert frozen[:3] == [True] * 3 and all(p.requires_grad for p in pipe.text_encoder.parameters())  # restored
    assert set(got[0.5]) == {"library", "fitted", "kept"} and got[0.5]["fitted"] < got[0.5]["library"]  # random model
    assert not got[0.5]["kept"]
    torch.testing.assert_close(pipe(**tp.call_kwargs(seed=3, output_type="latent")).images, before, rtol=0, atol=0)
