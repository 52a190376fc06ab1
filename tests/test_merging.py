"""Spatial-temporal token merging (enable_token_merge): the pure functions, equivalence at
merge_ratio 1.0, a Python reference of the merged block on three families, Flux's clear error.
(The inductor compile with routing and merging on is in test_routing.py, one shared compile.)"""
from __future__ import annotations

import inspect

import pytest
import torch

import fx_fastcache as fastcache
from fx_fastcache.families import block_modules
from fx_fastcache.runtime.merging import importance, merge_tokens, stage_sizes, unpool
from fx_fastcache.zoo import make_tiny

from conftest import call_with_full_context

TIMES = [900.0, 800.0, 700.0, 600.0]


@pytest.mark.parametrize("n,ratio,stages,want", [(256, 0.5, 1, [128]), (256, 0.25, 2, [128, 64]),
                                                 (16, 1.0, 3, [16, 16, 16]), (3, 0.1, 1, [1])])
def test_stage_sizes(n, ratio, stages, want):
    assert stage_sizes(n, ratio, stages) == want


def test_importance_does_not_underflow_for_large_distances():
    h = 1e3 * torch.randn(2, 32, 8)
    s = importance(h, h + 1.0, k_nn=4, lam=0.5)
    assert s.shape == (2, 32) and torch.isfinite(s).all() and (s > 0).all()


def test_merge_groups_duplicates_per_sample_and_unpools_residuals():
    # sample 0: 3 distinct points, each duplicated (6 tokens); sample 1: another grouping
    p = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    h = torch.stack([p[[0, 0, 1, 1, 2, 2]], p[[2, 1, 0, 2, 1, 0]]])
    prev = h.clone()  # one copy of each point moved: temporal saliency makes it the centre
    prev[0, [0, 2, 4]] += 1.0
    prev[1, [0, 1, 2]] += 1.0
    merged, assign = merge_tokens(h, prev, sizes=[3], k_nn=1, lam=10.0)
    assert merged.shape == (2, 3, 2)
    for b in range(2):
        for i in range(6):  # every token's cluster token is the token itself (its duplicates agree)
            torch.testing.assert_close(merged[b, assign[b, i]], h[b, i])
        assert len(set(assign[b].tolist())) == 3
    out = merged + torch.tensor([1.0, -1.0])  # a "block" adding a constant residual
    torch.testing.assert_close(unpool(h, merged, out, assign), h + torch.tensor([1.0, -1.0]))


def test_merge_to_all_tokens_is_the_identity():
    h = torch.randn(2, 10, 4)
    merged, assign = merge_tokens(h, h, sizes=[10], k_nn=3, lam=0.5)
    assert torch.equal(merged, h) and torch.equal(assign, torch.arange(10).expand(2, 10))


def test_merge_ratio_one_is_refused():
    """``enable_token_merge=True`` with ``merge_ratio=1.0`` (its default) merged nothing, silently."""
    with pytest.raises(ValueError, match="set merge_ratio below 1"):
        fastcache.optimize(make_tiny("tiny-dit").model, backend="eager", enable_token_merge=True)


def _reference(tm, ratio: float, stages: int, k_nn: int, lam: float, warmup: int = 2):
    """Merging in plain Python: from step ``warmup`` on, every block runs on the merged tokens
    and each token gets its cluster's residual."""
    model = tm.model
    spec = fastcache.optimize(model, backend="eager").spec
    state: dict[str, dict] = {}
    step = {"i": 0}
    patched = []
    for path, block, bl in block_modules(model, spec):
        orig, sig, hid = block.forward, inspect.signature(block.forward), bl.outputs.index("hidden_states")

        def forward(*args, _orig=orig, _sig=sig, _hid=hid, _path=path, _block=block, **kwargs):
            bound = _sig.bind(*args, **kwargs)
            x = bound.arguments["hidden_states"]
            st = state.get(_path)
            if st is not None and step["i"] >= warmup:
                merged, assign = merge_tokens(x, st["x_ref"], stage_sizes(x.shape[1], ratio, stages), k_nn, lam)
                bound.arguments["hidden_states"] = merged
            if st is not None and step["i"] >= warmup:
                out = call_with_full_context(_orig, _block, bound, x)
            else:
                out = _orig(*bound.args, **bound.kwargs)
            y = out if isinstance(out, torch.Tensor) else out[_hid]
            if st is not None and step["i"] >= warmup:
                y = unpool(x, merged, y, assign)
            state[_path] = {"x_ref": x.clone()}
            if isinstance(out, torch.Tensor):
                return y
            return tuple(y if j == _hid else o for j, o in enumerate(out))

        block.forward = forward
        patched.append(block)
    outs = []
    try:
        with torch.no_grad():
            for i, t in enumerate(TIMES):
                step["i"] = i
                outs.append(model(**tm.make_inputs(t, 2))[0])
    finally:
        for b in patched:
            b.__dict__.pop("forward", None)
    return outs


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-pixart", "tiny-sd3"])
def test_merging_matches_python_reference(name):
    tm = make_tiny(name)
    cfg = dict(merge_ratio=0.5, num_stages=2, token_merge_k=3, token_merge_lambda=0.5)
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False, enable_token_merge=True, **cfg)
    got = [opt(**tm.make_inputs(t, 2))[0] for t in TIMES]
    want = _reference(tm, cfg["merge_ratio"], cfg["num_stages"], cfg["token_merge_k"], cfg["token_merge_lambda"])
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"step {step}")
    full = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    assert not torch.allclose(got[-1], [full(**tm.make_inputs(t, 2))[0] for t in TIMES][-1], atol=1e-4)


def test_merging_flux_rotary_is_a_clear_error():
    tm = make_tiny("tiny-flux")
    opt = fastcache.optimize(tm.model, backend="eager", enable_token_merge=True, merge_ratio=0.5)
    with pytest.raises(ValueError, match="rotary"):
        opt(**tm.make_inputs(0.9, 2))
