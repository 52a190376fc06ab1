"""The diagnostic scripts in benchmarks/: their forecast rules, plan tables and argument checks (no model run)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fx_fastcache.fallbacks.forecast import forecast_approx

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _stack_with_history(steps):
    rules = _script("slope_rules")
    stack = rules.StackSimulator(nn.ModuleList([nn.Identity()]), joint=False)
    g = torch.Generator().manual_seed(0)
    stack.hist = [(i, (torch.randn(2, 3, generator=g), None)) for i in steps]
    return stack


def test_slope_rule_std_is_the_library_forecast():
    stack = _stack_with_history([0, 2, 3])
    (tp, (rp, _)), (tc, (rc, _)) = stack.hist[-2:]
    x = torch.zeros(2, 3)
    want = forecast_approx(x, torch.tensor(5.0), rc, rp, torch.tensor(float(tc)), torch.tensor(float(tp)),
                           torch.tensor(2))
    torch.testing.assert_close(stack.forecast(5, "std")[0], want)


def test_slope_rules_differ_only_after_adjacent_steps():
    stack = _stack_with_history([0, 2, 3])  # 2 -> 3 adjacent: base2 takes the slope from 0 -> 3
    r0, r3 = stack.hist[0][1][0], stack.hist[2][1][0]
    torch.testing.assert_close(stack.forecast(5, "base2")[0], r3 + (5 - 3) / 3 * (r3 - r0))
    std, base2 = stack.forecast(5, "std")[0], stack.forecast(5, "base2")[0]
    torch.testing.assert_close(stack.forecast(5, "avg")[0], 0.5 * (std + base2))
    assert not torch.allclose(std, base2)
    far = _stack_with_history([0, 3, 6])  # already two apart: every rule is the library's
    for rule in ("base2", "avg"):
        torch.testing.assert_close(far.forecast(8, rule)[0], far.forecast(8, "std")[0])


def test_partial_steps_table_and_bad_letter():
    table_of = _script("partial_steps").table_of
    t = table_of("FSab", n_blocks=4, split=1)
    assert t.tolist() == [[False] * 4, [True] * 4, [False, True, True, True], [True, False, False, False]]
    with pytest.raises(ValueError, match="step 1 is 'x'"):
        table_of("Fx", n_blocks=4, split=1)



@pytest.mark.parametrize("plan,words", [("1,3", "warm-up steps 0, 1"), ("0,3", "warm-up steps 0, 1"),
                                        ("0,a", "integers"), ("0,1,20", "0..19")])
def test_plan_neighbours_refuses_bad_plans(plan, words, capsys):
    with pytest.raises(SystemExit):
        _script("plan_neighbours").main(["--plan", plan])
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("args,words", [(["--plan", "FFS"], "one letter, F or S, per step (20)"),
                                        (["--plan", "F" * 20, "--mask", "NX" * 10], "one letter, N or O, per step")])
def test_noise_steps_refuses_bad_plans_and_masks(args, words, capsys):
    with pytest.raises(SystemExit):
        _script("noise_steps").main(args)
    assert words in capsys.readouterr().err


def test_noise_steps_variant_slope_is_the_library_forecast_at_gain_one():
    """benchmarks/noise_steps.py's forecast variants: gain 1 in σ is the library module, gain 0 holds the last ε,
    and the log-SNR variant extrapolates linearly in log((1 − σ) / σ)."""
    from fx_fastcache.runtime.noise_forecast import NoiseForecast
    ns = _script("noise_steps")
    g = torch.Generator().manual_seed(0)
    shape = (2, 3)
    calls = [(False, 1.0), (False, 0.9), (True, 0.8), (False, 0.7), (True, 0.6)]  # (skipped, σ)
    data = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in calls]

    def outputs(slope=None):
        cls = NoiseForecast if slope is None else type("Variant", (NoiseForecast,), {"slope": slope})
        mod = cls(shape, torch.device("cpu"), 1000.0, torch.ones(()))
        return [mod(torch.tensor(skipped), torch.tensor(i == 0), torch.tensor(sig * 1000), x, v)
                for i, ((skipped, sig), (x, v)) in enumerate(zip(calls, data))]

    lib = outputs()
    for a, b in zip(lib, outputs(ns.variant_slope(1.0, "sigma"))):
        torch.testing.assert_close(a, b)
    x, v = data[2]
    eps1 = data[1][0] + 0.1 * data[1][1]  # ε = x + (1 − σ) v of the last computed step (σ = 0.9)
    torch.testing.assert_close(outputs(ns.variant_slope(0.0, "sigma"))[2], (eps1 - x) / 0.2)
    eps0 = data[0][0]  # σ = 1: ε is the latent itself
    lam = [ns.to_variable(torch.tensor(q), "logsnr") for q in (1.0, 0.9, 0.8)]
    eps_hat = eps1 + (lam[2] - lam[1]) / (lam[1] - lam[0]) * (eps1 - eps0)
    torch.testing.assert_close(outputs(ns.variant_slope(1.0, "logsnr"))[2], (eps_hat - x) / 0.2)
    assert not torch.allclose(lib[2], (eps_hat - x) / 0.2)


def test_output_drift_is_the_library_correction():
    """benchmarks/output_forecasts.py's host copy of the drift correction gives the library module's outputs."""
    from fx_fastcache.runtime.drift import DriftCorrection

    drift = _script("output_forecasts").Drift(2.0)
    module = DriftCorrection((2, 3), torch.device("cpu"), torch.tensor(2.0))
    g = torch.Generator().manual_seed(0)
    sig = torch.linspace(1.0, 0.0, 11)[:-1]
    corrected = []
    for k, letter in enumerate("FFSFSSSFSS"):
        v = torch.randn(2, 3, generator=g)
        want = module(letter == "S", torch.tensor(k == 0), sig[k], v)
        torch.testing.assert_close(drift(letter == "F", sig[k], v), want)
        corrected.append(not torch.equal(want, v))
    assert [k for k, c in enumerate(corrected) if c] == [3, 7]  # the computed steps after forecast ones


def test_output_forecasts_search_moves_keep_the_cost_and_the_first_steps():
    of = _script("output_forecasts")
    start = "FFSFSSSFSSSFSSSSFSSS"
    moves = of.neighbours(start, whole_only=False)
    assert moves and all(of.cost(q) <= of.cost(start) and q[:2] == "FF" and len(q) == 20 for q in moves)
    assert any("C" in q for q in moves) and not any("C" in q for q in of.neighbours(start, whole_only=True))
    with pytest.raises(SystemExit):
        of.main(["--plans", "FFX"])


def test_output_forecasts_random_plans_are_plausible_and_reproducible():
    """``--random-plans`` draws distinct plans of whole steps that compute steps 0 and 1, the first further step
    by step 5 and each 2–8 steps after the last; the same seed draws the same plans; asking for more than the
    828 plausible plans of 6 computed steps is refused, naming the count."""
    of = _script("output_forecasts")
    plans = of.random_plans(150, 6, 0)
    assert plans == of.random_plans(150, 6, 0) != of.random_plans(150, 6, 1)
    assert len(set(plans)) == 150 and all(len(p) == 20 and set(p) <= set("FS") for p in plans)
    for p in plans:
        steps = [i for i, c in enumerate(p) if c == "F"]
        assert len(steps) == 6 and steps[:2] == [0, 1] and steps[2] <= 5
        assert all(2 <= b - a <= 8 for a, b in zip(steps[2:], steps[3:]))
    assert len(of.random_plans(828, 6, 0)) == 828
    with pytest.raises(ValueError, match="--random-plans 829: between 1 and the 828"):
        of.random_plans(829, 6, 0)


def test_output_forecasts_errors_are_the_rules_miss_at_computed_steps():
    """``errors``: at a computed step after a skipped one, each image's relative error of the rule's guided
    velocity; zero where the outputs are linear in σ (``lin`` extrapolates them exactly), the hand-computed value
    where they are not; nothing at step 0 (no history to forecast from)."""
    of = _script("output_forecasts")
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4, 3, generator=g) for _ in range(3))  # rows [cond0, cond1, uncond0, uncond1]
    for quad, want_zero in ((0.0, True), (1.0, False)):
        outs = [a + k * b + quad * k * k * c for k in (0, 1, 3)]
        model = lambda **kw: (outs.pop(0),)  # noqa: E731
        rows = of.PlannedRows(model, "FFSF", "lin", "lin", errors=True)
        for _ in range(4):
            rows(hidden_states=torch.zeros(4, 3))
        assert list(rows.errors) == [1, 3]
        guided = lambda v: v[2:] + 2.0 * (v[:2] - v[2:])  # noqa: E731
        v3, pred = a + 3 * b + quad * 9 * c, a + 3 * b + quad * 3 * c  # lin through steps 0 and 1 (σ linear in k)
        want = (guided(pred) - guided(v3)).norm(dim=1) / guided(v3).norm(dim=1)
        torch.testing.assert_close(rows.errors[3], want)
        assert bool((rows.errors[3] < 1e-6).all()) is want_zero
    table = of.error_table({3: torch.tensor([0.1, 0.5, 0.2])}, torch.tensor([30.0, 20.0, 40.0]), [7, 8, 9])
    assert table.splitlines()[1].split()[:2] == ["8", "20.00"] and "ranks 1 of 3" in table


def test_output_forecasts_guidance_ratio_and_auc():
    """``guidance_ratio``: each image's ``‖c − u‖ / ‖u‖`` at every computed step, step 0 included; the AUC is the
    chance that an image below the bar has the larger value (ties half), and says so when no image is below."""
    of = _script("output_forecasts")
    g = torch.Generator().manual_seed(1)
    outs = [torch.randn(4, 3, generator=g) for _ in range(3)]  # rows [cond0, cond1, uncond0, uncond1]
    want = {k: (o[:2] - o[2:]).norm(dim=1) / o[2:].norm(dim=1) for k, o in zip((0, 1, 3), outs)}
    pending = list(outs)
    rows = of.PlannedRows(lambda **kw: (pending.pop(0),), "FFSF", "lin", "lin", errors=True)
    for _ in range(4):
        rows(hidden_states=torch.zeros(4, 3))
    assert list(rows.guidance_ratio) == [0, 1, 3]
    for k in want:
        torch.testing.assert_close(rows.guidance_ratio[k], want[k])
    q = torch.tensor([20.0, 30.0, 25.0, 40.0])  # images 0 and 2 below 28
    values = {0: torch.tensor([0.9, 0.1, 0.5, 0.5]), 3: torch.tensor([0.1, 0.2, 0.3, 0.4])}
    # step 0: 0.9 beats both, 0.5 beats 0.1 and ties 0.5: 3.5 / 4; step 3: 0.1 beats none, 0.3 beats 0.2: 1 / 4
    assert of.auc_line(values, q, 28.0).endswith("step 0 0.88, step 3 0.25")
    assert "2 of 4 images below 28 dB" in of.auc_line(values, q, 28.0)
    assert "one side" in of.auc_line(values, q, 10.0)


def test_output_forecasts_per_image_oracle():
    """The per-image oracle takes each image's best PSNR among the K plans with the highest mean."""
    of = _script("output_forecasts")
    q = torch.tensor([[40.0, 20.0, 30.0],   # mean 30: the best plan
                      [10.0, 35.0, 20.0],   # mean 21.7
                      [25.0, 25.0, 25.0]])  # mean 25: second
    got = of.per_image_oracle(q, ks=(1, 2, 3, 5))
    assert [k for k, _, _ in got] == [1, 2, 3]
    assert got[0][1:] == pytest.approx((30.0, 20.0))
    assert got[1][1:] == pytest.approx(((40 + 25 + 30) / 3, 25.0))
    assert got[2][1:] == pytest.approx(((40 + 35 + 30) / 3, 30.0))


