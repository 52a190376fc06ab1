"""fastcache.search_plan: the planned steps chosen on whole generations."""
from __future__ import annotations

import itertools
import logging
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fx_fastcache as fastcache
from fx_fastcache.policies.plan_search import feasible, interval_plans, search, search_split, spaced_plans
from fx_fastcache.policies.planned import DAMPING_GRID, DAMPINGS_KEY, SEARCHED_KEY, worst_quarter
from fx_fastcache.runtime.drift import DAMPING_KEY
from fx_fastcache.zoo import make_tiny

from test_planned import STEPS, _euler


def _calibrated(**kw):
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", policy="planned", **kw)
    with fastcache.calibrate(opt):
        for seed in (1, 2):
            _euler(opt, tm, seed=seed)
    return tm, opt


def _skipped(opt) -> torch.Tensor:
    """The installed plan's skipped steps (bool per step; the table is trimmed after its last skip)."""
    table = opt.installed_schedule()[:, 0]
    return torch.cat([table, torch.zeros(STEPS - len(table), dtype=torch.bool)])


def _computed(opt) -> list[int]:
    return (~_skipped(opt)).nonzero().flatten().tolist()


def test_spaced_plans_and_feasible():
    plans = spaced_plans(10, 4, 1)
    assert plans and all(int(r.sum()) == 4 and bool(r[0]) for r in plans)
    assert len({tuple(r.tolist()) for r in plans}) == len(plans)  # no repeats
    assert [r.nonzero().flatten().tolist() for r in plans][0] == [0, 1, 4, 7]  # step 0, then evenly spread
    row = torch.tensor([True, True, False, False, False, True])
    assert feasible(row, 2, set(), 0) and feasible(row, 2, set(), 3)
    assert not feasible(row, 2, set(), 2)  # three skipped in a row
    assert not feasible(row, 3, set(), 0)  # warm-up step 2 skipped
    assert not feasible(row, 1, {3}, 0)  # protected step 3 skipped


def test_interval_plans_are_taylorseer_schedules():
    """TaylorSeer's schedules (warm-up, then every k-th step to the end) are start plans, exactly: at 60 % of 20
    steps it computes 0, 1, then every third step from 3, which the evenly spaced plans round differently."""
    for n, m, forced in [(20, 8, 2), (20, 6, 2), (20, 10, 1), (8, 4, 1)]:
        plans = [r.nonzero().flatten().tolist() for r in interval_plans(n, m, forced)]
        assert plans and len({tuple(p) for p in plans}) == len(plans)
        for p in plans:
            w = next(i for i in range(n + 1) if i not in p)  # the warm-up: the first steps, all computed
            gaps = {b - a for a, b in zip(p[w:], p[w + 1:])}
            assert len(p) == m and w >= forced and p[:forced] == list(range(forced))
            assert len(gaps) == 1 and p[-1] + gaps.pop() >= n, p  # one interval, running to the last step
    assert [0, 1, 3, 6, 9, 12, 15, 18] in [r.nonzero().flatten().tolist() for r in interval_plans(20, 8, 2)]
    assert [0, 1, 3, 6, 9, 12, 15, 18] not in [r.nonzero().flatten().tolist() for r in spaced_plans(20, 8, 2)]
    assert [0, 1, 3, 8, 13, 18] in [r.nonzero().flatten().tolist() for r in interval_plans(20, 6, 2)]


