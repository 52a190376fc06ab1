"""Each policy on a tiny model: what it skips, and that it skips for the reason it states.

The tiny models' inputs depend only on the timestep (fixed hidden states), so a policy's
statistic at a step does not depend on earlier decisions except through its own reference
state; each test re-derives the expected decisions from the statistics the decider exposes
(``last_stat``) with the rule written out in plain Python.  The last test checks that our
First-Block-Cache takes the same decisions as diffusers' ``apply_first_block_cache`` on the
trained DiT with the same inputs.
"""
from __future__ import annotations

import pytest
import torch

import fx_fastcache as fastcache
from fx_fastcache.zoo import make_tiny

STEPS = [1000.0 - 90.0 * k for k in range(9)]


def _tiny(layers: int = 4):
    return make_tiny("tiny-dit", layers=layers)


def _run(opt, tm, steps=STEPS) -> tuple[list[list[bool]], list[torch.Tensor]]:
    """Per step: which blocks were approximated, and the step decider's (or per-block) statistic."""
    entry = None
    skipped, stats = [], []
    with torch.no_grad():
        for t in steps:
            before = [float(g.skipped) for g in entry.guards] if entry else None
            opt(**tm.make_inputs(t, 2))
            entry = opt.entries()[0]
            if before is None:
                before = [0.0] * len(entry.guards)
            skipped.append([float(g.skipped) - b > 0 for g, b in zip(entry.guards, before)])
            d = entry.step_decider
            if d is not None:
                stats.append(d.last_stat.clone())
            else:
                stats.append(torch.stack([g.decider.last_stat.max() for g in entry.guards]))
    return skipped, stats


def test_step_forecast_skips_whole_steps_when_the_forecast_deviation_is_small():
    tm = _tiny()
    opt = fastcache.optimize(tm.model, backend="eager", policy="step_forecast", fallback="forecast",
                             warmup_steps=2, cache_ratio_threshold=0.0)
    _, stats = _run(opt, tm)
    d = torch.stack([s.max() for s in stats[2:]])
    thr = float(d.median())  # between the smallest and largest deviation: some steps pass, some do not
    fastcache.configure(opt, cache_ratio_threshold=thr)
    fastcache.reset(opt)
    skipped, stats = _run(opt, tm)
    computed = 0
    expected = []
    for k, s in enumerate(stats):
        # rule: past warm-up, two computed steps to extrapolate from, every sample's deviation <= threshold
        skip = k >= 2 and computed >= 2 and bool((s <= thr).all())
        expected.append(skip)
        computed += not skip
    assert [all(row) for row in skipped] == expected
    assert all(all(row) or not any(row) for row in skipped), "a step policy decides for every block at once"
    assert any(expected) and not all(expected[2:])


def test_step_forecast_threshold_zero_and_huge():
    tm = _tiny(2)
    opt = fastcache.optimize(tm.model, backend="eager", policy="step_forecast", fallback="forecast",
                             warmup_steps=2, cache_ratio_threshold=0.0)
    assert not any(any(r) for r in _run(opt, tm)[0])
    fastcache.configure(opt, cache_ratio_threshold=1e9)
    fastcache.reset(opt)
    rows = _run(opt, tm)[0]
    assert [any(r) for r in rows] == [False, False] + [True] * (len(STEPS) - 2)  # warm-up, then every step


def test_first_block_cache_always_computes_block0_and_skips_the_rest_together():
    tm = _tiny()
    opt = fastcache.optimize(tm.model, backend="eager", policy="first_block_cache", fallback="residual",
                             warmup_steps=0, cache_ratio_threshold=0.0)
    _, stats = _run(opt, tm)
    thr = float(torch.stack([s.max() for s in stats[1:]]).median())
    fastcache.configure(opt, cache_ratio_threshold=thr)
    fastcache.reset(opt)
    skipped, stats = _run(opt, tm)
    assert not any(row[0] for row in skipped), "block 0 is the probe: it always computes"
    expected = [k >= 1 and float(s.max()) <= thr for k, s in enumerate(stats)]
    assert [all(row[1:]) for row in skipped] == expected
    assert all(all(row[1:]) or not any(row[1:]) for row in skipped)
    assert any(expected) and not all(expected[1:])