def test_output_forecasts_trajectory_signals():
    """``--signals``' values from what the computed steps saw, by hand on two images; steps at or after ``before``
    are left out."""
    of = _script("output_forecasts")
    x = torch.tensor([[1.0, -1.0], [2.0, 2.0]])
    c0, u0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    c1, u1 = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    seen = {0: (1.0, x, c0, u0), 1: (0.5, x, c1, u1), 3: (0.2, x, c1, u1)}
    got = of.trajectory_signals(seen, before=3)
    assert sorted(got) == sorted([f"{n} {k}" for n in ("x0 norm", "x0 ink", "cos(c,u)", "gdmax") for k in (0, 1)]
                                 + ["dx0 0-1", "dx0max 0-1", "dg 0-1"])
    g0, g1 = u0 + 2 * (c0 - u0), u1 + 2 * (c1 - u1)  # [[2, -1], [0, 1]], [[3, -1], [0, 5]]
    x00, x01 = x - g0, x - 0.5 * g1  # [[-1, 0], [2, 1]], [[-0.5, -0.5], [2, -0.5]]
    torch.testing.assert_close(got["x0 norm 1"], x01.norm(dim=1))
    torch.testing.assert_close(got["x0 ink 0"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(got["cos(c,u) 0"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(got["gdmax 1"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(got["dx0 0-1"], (x01 - x00).norm(dim=1) / x01.norm(dim=1))
    torch.testing.assert_close(got["dx0max 0-1"], torch.tensor([0.5 / 0.5, 1.5 / 2.0]))
    torch.testing.assert_close(got["dg 0-1"], (g1 - g0).norm(dim=1) / g1.norm(dim=1))


def test_output_forecasts_rescue_oracle():
    """Images below the bar on the first plan take their best of the others, paying those plans' steps."""
    of = _script("output_forecasts")
    q = torch.tensor([[20.0, 30.0, 25.0, 40.0],   # the first plan (6 steps): images 0 and 2 below 28
                      [33.0, 10.0, 24.0, 10.0],   # 7 steps
                      [29.0, 10.0, 27.0, 10.0]])  # 8 steps
    mean, worst, replaced = of.rescue_oracle(q, [6.0, 7.0, 8.0], 28.0)
    assert (mean, worst) == pytest.approx(((33 + 30 + 27 + 40) / 4, 27.0))
    assert replaced == pytest.approx(100 * (1 - (6 + 6 + 7 + 8) / 4 / 20))


@pytest.mark.parametrize("args,words", [
    (["--plans", "FFSFSSFSSSFSSSSFSSSS", "--per-image"], "at least two"),
    (["--random-plans", "900"], "between 1 and the 828"),
    (["--random-plans", "3", "--computed", "2"], "--computed 2"),
    (["--plans", "FFSFSSFSSSFSSSSFSSSS", "--first-seeds", "1000", "1008"], "at least 16 from the others"),
    (["--plans", "FFSFSSFSSSFSSSSFSSSS", "--first-seeds", "-16"], "of at least 0"),
    (["--search", "FFSFSSFSSSFSSSSFSSSS", "--first-seeds", "8"], "with --search"),
    (["--plans", "FFSFSSFSSSFSSSSFSSSS", "--signals", "0"], "--signals 0"),
    (["--search", "FFSFSSFSSSFSSSSFSSSS", "--classes"], "--classes reports on the plans given"),
])
def test_output_forecasts_refuses_bad_oracle_arguments(args, words, capsys):
    with pytest.raises(SystemExit):
        _script("output_forecasts").main(args)
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("rule,share", [("dhold", 0.0), ("dhalf", 0.5)])
def test_output_forecasts_guidance_difference_rules(rule, share):
    """``dhold``/``dhalf`` forecast the CFG rows' mean as ``lin`` does and keep the last computed guidance
    difference (or that plus ``share`` of its linear extrapolation) at a skipped step."""
    of = _script("output_forecasts")
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(4, 3, generator=g) for _ in range(3)]
    model = lambda **kw: (outs.pop(0),)  # noqa: E731  (the two computed steps' outputs, [cond; uncond])
    computed = [outs[0], outs[1]]
    got = {r: of.PlannedRows(model, "FFS", r, "lin") for r in ("lin", rule)}
    x = torch.zeros(4, 3)
    res = {}
    for r, rows in got.items():
        outs[:] = [computed[0], computed[1]]
        res[r] = [rows(hidden_states=x)[0] for _ in range(3)][-1]
    lin, out = res["lin"], res[rule]
    c, u = out.chunk(2)
    lc, lu = lin.chunk(2)
    torch.testing.assert_close(0.5 * (c + u), 0.5 * (lc + lu))
    d_last = computed[1][:2] - computed[1][2:]
    torch.testing.assert_close(c - u, d_last + share * ((lc - lu) - d_last))
    assert not torch.allclose(c - u, lc - lu)


def test_output_forecasts_noise_anchored_rules():
    """``epsl`` hands the sampler the velocity whose predicted noise ``x + (1 − σ) v`` is the noise of the last two
    computed steps extrapolated linearly in σ; ``epsc`` keeps the last one; ``epsw`` blends ``epsl`` with ``lin`` by
    ``1 − σ``."""
    of = _script("output_forecasts")
    g = torch.Generator().manual_seed(0)
    hist = []
    for s in (1.0, 0.9):
        x, v = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
        hist.append({"s": torch.tensor(s), "v": v, "x": x, "x0": x - s * v, "eps": x + (1 - s) * v})
    s, x = torch.tensor(0.7), torch.randn(2, 3, generator=g)
    eps_lin = hist[1]["eps"] + (s - 0.9) / (0.9 - 1.0) * (hist[1]["eps"] - hist[0]["eps"])
    torch.testing.assert_close(x + (1 - s) * of._skip(hist, s, x, "epsl"), eps_lin)
    torch.testing.assert_close(x + (1 - s) * of._skip(hist, s, x, "epsc"), hist[1]["eps"])
    lin = of._skip(hist, s, x, "lin")
    torch.testing.assert_close(of._skip(hist, s, x, "epsw"), (1 - s) * of._skip(hist, s, x, "epsl") + s * lin)


@pytest.mark.parametrize("peer,acts", [("cache_dit", 2.0), ("cache_dit_taylorseer", 5.0)])
def test_memory_counts_cache_dit_state_in_activations(peer, acts):
    """benchmarks/memory.py's cache-dit columns: DBCache holds the first block's residual and the stack's; its
    TaylorSeer calibrator (order 1, every step computed) the value and derivative, now and before, instead."""
    pytest.importorskip("cache_dit", reason="the peer needs `pip install cache-dit` (fx-fastcache[peers])")
    mem = _script("memory")
    r = mem._peer_state_at(mem.CONFIGS["pixart"], peer, 6, mem.SMALL["pixart"])
    assert r["activations"] == pytest.approx(acts) and r["text_acts"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_offload_round_trip_refuses_cuda_without_a_gpu():
    with pytest.raises(SystemExit, match=r"no CUDA device here.*--device cpu"):
        _script("offload_round_trip").main(["--device", "cuda"])


def test_nested_plans_grow_the_base_by_the_best_steps():
    nested = _script("nested_plans")
    want = {4, 12}  # a score that rewards computing steps 4 and 12, and step 4 more

    def score(plan):
        return 2 * (4 in plan) + (12 in plan) - 0.01 * len(plan)

    assert nested.grow([0, 1, 3], 1, score) == [0, 1, 3, 4]
    assert nested.grow([0, 1, 3], 2, score) == [0, 1, 3, 4, 12]
    assert set(nested.grow([0, 1, 3], -1, score)) - {0, 1, 3} == want  # every pair tried
    assert nested.parse_steps("10, 0,3,3") == [0, 3, 10]


@pytest.mark.parametrize("args, words", [
    (["--base", "1,3"], "must include 0"),
    (["--base", "0,20"], "must include 0 and lie in [0, 20)"),
    (["--base", "0,a"], "comma-separated integers"),
    (["--base", "0,1", "--add", "-2"], "--add -2"),
])
def test_nested_plans_refuses_bad_plans(args, words, capsys):
    with pytest.raises(SystemExit):
        _script("nested_plans").main(args)
    assert words in capsys.readouterr().err


def test_lookahead_nodes_at_lam_zero_is_the_library_noise_forecast_and_drift():
    """benchmarks/lookahead_nodes.py at lam 0 gives the velocities of the library's NoiseForecast then DriftCorrection
    (the graph's order) on the same model; lam > 0 evaluates later computed steps ahead, between the schedule's σ."""
    from fx_fastcache.runtime.drift import DriftCorrection
    from fx_fastcache.runtime.noise_forecast import NoiseForecast

    ln = _script("lookahead_nodes")
    g = torch.Generator().manual_seed(0)
    shape, cpu = (2, 3), torch.device("cpu")
    w = torch.randn(3, 3, generator=g)
    calls = []

    def eps_fn(x, s):
        calls.append(s)
        v = torch.tanh(x @ w + s)
        return x + (1 - s) * v, v

    sig = torch.linspace(1.0, 0.0, 11).tolist()
    computed = {0, 1, 3, 6, 8}
    x0 = torch.randn(shape, generator=g)
    got = ln.generate(eps_fn, x0, sig, computed, 0.0, 2.0)
    noise = NoiseForecast(shape, cpu, 1.0, torch.ones(()))
    drift = DriftCorrection(shape, cpu, torch.tensor(2.0))
    x = x0
    for k in range(10):
        skipped = torch.tensor(k not in computed)
        v = torch.zeros(shape) if bool(skipped) else torch.tanh(x @ w + sig[k])  # a skipped step's is replaced
        t, new = torch.tensor(sig[k]), torch.tensor(k == 0)
        x = x + (sig[k + 1] - sig[k]) * drift(skipped, new, t, noise(skipped, new, t, x, v))
    torch.testing.assert_close(got, x)
    calls.clear()
    ahead = ln.generate(eps_fn, x0, sig, computed, 0.5, 2.0)
    want = [sig[0], sig[1], (sig[4] + sig[5]) / 2, sig[7], sig[9]]  # 3 → 4.5, 6 → 7, 8 → 9 (the end is step 10)
    assert calls == pytest.approx(want)
    assert not torch.allclose(ahead, got)

    # per CFG row (what the graph sees): at lam 0 the rows' forecasts combine to the guided one's, ahead they do not
    w_u = torch.randn(3, 3, generator=g)

    def rows_fn(x2, s):
        v = torch.cat([torch.tanh(x2[:2] @ w + s), torch.tanh(x2[2:] @ w_u - s)])
        return x2 + (1 - s) * v, v

    def guided_fn(x, s):
        v = ln.guided(rows_fn(torch.cat([x, x]), s)[1], 2.0)
        return x + (1 - s) * v, v

    torch.testing.assert_close(ln.generate(rows_fn, x0, sig, computed, 0.0, 2.0, rows=True),
                               ln.generate(guided_fn, x0, sig, computed, 0.0, 2.0))
    assert not torch.allclose(ln.generate(rows_fn, x0, sig, computed, 0.5, 2.0, rows=True),
                              ln.generate(guided_fn, x0, sig, computed, 0.5, 2.0))


def test_lookahead_nodes_interpolates_between_nodes_and_refuses_bad_plans():
    ln = _script("lookahead_nodes")
    a, b, c = torch.zeros(2), torch.ones(2), torch.full((2,), 3.0)
    nodes = [(1.0, a), (0.5, b), (0.25, c)]
    torch.testing.assert_close(ln.eps_at(nodes, 0.75), torch.full((2,), 0.5))  # between the first two
    torch.testing.assert_close(ln.eps_at(nodes, 0.0), torch.full((2,), 5.0))  # past the last: the last two's line
    torch.testing.assert_close(ln.eps_at(nodes[:1], 0.3), a)  # one node: held
    assert ln.parse_plan("0,1,3@2", 20) == ({0, 1, 3}, 2.0)
    assert ln.parse_plan("0,1,3", 20) == ({0, 1, 3}, None)
    for bad, words in (("1,3", "include step 0"), ("0,20", "0..19"), ("0,x", "computed steps")):
        with pytest.raises(SystemExit, match=words):
            ln.parse_plan(bad, 20)


def test_noise_steps_rules_from_three_computed_steps():
    """benchmarks/noise_steps.py's ``--rule`` variants: ``std`` is the library module's; after three computed steps
    ``wide`` extrapolates through the first and last, ``avg3`` averages the two lines, ``base2`` takes the wide line
    when the last two computed steps are neighbours, ``quad`` is the parabola through all three."""
    from fx_fastcache.runtime.noise_forecast import NoiseForecast

    ns = _script("noise_steps")
    g = torch.Generator().manual_seed(0)
    shape, cpu = (2, 3), torch.device("cpu")
    sigmas, skipped = [1.0, 0.9, 0.8, 0.7, 0.6], [False, False, False, True, True]
    data = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in sigmas]

    def outputs(rule=None):
        cls = NoiseForecast
        if rule is not None:
            cls = type("Variant", (NoiseForecast,), {"estimate": ns.variant_estimate(rule, NoiseForecast.estimate)})
            ns.keep_third_step(cls)
        mod = cls(shape, cpu, 1.0, torch.ones(()))
        return [mod(torch.tensor(sk), torch.tensor(i == 0), torch.tensor(s), x, v)
                for i, (sk, s, (x, v)) in enumerate(zip(skipped, sigmas, data))]

    for a, b in zip(outputs(), outputs("std")):
        torch.testing.assert_close(a, b)
    eps = [x + (1 - s) * v for s, (x, v) in zip(sigmas[:3], data[:3])]  # the computed steps' ε (σ 1, 0.9, 0.8)
    x3 = data[3][0]
    std = eps[2] + (0.7 - 0.8) / (0.8 - 0.9) * (eps[2] - eps[1])
    wide = eps[2] + (0.7 - 0.8) / (0.8 - 1.0) * (eps[2] - eps[0])
    quad = eps[0] * (0.7 - 0.9) * (0.7 - 0.8) / (0.1 * 0.2) + eps[1] * (0.7 - 1.0) * (0.7 - 0.8) / (-0.1 * 0.1) \
        + eps[2] * (0.7 - 1.0) * (0.7 - 0.9) / (-0.2 * -0.1)
    for rule, eps_hat in (("wide", wide), ("avg3", (std + wide) / 2), ("base2", wide), ("quad", quad)):
        torch.testing.assert_close(outputs(rule)[3], (eps_hat - x3) / 0.3, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outputs()[3], (wide - x3) / 0.3)


def test_noise_steps_lowpass_keeps_smooth_slopes():
    """``lowhold`` keeps only the slope's high frequencies: a constant slope is all low, so it is held entirely."""
    ns = _script("noise_steps")
    flat = torch.full((1, 1, 8, 8), 2.0)
    torch.testing.assert_close(ns.lowpass(flat), flat)
    spike = torch.zeros(1, 1, 8, 8)
    spike[0, 0, 4, 4] = 1.0
    low = ns.lowpass(spike)
    assert float(low.max()) < 0.1 and float(low.sum()) > 0.5  # spread out, not removed
    with pytest.raises(ValueError, match="image-shaped"):
        ns.lowpass(torch.zeros(2, 3))


class _ToyTrained:
    """Stands in for :class:`fx_fastcache.trained.TrainedModel` with a cheap nonlinear velocity."""

    in_channels, sample_size, dtype, device = 1, 4, torch.float32, torch.device("cpu")

    def model(self, hidden_states, timestep, class_labels, return_dict=False):
        return (torch.tanh(hidden_states * (1 + timestep.view(-1, 1, 1, 1) / 1000) + 0.1 * class_labels.view(-1, 1, 1, 1)),)

    def call_kwargs(self, x, sigma, y):
        s = torch.as_tensor(sigma, dtype=torch.float32).expand(len(x))
        return {"hidden_states": x, "timestep": s * 1000, "class_labels": y, "return_dict": False}

    def unpack_output(self, out):
        return out


@pytest.mark.parametrize("report,words", [
    (["--errors"], ["errors:", "corr(error, PSNR)", "AUC"]),
    (["--guidance"], ["guidance:", "corr(guidance, PSNR)", "AUC"]),
    (["--signals", "2", "--bar", "200"], ["every image is on one side of 200 dB"]),
    (["--errors", "--guidance", "--signals", "4", "--bar", "200"], ["errors:", "guidance:", "one side of 200 dB"]),
    (["--classes", "--bar", "200"], ["16 of 16 images below 200 dB, in 10 of 10 classes", "per class, mean (worst)",
                                     "noise: every image is on one side of 200 dB"]),
])
def test_output_forecasts_reports_run_alone_or_together(report, words, monkeypatch, capsys):
    """Each per-image report runs on its own and with the others (on a toy model standing in for the trained one)."""
    of = _script("output_forecasts")
    monkeypatch.setattr(of, "load_trained", lambda name: _ToyTrained())
    of.main(["--plans", "FFSFSSFSSSFSSSSFSSSS", *report])
    out = capsys.readouterr().out
    for w in words:
        assert w in out
    assert ("signals" in out) == ("--signals" in report)


def test_output_forecasts_classes_report_names_the_images_below_the_bar_and_ranks_the_noise():
    """``--classes``: the images below the bar with their classes, each class's mean (worst), and the AUC of each
    noise statistic over all images and each half (here the larger noise is exactly on the images below)."""
    of = _script("output_forecasts")
    q = torch.tensor([30.0, 20.0, 40.0, 25.0])
    text = of.class_report(q, [7, 8, 9, 10], [0, 1, 0, 2], 28)
    assert "2 of 4 images below 28 dB, in 2 of 3 classes: 8 (class 1) 20.0, 10 (class 2) 25.0" in text
    assert "per class, mean (worst): 0: 35.0 (30.0), 1: 20.0 (20.0), 2: 25.0 (25.0)" in text
    noise = torch.zeros(4, 1, 4, 4)
    noise[1] += 1.0
    noise[3] += 2.0
    stats = of.noise_statistics(noise)
    assert set(stats) == {"norm", "mean", "center norm", "avg2 norm", "avg2 max", "avg4 norm", "avg4 max"}
    torch.testing.assert_close(stats["avg4 max"], torch.tensor([0.0, 1.0, 0.0, 2.0]))
    report = of.noise_report(stats, q, 28)
    assert "the 2 of 4 images below 28 dB" in report and "(1 and 1 below)" in report
    assert "    mean         1.00  1.00 1.00" in report
    assert "nothing to detect" in of.noise_report(stats, q, 10)


def test_fitted_solver_starts_as_the_forecast_rule():
    """benchmarks/fitted_solver.py's interval rule at ``--init lin`` gives the images of the forecast rule
    (output_forecasts.py's ``lin``) on the same plan, and its frozen-velocity replay of a run gives that run."""
    from fx_fastcache.trained import sample

    fs, of = _script("fitted_solver"), _script("output_forecasts")
    tm, plan, seeds, classes = _ToyTrained(), [0, 1, 3, 8, 13, 18], [3, 4], [1, 7]
    letters = "".join("F" if i in plan else "S" for i in range(20))
    ref = sample(tm, classes, seeds, steps=20, model=of.PlannedRows(tm.model, letters, "lin", "lin"))
    solver = fs.FittedSolver(plan, torch.linspace(1.0, 0.0, 21), 3, "lin")
    x0, y = fs.noise(tm, seeds), torch.tensor(classes)
    rec = []
    with torch.no_grad():
        out = solver(tm, x0, y, record=rec)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(solver(tm, x0, y, frozen=[(v, x, 0.0) for v, x in rec]), ref)
    assert not torch.allclose(out, sample(tm, classes, seeds, steps=20))  # the rule is not the full run


@pytest.mark.parametrize("args,words", [(["--plan", "1,2,3"], "1,2,3"), (["--plan", "0,3,2"], "0,3,2"),
                                        (["--plan", "0,5,20"], "0,5,20"),
                                        (["--plan", "0,1", "--base", "library", "--frozen", "2"], "--frozen"),
                                        (["--plan", "0,1", "--drift", "2"], "--base library"),
                                        (["--plan", "0,1", "--jacobian", "fit"], "--frozen"),
                                        (["--plan", "0,1", "--calibration-first", "990"], "overlap"),
                                        (["--plan", "0,1", "--calibration-first", "90", "--unseen", "8"], "overlap"),
                                        (["--plan", "0,1", "--calibration", "8", "--batch", "8"], "--batch 8"),
                                        (["--plan", "0,1", "--batch", "4", "--frozen", "2"], "--frozen"),
                                        (["--plan", "0,1", "--mine", "5"], "--mine 5")])
def test_fitted_solver_refuses_bad_arguments(args, words, capsys):
    with pytest.raises(SystemExit):
        _script("fitted_solver").main(args)
    assert words in capsys.readouterr().err


def test_fitted_solver_correction_starts_as_the_library_rules(monkeypatch):
    """``--base library`` with a zero correction gives output_forecasts.py's emulation of the library (noise forecast
    + drift correction); a nonzero correction moves every image."""
    from fx_fastcache.trained import sample

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # rows() imports output_forecasts as the script does
    fs, of = _script("fitted_solver"), _script("output_forecasts")
    tm, plan, seeds, classes = _ToyTrained(), [0, 1, 3, 8, 13, 18], [3, 4], [1, 7]
    letters = "".join("F" if i in plan else "S" for i in range(20))
    ref = sample(tm, classes, seeds, steps=20, model=of.PlannedRows(tm.model, letters, "epsl", "lin", 2.0))
    corr = fs.CorrectedRows(plan, torch.linspace(1.0, 0.0, 21), 3, 2.0)
    torch.testing.assert_close(sample(tm, classes, seeds, steps=20, model=corr.rows(tm.model)), ref)
    with torch.no_grad():
        corr.e.fill_(0.05)
    moved = sample(tm, classes, seeds, steps=20, model=corr.rows(tm.model))
    assert ((moved - ref).flatten(1).abs().amax(1) > 1e-3).all()


def test_fitted_solver_fit_lowers_the_calibration_error():
    """Gradient descent through the sampler (``adam_fit``) moves the rules and lowers the loss it reports."""
    import types

    from fx_fastcache.trained import sample

    fs = _script("fitted_solver")
    tm, plan, seeds, classes = _ToyTrained(), [0, 1, 3, 8, 13, 18], [3, 4, 5, 6], [1, 7, 2, 0]
    solver = fs.FittedSolver(plan, torch.linspace(1.0, 0.0, 21), 3, "lin")
    x0, y, ref = fs.noise(tm, seeds), torch.tensor(classes), sample(tm, classes, seeds, steps=20)
    with torch.no_grad():
        before, _ = fs.loss_of(solver(tm, x0, y), ref, 0.0)
    fs.adam_fit(solver.parameters(), lambda idx: solver(tm, x0, y), ref,
                types.SimpleNamespace(iters=30, lr=0.002, worst=0.0, batch=0, batch_seed=0, mine=0))
    with torch.no_grad():
        after, _ = fs.loss_of(solver(tm, x0, y), ref, 0.0)
    assert float(after) < float(before) - 0.5  # the mean log squared error: 4 dB better (-8.9 to -9.9 here)
    # --batch 2: each step fits 2 of the 4 images, drawn afresh; the fit still lowers the loss on all of them
    seen = []
    solver = fs.FittedSolver(plan, torch.linspace(1.0, 0.0, 21), 3, "lin")
    fs.adam_fit(solver.parameters(), lambda idx: seen.append(idx.tolist()) or solver(tm, x0[idx], y[idx]), ref,
                types.SimpleNamespace(iters=30, lr=0.002, worst=0.0, batch=2, batch_seed=0, mine=0))
    with torch.no_grad():
        assert float(fs.loss_of(solver(tm, x0, y), ref, 0.0)[0]) < float(before) - 0.3  # -9.42 here
    assert all(len(b) == len(set(b)) == 2 for b in seen) and len({tuple(b) for b in seen}) > 1
    # --mine 2: the 2 worst images by the score, scored again every 2 steps
    scores = iter([torch.tensor([30.0, 10.0, 40.0, 20.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])])
    mined = fs.batches(4, types.SimpleNamespace(iters=3, batch=2, batch_seed=0, mine=2), score=lambda: next(scores))
    assert [b.tolist() for b in mined] == [[1, 3], [1, 3], [0, 2]]