def test_search_split_searches_the_plans_computing_step_1_apart():
    """With one warm-up step a single hill climb starts from the best start plan, here one that skips step 1, and
    ends in that family's optimum; the plans computing step 1 start lower and climb higher, so search_split also
    searches them and keeps the better (ties: the first search's)."""
    def score(row):  # skipping step 1: best at 0, 3, 5; computing it: the later the last step, the better
        steps = row.nonzero().flatten().tolist()
        return 10.0 - 0.1 * len(set(steps) ^ {0, 3, 5}) if not bool(row[1]) else 1.5 * steps[-1]

    start = torch.zeros(8, dtype=torch.bool)
    start[[0, 2, 5]] = True
    one, one_score, _ = search(start, 1, set(), 0, score, 50)
    assert one.nonzero().flatten().tolist() == [0, 3, 5] and one_score == 10.0
    best, best_score, tried = search_split(start, 1, set(), 0, score, 50)
    assert best.nonzero().flatten().tolist() == [0, 1, 7] and best_score == 10.5 and tried > 0
    assert search_split(start, 1, set(), 0, lambda r: 1.0, 50)[0].nonzero().flatten().tolist() == [0, 2, 5]  # ties
    # two warm-up steps, a protected step 1, or one computed step: one search, as before
    two = torch.zeros(8, dtype=torch.bool)
    two[[0, 1, 5]] = True
    assert torch.equal(search_split(two, 2, set(), 0, score, 50)[0], search(two, 2, set(), 0, score, 50)[0])
    calls = []
    search_split(start, 1, set(), 0, lambda r: calls.append(r) or 0.0, 50)
    assert any(not bool(r[1]) for r in calls) and any(bool(r[1]) for r in calls)
    one_step = torch.zeros(8, dtype=torch.bool)
    one_step[0] = True
    assert search_split(one_step, 1, set(), 0, score, 50)[2] == 1
    with pytest.raises(ValueError, match="no plan of 3 computed steps"):
        search(start, 1, {1, 2, 3, 4}, 0, score, 50)


def _brute_best(n, m, forced, cost):
    best = None
    for rest in itertools.combinations(range(forced, n), m - forced):
        comp = list(range(forced)) + list(rest)
        c = cost(set(range(n)) - set(comp))
        if best is None or c < best[0]:
            best = (c, comp)
    return best[1]


def test_search_plan_finds_the_plan_the_outputs_prefer(tmp_path, caplog):
    tm, opt = _calibrated(target_fraction=0.5)
    n, m = STEPS, STEPS // 2
    program = _computed(opt)
    ref = _euler(opt, tm, seed=3)  # what the full run returns below
    weights = torch.tensor([0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])  # the later a skip, the worse
    calls = []

    def generate():  # the output is off by the summed weight of the skipped steps, sample 0 only
        skipped = _skipped(opt)
        calls.append(skipped.clone())
        out = ref.clone()
        out[0] += float(weights[skipped].sum()) * 1e-3
        return out

    got = fastcache.search_plan(opt, generate, data_range=2.0)
    want = _brute_best(n, m, 2, lambda skipped: sum(float(weights[k]) for k in skipped))
    assert got == {0.5: want} and want == [0, 1, 6, 7]
    assert want != program
    assert _computed(opt) == want  # installed
    assert len(calls) <= 1 + 150 and not bool(calls[0].any())  # the first run computes every step
    fastcache.reset(opt)
    _euler(opt, tm)
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] == pytest.approx(0.5)

    # saved with the calibration; another fraction keeps the program's plan
    path = tmp_path / "searched.safetensors"
    fastcache.save_calibration(opt, path)
    other = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5)
    fastcache.load_calibration(other, path)
    _euler(other, tm)
    assert _computed(other) == want
    fastcache.configure(other, target_fraction=0.25)
    fastcache.configure(other, target_fraction=0.5)
    assert _computed(other) == want

    # re-planning (protect_steps) drops the searched plans, and says so
    with caplog.at_level(logging.WARNING, logger="fx_fastcache.policies.planned"):
        fastcache.protect_steps(opt, generate, floor_db=1.0, data_range=2.0)
    assert any("replaces the plans search_plan chose" in r.getMessage() for r in caplog.records)
    assert _computed(opt) == program


