"""Motion-aware token routing (enable_token_routing): equivalence, a Python reference of the
routing rule on every family, per-sample indices, statistics and one inductor compile."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch._dynamo.utils import counters

import fx_fastcache as fastcache
from fx_fastcache.families import block_modules
from fx_fastcache.passes.route_tokens import routing_capacity
from fx_fastcache.runtime.routing import TokenRouter, gather_tokens
from fx_fastcache.zoo import make_tiny

from conftest import TinyStack, call_with_full_context

FAMILIES = ["tiny-dit", "tiny-pixart", "tiny-sd3", "tiny-flux"]
# video DiTs: per-sample rotary tables (Wan), image-only rotary + joint mask (HunyuanVideo), 3-D text-first (CogVideoX)
VIDEO = ["tiny-cogvideox", "tiny-ltx-video", "tiny-wan", "tiny-hunyuan-video"]
TIMES = [900.0, 800.0, 700.0, 600.0]


@pytest.fixture(scope="module")
def tinies():
    return {name: make_tiny(name) for name in FAMILIES + VIDEO}


def _t(name: str, t: float) -> float:
    return t / 1000.0 if name == "tiny-flux" else t


def _run(opt, tm, name, times=TIMES, batch=2):
    outs = []
    for t in times:
        out = opt(**tm.make_inputs(_t(name, t), batch))
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _routers(opt):
    return [g.router for e in opt.entries() for g in e.guards]


@pytest.mark.parametrize("name", FAMILIES + VIDEO)
def test_full_capacity_is_identical_to_no_routing(tinies, name):
    """With block skipping on (every other step skipped), so computed and skipped blocks mix."""
    tm = tinies[name]
    skip = dict(cache_ratio_threshold=0.5, max_skip_steps=1)
    ref = fastcache.optimize(tm.model, backend="eager", span="block", **skip)  # routing guards per block
    opt = fastcache.optimize(tm.model, backend="eager", enable_token_routing=True, motion_threshold=0.0, **skip)
    for a, b in zip(_run(ref, tm, name), _run(opt, tm, name)):
        assert torch.equal(a, b)
    routers = _routers(opt)
    assert routers and all(r.k == r.n_tokens for r in routers)
    assert sum(float(r.routed_calls) for r in routers) > 0  # the routed branch did run
    assert fastcache.get_cache_statistics(opt)["spatial_approx_ratio"] == 0.0


def _reference(tm, name, k: int, warmup: int, times=TIMES, batch=2):
    """The routing rule in plain Python: each block, from step ``warmup`` on, runs on the k tokens
    whose input moved most since their last computation; the others reuse their last residual."""
    model = tm.model
    opt = fastcache.optimize(model, backend="eager")
    spec = opt.spec
    state: dict[str, dict] = {}
    step = {"i": 0}
    patched = []

    def wrap(path, block, bl):
        orig = block.forward
        sig = inspect.signature(orig)
        hid = bl.outputs.index("hidden_states")

        def forward(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            x = bound.arguments["hidden_states"]
            st = state.get(path)
            if st is None or step["i"] < warmup:
                out = orig(*bound.args, **bound.kwargs)
                y = out if isinstance(out, torch.Tensor) else out[hid]
                state[path] = {"x_ref": x.clone(), "resid": y - x}
                return out
            s = (x - st["x_ref"]).pow(2).sum(-1)
            rot = bound.arguments.get("image_rotary_emb")
            if rot is not None:  # Flux: one index set for the batch (rotary table is shared)
                s = s.sum(0, keepdim=True)
            idx = torch.sort(torch.topk(s, k, dim=1).indices, dim=1).values.expand(x.shape[0], -1)
            bound.arguments["hidden_states"] = gather_tokens(x, idx)
            if rot is not None:
                L = bound.arguments["encoder_hidden_states"].shape[1]
                bound.arguments["image_rotary_emb"] = tuple(torch.cat([r[:L], r[L:][idx[0]]]) for r in rot)
            out = call_with_full_context(orig, block, bound, x)
            yk = out if isinstance(out, torch.Tensor) else out[hid]
            e = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            y = (x + st["resid"]).scatter(1, e, yk)
            st["x_ref"] = st["x_ref"].scatter(1, e, torch.gather(x, 1, e))
            st["resid"] = y - x
            if isinstance(out, torch.Tensor):
                return y
            return tuple(y if j == hid else o for j, o in enumerate(out))

        block.forward = forward
        patched.append(block)

    for path, block, bl in block_modules(model, spec):
        wrap(path, block, bl)
    outs = []
    try:
        with torch.no_grad():
            for i, t in enumerate(times):
                step["i"] = i
                out = model(**tm.make_inputs(_t(name, t), batch))
                outs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        for b in patched:
            b.__dict__.pop("forward", None)
    return outs


@pytest.mark.parametrize("name", FAMILIES)
def test_routing_matches_python_reference(tinies, name):
    tm = tinies[name]
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False, enable_token_routing=True,
                             motion_threshold=0.5, warmup_steps=2)
    got = _run(opt, tm, name)
    n = _routers(opt)[0].n_tokens
    want = _reference(tm, name, routing_capacity(0.5, n), warmup=2)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"step {step}")
    full = _run(fastcache.optimize(tm.model, backend="eager", enable_block_approx=False), tm, name)
    assert not torch.allclose(got[-1], full[-1], atol=1e-4)  # routing did change something
    stats = fastcache.get_cache_statistics(opt)
    # 4 steps, 2 of them warm-up: 2 routed steps × (N - k)/N static tokens
    assert stats["spatial_approx_ratio"] == pytest.approx(2 / 4 * (n - routing_capacity(0.5, n)) / n)
    fastcache.reset(opt)
    assert fastcache.get_cache_statistics(opt)["spatial_approx_ratio"] == 0.0


def test_cross_attention_text_as_long_as_the_image_is_passed_whole():
    """A cross-attention text with exactly as many tokens as the image (PixArt-Σ at 240×320 px: 300
    and 300) matched the per-token rule by shape and was gathered to the routed tokens, silently
    (Wan and LTX-Video name it the same: ``token_reduction.TEXT_ARGS``)."""
    name = "tiny-pixart"
    tm = make_tiny(name)
    opt = _optimize_routed(tm)
    _run(opt, tm, name, batch=1)
    n = _routers(opt)[0].n_tokens
    base = tm.make_inputs

    def inputs(t, batch=2):
        kw = base(t, batch)
        kw["encoder_hidden_states"] = torch.randn(batch, n, kw["encoder_hidden_states"].shape[-1],
                                                  generator=torch.Generator().manual_seed(3))
        return kw

    tm.make_inputs = inputs
    got = _run(_optimize_routed(tm), tm, name, batch=1)
    want = _reference(tm, name, routing_capacity(0.5, n), warmup=2, batch=1)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"step {step}")


def _optimize_routed(tm):
    return fastcache.optimize(tm.model, backend="eager", enable_block_approx=False, enable_token_routing=True,
                              motion_threshold=0.5, warmup_steps=2)


def test_indices_are_per_sample_and_most_salient():
    r = TokenRouter((2, 6, 3), k=2, dtype=torch.float32, device=torch.device("cpu"))
    x = torch.zeros(2, 6, 3)
    x[0, 4] = 3.0
    x[0, 1] = 2.0
    x[1, 0] = 5.0
    x[1, 5] = 1.0
    r.have.fill_(1.0)
    active, idx = r.select(torch.tensor(3.0), torch.tensor(False), torch.tensor(0.0), torch.tensor(2.0), x)
    assert bool(active)
    assert idx.tolist() == [[1, 4], [0, 5]]
    active, _ = r.select(torch.tensor(3.0), torch.tensor(True), torch.tensor(0.0), torch.tensor(2.0), x)
    assert not bool(active)  # a new generation has no reference yet: compute every token


@pytest.mark.parametrize("threshold,n,k", [(0.0, 256, 256), (0.5, 256, 128), (0.75, 16, 4), (0.99, 16, 1)])
def test_capacity(threshold, n, k):
    assert routing_capacity(threshold, n) == k


@pytest.fixture(scope="module")
def compiled():
    """One inductor compile of a 1-block tiny-dit with routing and merging on, over two generations
    (block skipping on, every other step skipped, so computed and skipped blocks mix)."""
    tm = make_tiny("tiny-dit", layers=1)
    counters.clear()
    kw = dict(enable_token_routing=True, motion_threshold=0.5, enable_token_merge=True, merge_ratio=0.5,
              cache_ratio_threshold=0.5, max_skip_steps=1)
    opt = fastcache.optimize(tm.model, backend="inductor", **kw)
    ref = fastcache.optimize(tm.model, backend="eager", **kw)
    times = TIMES + [500.0, 400.0]
    got = _run(opt, tm, "tiny-dit", times) + _run(opt, tm, "tiny-dit", times)
    want = _run(ref, tm, "tiny-dit", times) + _run(ref, tm, "tiny-dit", times)
    return opt, got, want, {k: dict(v) for k, v in counters.items()}


@pytest.mark.slow
def test_compiled_routing_has_no_graph_breaks_or_recompiles(compiled):
    opt, got, want, c = compiled
    assert sum(c.get("graph_break", {}).values()) == 0
    assert c["stats"]["unique_graphs"] == 1
    assert sum(c.get("recompiles", {}).values()) == 0
    assert fastcache.get_cache_statistics(opt)["spatial_approx_ratio"] > 0


def test_compiled_routing_matches_eager(compiled):
    _, got, want, _ = compiled
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", VIDEO)
def test_video_routing_runs_below_capacity(tinies, name):
    """k < N on the video DiTs: rotary tables and joint masks are gathered with the tokens (a
    missing gather fails with a shape error), and half of the tokens of computed blocks are static."""
    tm = tinies[name]
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False, enable_token_routing=True,
                             motion_threshold=0.5, warmup_steps=2)
    ref = _run(fastcache.optimize(tm.model, backend="eager", enable_block_approx=False), tm, name)
    got = _run(opt, tm, name)
    torch.testing.assert_close(got[1], ref[1])  # warm-up steps compute every token
    assert all(torch.isfinite(g).all() for g in got) and not torch.equal(got[-1], ref[-1])
    stats = fastcache.get_cache_statistics(opt)
    assert stats["spatial_approx_ratio"] == pytest.approx(0.5 * (len(TIMES) - 2) / len(TIMES), abs=0.05)


def test_joint_mask_without_known_order_is_refused() -> None:
    """A mask over image + text tokens whose order the family spec does not give: a clear error."""
    import dataclasses

    from fx_fastcache.families import FAMILIES as SPECS

    tm = make_tiny("tiny-hunyuan-video")
    spec = SPECS["HunyuanVideoTransformer3DModel"]
    SPECS["HunyuanVideoTransformer3DModel"] = dataclasses.replace(
        spec, block_lists=tuple(dataclasses.replace(b, joint_mask_order=None) for b in spec.block_lists))
    try:
        opt = fastcache.optimize(tm.model, backend="eager", enable_token_routing=True)
        with pytest.raises(ValueError, match="token order of that sequence is not known"):
            opt(**tm.make_inputs(900.0, 2))
    finally:
        SPECS["HunyuanVideoTransformer3DModel"] = spec


class _HiddenBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from fx_fastcache.zoo import CustomBlock

        self.inner = CustomBlock(16)

    def forward(self, hidden_states, temb):
        return self.inner(hidden_states, temb)


class _ArgX(TinyStack):
    """A model of no family whose own token argument is ``x`` and whose blocks call theirs ``hidden_states``."""

    def __init__(self) -> None:
        super().__init__(blocks=2, make=lambda d: _HiddenBlock())


class _ArgHidden(_ArgX):
    def forward(self, hidden_states, timestep):
        return super().forward(hidden_states, timestep)


def test_routing_a_model_whose_argument_is_named_otherwise_than_its_blocks_stream():
    """Routing was refused ("no 'x' stream to route") when the model's first argument and its blocks' one
    stream had different names; the same model with the argument renamed routed."""
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(1))
    outs = {}
    for cls, arg in ((_ArgX, "x"), (_ArgHidden, "hidden_states")):
        torch.manual_seed(0)
        opt = fastcache.optimize(cls().eval(), backend="eager", blocks="blocks", enable_block_approx=False,
                                 enable_token_routing=True, motion_threshold=0.5, warmup_steps=2)
        with torch.no_grad():
            outs[arg] = [opt(**{arg: x + 0.1 * i, "timestep": torch.full((2,), 999.0 - 100 * i)}) for i in range(4)]
        assert fastcache.get_cache_statistics(opt)["spatial_approx_ratio"] > 0
    for a, b in zip(outs["x"], outs["hidden_states"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