def test_teacache_accumulates_the_rescaled_change_and_resets_on_compute():
    tm = _tiny()
    opt = fastcache.optimize(tm.model, backend="eager", policy="teacache", fallback="residual",
                             warmup_steps=0, cache_ratio_threshold=0.0)
    _, stats = _run(opt, tm)
    rel = [float(s.max()) for s in stats]
    thr = 2.5 * float(torch.tensor(rel[1:]).median())  # about two skipped steps between computed ones
    fastcache.configure(opt, cache_ratio_threshold=thr)
    fastcache.reset(opt)
    skipped, stats = _run(opt, tm)
    assert [float(s.max()) for s in stats] == pytest.approx(rel, rel=1e-5)  # the statistic ignores decisions
    acc, expected = 0.0, []
    for k, r in enumerate(rel):  # uncalibrated polynomial = identity
        acc += abs(r)
        skip = k >= 1 and acc < thr
        expected.append(skip)
        if not skip:
            acc = 0.0
    assert [all(row) for row in skipped] == expected
    assert any(expected) and not all(expected[1:])


def test_chi2_decides_per_block_from_each_blocks_drift():
    tm = _tiny()
    opt = fastcache.optimize(tm.model, backend="eager", policy="chi2", fallback="residual",
                             warmup_steps=1, cache_ratio_threshold=0.0)
    _, stats = _run(opt, tm)
    thr = float(torch.stack(stats[1:]).median())
    fastcache.configure(opt, cache_ratio_threshold=thr)
    fastcache.reset(opt)
    skipped, stats = _run(opt, tm)
    taus = [float(g.decider.tau) for g in opt.entries()[0].guards]
    for k, (row, s) in enumerate(zip(skipped, stats)):
        # uncalibrated: tau = sqrt(chi2_{nu,0.95}/nu) with nu = N*D (the paper's, ~1)
        expected = [k >= 1 and float(s[i]) <= thr * taus[i] for i in range(len(row))]
        assert row == expected, f"step {k}"
    assert any(any(r) and not all(r) for r in skipped), "blocks decide individually"


@pytest.fixture(scope="module")
def dit():
    from fx_fastcache.trained import load_trained

    return load_trained("dit-mnist")


def test_first_block_cache_matches_diffusers_decisions(dit):
    """Same model, same inputs, same threshold: the same steps are computed as with diffusers."""
    from fx_fastcache.bench.peers import diffusers_first_block_cache
    from fx_fastcache.trained import sample

    steps, thr = 10, 0.25
    classes, seeds = [5], [7]
    peer = diffusers_first_block_cache(dit.model, thr)
    theirs_skipped: list[bool] = []
    seen = [0]

    def their_step(i: int) -> None:
        theirs_skipped.append(peer.computed[1] == seen[0])  # block 1 not reached this step: skipped
        seen[0] = peer.computed[1]

    sample(dit, classes, seeds, steps=steps, model=peer.model, on_step=their_step)

    opt = fastcache.optimize(dit.model, backend="eager", policy="first_block_cache", fallback="residual",
                             warmup_steps=0, cache_ratio_threshold=thr)
    ours: list[bool] = []
    prev = [0.0]

    def on_step(i: int) -> None:
        g = opt.entries()[0].guards[1]
        ours.append(float(g.skipped) > prev[0])
        prev[0] = float(g.skipped)

    sample(dit, classes, seeds, steps=steps, model=opt, on_step=on_step)
    assert ours == theirs_skipped
    assert any(ours) and not all(ours[1:]), "the threshold must give both decisions to be a real check"
    # their counters agree with ours too
    assert peer.computed[0] == steps and peer.computed[-1] == steps - sum(theirs_skipped)