def test_search_plan_keeps_warmup_protected_and_max_skip():
    tm, opt = _calibrated(target_fraction=0.5, warmup_steps=1, max_skip_steps=2)
    ref = _euler(opt, tm, seed=3)
    weights = torch.tensor([0.0, 1.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    seen = []

    def generate():
        skipped = _skipped(opt)
        seen.append(skipped.clone())
        out = ref.clone()
        out[0] += float(weights[skipped].sum()) * 1e-3
        return out

    got = fastcache.search_plan(opt, generate, fractions=[0.5, 0.25], data_range=2.0, max_runs=40)
    for f, comp in got.items():
        row = torch.zeros(STEPS, dtype=torch.bool)
        row[comp] = True
        assert int(row.sum()) == STEPS - round(f * STEPS) and feasible(row, 1, set(), 2), (f, comp)
    assert all(feasible(~s, 1, set(), 2) for s in seen)  # no run broke the constraints
    assert len(seen) <= 1 + 2 * 2 * 40  # with one warm-up step, two searches per fraction (search_split)
    assert got[0.5] == _brute_best(STEPS, 4, 1, lambda sk: sum(float(weights[k]) for k in sk)
                                   if feasible(torch.tensor([k not in sk for k in range(STEPS)]), 1, set(), 2)
                                   else float("inf"))
    fastcache.configure(opt, target_fraction=0.25)
    assert _computed(opt) == got[0.25]


def test_search_plan_keeps_the_plan_it_cannot_search(caplog):
    """2 computed steps of 8 cannot skip at most 2 in a row: the program's plan (3 steps) stays, and it says so."""
    tm, opt = _calibrated(target_fraction=0.75, warmup_steps=1, max_skip_steps=2)
    program = _computed(opt)
    with caplog.at_level(logging.WARNING, logger="fx_fastcache.policies.planned"):
        got = fastcache.search_plan(opt, lambda: _euler(opt, tm, seed=3), data_range=2.0)
    assert got == {0.75: program} and len(program) == 3
    assert any("cannot search target_fraction=0.75" in r.getMessage() for r in caplog.records)


def test_search_and_sensitivity_leave_no_statistics_behind():
    """Their trial generations are not the user's: afterwards the statistics are empty, and the next
    generation reports its own fraction (it used to mix in the last trial's)."""
    tm, opt = _calibrated(target_fraction=0.5)
    for tune in (lambda gen: fastcache.search_plan(opt, gen, fractions=[0.5, 0.75], max_runs=5),
                 lambda gen: fastcache.measure_sensitivity(opt, gen)):
        tune(lambda: _euler(opt, tm, seed=3))
        assert fastcache.get_cache_statistics(opt)["calls"] == 0
        _euler(opt, tm)
        st = fastcache.get_cache_statistics(opt)
        assert st["calls"] == STEPS and st["block_approx_ratio"] == pytest.approx(0.5)


def test_search_plan_with_drift_correction_scores_real_generations(tmp_path):
    """On a real generation (the drift correction on), the searched plan scores at least the program's,
    and the correction's damping is fitted, installed per budget and saved."""
    tm, opt = _calibrated(target_fraction=0.5, drift_correction="flow_euler")
    program = _computed(opt)
    ref = _euler(opt.model, tm, seed=3)

    def score():
        fastcache.reset(opt)
        diff = (_euler(opt, tm, seed=3) - ref).flatten(1).pow(2).mean(1)
        return float((10 * torch.log10(4.0 / diff.clamp_min(1e-300))).mean())

    before = score()
    got = fastcache.search_plan(opt, lambda: _euler(opt, tm, seed=3), data_range=2.0, max_runs=30)
    assert _computed(opt) == got[0.5] and len(got[0.5]) == STEPS // 2
    after = score()
    assert after >= before - 1e-6, (program, got, before, after)

    # the drift damping was fitted on the same generations: the grid's best, installed for this budget only
    damping = opt.store.tensors[DAMPING_KEY]
    chosen = float(damping)
    scores = {}
    for beta in DAMPING_GRID:
        damping.fill_(beta)
        scores[beta] = score()
    assert len({round(v, 6) for v in scores.values()}) > 1  # the damping changes the images
    assert chosen in DAMPING_GRID and scores[chosen] == pytest.approx(max(scores.values()), abs=1e-6), scores
    fastcache.configure(opt, target_fraction=0.25)
    assert float(opt.store.tensors[DAMPING_KEY]) == 0.0  # not searched: the plain interpolation
    fastcache.configure(opt, target_fraction=0.5)
    assert float(opt.store.tensors[DAMPING_KEY]) == chosen

    path = tmp_path / "damped.safetensors"  # saved and loaded with the plans
    fastcache.save_calibration(opt, path)
    other = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5,
                               drift_correction="flow_euler")
    fastcache.load_calibration(other, path)
    torch.testing.assert_close(_euler(other, tm, seed=3), _euler(opt, tm, seed=3), rtol=0, atol=0)
    assert float(other.store.tensors[DAMPING_KEY]) == chosen

    # a file saved without the search (as before search_plan fitted dampings) replaces the fitted
    # damping and plans: loaded into the searched model, it generates what a fresh model loading it does
    with safe_open(str(path), "pt") as f:
        meta, kept = f.metadata(), {k: f.get_tensor(k) for k in f.keys()
                                    if k not in (SEARCHED_KEY, DAMPINGS_KEY)}
    old = tmp_path / "unsearched.safetensors"
    save_file(kept, str(old), metadata=meta)
    fastcache.load_calibration(opt, old)
    assert float(opt.store.tensors[DAMPING_KEY]) == 0.0
    fresh = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5,
                               drift_correction="flow_euler")
    fastcache.load_calibration(fresh, old)
    torch.testing.assert_close(_euler(opt, tm, seed=3), _euler(fresh, tm, seed=3), rtol=0, atol=0)


def test_search_plan_refuses_bad_input():
    tm, opt = _calibrated(target_fraction=0.5)
    gen = lambda: _euler(opt, tm, seed=3)  # noqa: E731
    kept = opt.installed_schedule().clone()
    with pytest.raises(ValueError, match="max_runs=0"):
        fastcache.search_plan(opt, gen, max_runs=0)
    with pytest.raises(ValueError, match="fraction 1.0"):
        fastcache.search_plan(opt, gen, fractions=[1.0])
    for bad in (0.5, []):  # a number instead of a list; nothing to search (it ran a generation for nothing)
        with pytest.raises(ValueError, match=re.escape(f"fractions={bad!r} must be a non-empty list")):
            fastcache.search_plan(opt, gen, fractions=bad)
    with pytest.raises(ValueError, match="data_range=-1"):
        fastcache.search_plan(opt, gen, data_range=-1)
    with pytest.raises(TypeError, match="final output as a tensor"):
        fastcache.search_plan(opt, lambda: None)
    with pytest.raises(ValueError, match="batch first"):
        fastcache.search_plan(opt, lambda: _euler(opt, tm).sum())
    assert torch.equal(opt.installed_schedule(), kept)  # a failed search leaves the plan as it was
    with pytest.raises(ValueError, match="policy='planned'"):
        fastcache.search_plan(fastcache.optimize(tm.model, backend="eager"), gen)
    with pytest.raises(ValueError, match="calibrated"):
        fastcache.search_plan(fastcache.optimize(tm.model, backend="eager", policy="planned"), gen)


def test_search_plan_worst_quarter_guards_the_worst_image():
    """One image (0) suffers from late skips, the other three from early ones.  The mean follows the three;
    ``objective="worst_quarter"`` (here the worst one image of four) finds a plan with a better worst image,
    which no single move of a computed step improves."""
    tm, opt = _calibrated(target_fraction=0.5)
    late = torch.tensor([0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    early = torch.tensor([0.0, 0.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0])

    def errors(skipped):  # each image's offset from the full run, at least 1e-3
        return torch.stack([late[skipped].sum()] + [early[skipped].sum()] * 3) * 1e-3 + 1e-3

    def generate():
        return errors(_skipped(opt)).unsqueeze(1).expand(4, 16).clone()

    def psnr(skipped):
        full = errors(torch.zeros(STEPS, dtype=torch.bool))
        return 10 * torch.log10(4.0 / (errors(skipped) - full + 1e-300).pow(2).clamp_min(1e-300)).double()

    def skipped_of(comp):
        return torch.tensor([k not in comp for k in range(STEPS)])

    assert worst_quarter(torch.tensor([30.0, 10.0, 20.0, 40.0, 50.0])) == pytest.approx(15.0)  # worst 2 of 5
    by_mean = fastcache.search_plan(opt, generate, data_range=2.0)[0.5]
    by_worst = fastcache.search_plan(opt, generate, data_range=2.0, objective="worst_quarter")[0.5]
    assert by_mean == _brute_best(STEPS, 4, 2, lambda sk: -float(psnr(skipped_of(set(range(STEPS)) - sk)).mean()))
    assert _computed(opt) == by_worst != by_mean
    best = psnr(skipped_of(by_worst)).min()
    assert best > psnr(skipped_of(by_mean)).min() + 2  # dB (32.96 against 30.46)
    assert psnr(skipped_of(by_mean)).mean() >= psnr(skipped_of(by_worst)).mean()
    for i in by_worst[2:]:  # a local optimum of the worst image
        for j in set(range(2, STEPS)) - set(by_worst):
            assert psnr(skipped_of(sorted(set(by_worst) - {i} | {j}))).min() <= best + 1e-9
    with pytest.raises(ValueError, match="objective='max'.*worst_quarter"):
        fastcache.search_plan(opt, generate, objective="max")
