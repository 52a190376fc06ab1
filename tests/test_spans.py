"""Guarded spans (passes/group_spans.py): same decisions and outputs as one guard per block, with
the fallback state at the span boundaries only."""
from __future__ import annotations

import pytest
import torch

import fx_fastcache as fastcache
from fx_fastcache.zoo import make_tiny

from conftest import FAMILIES, STRUCTURAL, TinyStack, exact_without_approximation, family_policy_cases, first

STEPS = [1000.0, 960.0, 920.0, 880.0, 840.0, 800.0, 760.0, 720.0]
STEP_POLICIES = ["step_forecast", "teacache", "first_block_cache"]


def generate(tm, span: str, policy: str, fallback: str, backend: str = "eager", steps=STEPS):
    """A multi-step loop whose latent evolves; returns (outputs, per-step per-block decisions, module)."""
    opt = fastcache.optimize(tm.model, backend=backend, policy=policy, fallback=fallback, span=span,
                             cache_ratio_threshold=0.5, warmup_steps=2)
    arg = opt.spec.stream_arg
    x = tm.make_inputs(steps[0], 2)[arg]
    outs, decisions, prev = [], [], None
    with torch.no_grad():
        for t in steps:
            kw = tm.make_inputs(t, 2)
            kw[arg] = x
            y = first(opt(**kw)).clone()
            outs.append(y)
            if y.shape == x.shape:
                x = x - 0.05 * y
            now = [b["approximated"] for b in fastcache.get_cache_statistics(opt)["per_block"]]
            decisions.append(tuple(b > a for a, b in zip(prev or [0] * len(now), now)))
            prev = now
    return outs, decisions, opt


#: Each case runs one fallback, in turn: every family, every policy and, on the structural families, every
#: policy with each fallback somewhere (four captures per fallback made this the suite's slowest matrix).
SPAN_CASES = [(f, p, ("residual", "forecast")[i % 2]) for i, (f, p) in enumerate(family_policy_cases(STEP_POLICIES))]


@pytest.mark.parametrize("family, policy, fallback", SPAN_CASES)
def test_auto_spans_match_per_block_guards(family, policy, fallback):
    ref, dec_ref, opt_ref = generate(make_tiny(family), "block", policy, fallback)
    got, dec_got, opt = generate(make_tiny(family), "auto", policy, fallback)
    assert dec_got == dec_ref, (dec_got, dec_ref)
    assert any(any(d) for d in dec_ref), "no block was approximated: the comparison would prove nothing"
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    n_blocks = len(dec_ref[0])
    lead = 1 if policy == "first_block_cache" else 0
    assert len(opt.entries()[0].guards) == lead + 1 and len(opt_ref.entries()[0].guards) == n_blocks
    assert fastcache.get_cache_statistics(opt)["per_block"] == fastcache.get_cache_statistics(opt_ref)["per_block"]


def _activation_buffers(opt) -> int:
    """State tensors of activation size (cached residuals / inputs) held by the captured graph."""
    e = opt.entries()[0]
    mods = [g.fallback for g in e.guards] + ([e.step_decider] if e.step_decider is not None else [])
    return sum(1 for m in mods for b in m.buffers(recurse=False) if b.ndim >= 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_is_two_activations_per_stream_per_span_plus_probe(family):
    tm = make_tiny(family)
    opt = fastcache.optimize(tm.model, backend="eager")  # the default config: step_forecast + forecast
    opt.capture(**tm.make_inputs(1000.0, 2))
    guards = opt.entries()[0].guards
    streams = sum(len(g.fallback.streams) for g in guards)
    assert len(guards) == 1 and streams <= 2  # one span; at most an image and a text stream
    assert _activation_buffers(opt) <= 2 * streams + 2
    if family not in STRUCTURAL:  # the per-block comparison: one capture more, on the three structures
        return
    per_block = fastcache.optimize(tm.model, backend="eager", span="block")
    per_block.capture(**tm.make_inputs(1000.0, 2))
    assert _activation_buffers(per_block) > _activation_buffers(opt)


def test_chi2_and_fitted_fallbacks_keep_one_span_per_block():
    tm = make_tiny("tiny-pixart")
    for kw in ({"policy": "chi2"}, {"fallback": "residual_linear"}, {"fallback": "linear"},
               {"enable_token_routing": True}):
        opt = fastcache.optimize(tm.model, backend="eager", **kw)
        opt.capture(**tm.make_inputs(1000.0, 2))
        assert len(opt.entries()[0].guards) == 2, kw


def test_schedule_spans_follow_equal_columns_and_recapture_when_split():
    tm = make_tiny("tiny-flux")  # 3 blocks
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", warmup_steps=1)
    table = torch.zeros(len(STEPS), 3, dtype=torch.bool)
    table[2:, 1:] = True  # blocks 1 and 2 share their column
    fastcache.set_schedule(opt, table)
    outs = [first(opt(**tm.make_inputs(t, 2))) for t in STEPS]
    guards = opt.entries()[0].guards
    assert [g.blocks for g in guards] == [("transformer_blocks.0",),
                                          ("single_transformer_blocks.0", "single_transformer_blocks.1")]
    stats = fastcache.get_cache_statistics(opt)["per_block"]
    assert [b["approximated"] for b in stats] == [0, len(STEPS) - 2, len(STEPS) - 2]
    ref = fastcache.optimize(tm.model, backend="eager", policy="schedule", warmup_steps=1, span="block")
    fastcache.set_schedule(ref, table)
    for a, b in zip(outs, [first(ref(**tm.make_inputs(t, 2))) for t in STEPS]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    table[3, 2] = False  # now blocks 1 and 2 differ: the span must be re-captured
    fastcache.set_schedule(opt, table)
    assert not opt.entries()
    opt(**tm.make_inputs(STEPS[0], 2))
    assert all(len(g.blocks) == 1 for g in opt.entries()[0].guards)


def test_a_span_followed_by_two_more_regions():
    """Spans [0, 1], [2], [3]: the guard pass looked up the regions after a span by its first block's index,
    not its position, and left the last region reading an erased node (a raw FX "used before it has been
    defined" at capture, on every family)."""
    tm = make_tiny("tiny-dit", layers=4)
    table = torch.zeros(len(STEPS), 4, dtype=torch.bool)
    table[2:, :2] = True
    table[3::2, 2] = True
    table[4:, 3] = True
    outs = {}
    for span in ("auto", "block"):
        opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", span=span)
        fastcache.set_schedule(opt, table)
        with torch.no_grad():
            outs[span] = [first(opt(**tm.make_inputs(t, 2))).clone() for t in STEPS]
        assert [len(g.blocks) for g in opt.entries()[0].guards] == ([2, 1, 1] if span == "auto" else [1] * 4)
        assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == int(table.sum())
    for a, b in zip(outs["auto"], outs["block"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_step_dispatch_with_spans_matches_in_graph():
    from fx_fastcache.step_dispatch import StepDispatch

    tm = make_tiny("tiny-sd3")  # the last block returns no text stream
    ref, dec, _ = generate(tm, "auto", "step_forecast", "forecast")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=0.5, warmup_steps=2)
    d = StepDispatch(opt, compile_mode="eager")
    x = tm.make_inputs(STEPS[0], 2)["hidden_states"]
    for t, r in zip(STEPS, ref):
        kw = tm.make_inputs(t, 2)
        kw["hidden_states"] = x
        y = first(d(**kw))
        torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)
        x = x - 0.05 * y
    assert list(d.history) == dec and any(any(p) for p in dec)


def test_onnx_export_has_one_if_per_span(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fx_fastcache.export.onnx import export_onnx
    from fx_fastcache.export.runner import OnnxRunner
    from fx_fastcache.export.schedule import optimize_with_schedule, record_schedule

    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=0.5, warmup_steps=2)
    sched = record_schedule(opt, lambda: [opt(**tm.make_inputs(t, 2)) for t in STEPS])
    assert sched.skip_ratio > 0
    ex = export_onnx(tm.model, sched, tm.make_inputs(STEPS[0], 2), tmp_path / "m.onnx")
    assert ex.n_if == 1 and ex.spec.spans == [[0, 1]]
    m = onnx.load(str(ex.path))
    assert sum(n.op_type == "If" for n in m.graph.node) == 1
    runner = OnnxRunner(ex.path)
    ref = optimize_with_schedule(tm.model, sched, backend="eager")
    for t in STEPS:
        kw = tm.make_inputs(t, 2)
        torch.testing.assert_close(runner(**kw)[0], first(ref(**kw)), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_inductor_spans_no_graph_breaks_no_recompiles():
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    tm = make_tiny("tiny-pixart")
    ref, dec_ref, _ = generate(tm, "block", "step_forecast", "forecast")
    dynamo.reset()
    counters.clear()
    with dynamo.config.patch(error_on_recompile=True):
        got, dec, opt = generate(tm, "auto", "step_forecast", "forecast", backend="inductor")
    assert sum(counters["graph_break"].values()) == 0
    assert dec == dec_ref and any(any(d) for d in dec)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


class _TwoLists(torch.nn.Module):
    """Two block lists with a layer between them (``mid`` reads the first list's output), and a
    timestep-only value computed between them (``temb2``, independent of the blocks)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        from fx_fastcache.zoo import CustomBlock

        self.proj_in = torch.nn.Linear(4, dim)
        self.temb = torch.nn.Linear(1, dim)
        self.first = torch.nn.ModuleList([CustomBlock(dim) for _ in range(2)])
        self.mid = torch.nn.Linear(dim, dim)
        self.second = torch.nn.ModuleList([CustomBlock(dim) for _ in range(2)])
        self.proj_out = torch.nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, mid: bool = True) -> torch.Tensor:
        temb = torch.nn.functional.silu(self.temb(timestep.view(-1, 1) / 1000.0))
        h = self.proj_in(x)
        for block in self.first:
            h = block(h, temb)
        temb2 = temb * 2.0
        if mid:
            h = self.mid(h)
        for block in self.second:
            h = block(h, temb2)
        return self.proj_out(h)


@pytest.mark.parametrize("mid", [True, False])
def test_two_block_lists_share_a_span_only_if_nothing_reads_between(mid):
    torch.manual_seed(0)
    model = _TwoLists().eval()
    x = torch.randn(2, 10, 4)
    outs = {}
    for span in ("auto", "block"):
        opt = fastcache.optimize(model, backend="eager", blocks=["first", "second"], span=span,
                                 cache_ratio_threshold=0.5, warmup_steps=2)
        outs[span] = [opt(x=x, timestep=torch.full((2,), t), mid=mid).clone() for t in STEPS]
        guards = opt.entries()[0].guards
        if span == "auto":
            assert [len(g.blocks) for g in guards] == ([2, 2] if mid else [4])
            assert fastcache.get_cache_statistics(opt)["blocks_approximated"] > 0
    for a, b in zip(outs["auto"], outs["block"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _WriteBetween(TinyStack):
    """An in-place write after block 0 and no read of any block: to the conditioning every block reads
    (``shared``) or to one only the later blocks read."""

    def __init__(self, shared: bool, dim: int = 16) -> None:
        super().__init__(blocks=3, dim=dim)
        self.shared = shared

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h, temb = self.embed(x, timestep)
        late = temb * 2.0
        for i, block in enumerate(self.blocks):
            h = block(h, temb if i == 0 or self.shared else late)
            if i == 0:
                (temb if self.shared else late).mul_(0.5)
        return self.proj_out(h)


@pytest.mark.parametrize("shared", [True, False])
def test_an_in_place_write_between_blocks_cuts_the_span_if_the_span_reads_it(shared):
    """Moving ``temb.mul_(0.5)`` (after block 0) in front of the span made block 0 read the halved
    conditioning: 0.10 off the model with approximation off."""
    torch.manual_seed(0)
    model = _WriteBetween(shared).eval()
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(1))
    outs = {}
    with torch.no_grad():
        for span in ("auto", "block"):
            off = fastcache.optimize(model, backend="eager", blocks="blocks", span=span, enable_block_approx=False)
            opt = fastcache.optimize(model, backend="eager", blocks="blocks", span=span, cache_ratio_threshold=1e6,
                                     warmup_steps=2)
            outs[span] = []
            for t in STEPS[:4]:
                kw = dict(x=x, timestep=torch.full((2,), t))
                torch.testing.assert_close(off(**kw), model(**kw), rtol=0, atol=1e-6)
                outs[span].append(opt(**kw).clone())
            if span == "auto":
                assert [len(g.blocks) for g in off.entries()[0].guards] == ([1, 2] if shared else [3])
            assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == 2 * 3
    for a, b in zip(outs["auto"], outs["block"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _AutocastBetween(TinyStack):
    """A region (torch.autocast, exported as a call of a submodule) between two blocks."""

    def __init__(self, mode: str, dim: int = 16) -> None:
        super().__init__(blocks=3, dim=dim)
        self.mode = mode

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h, temb = self.embed(x, timestep)
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if i == 0:
                with torch.autocast("cpu", enabled=False):
                    if self.mode == "value":
                        temb = temb * 0.5
                    elif self.mode == "write":
                        temb.mul_(0.5)
                    else:  # through a view; nothing reads the region's outputs
                        temb[:, :8].mul_(0.5)
        return self.proj_out(h)


@pytest.mark.parametrize("mode", ["value", "write", "view"])
def test_a_region_between_blocks_moves_with_its_body(mode):
    """The span pass moved the region's call in front of the span and left the submodule it reads behind
    (a raw FX "used before it has been defined" at capture); a write inside the region was not seen (the
    region moved in front of block 0, 0.10 off), and a region whose outputs nobody read was dropped as dead
    with its write (0.04 off)."""
    torch.manual_seed(0)
    model = _AutocastBetween(mode).eval()
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(1))
    opt = exact_without_approximation(model, x, STEPS[:2])
    assert [len(g.blocks) for g in opt.entries()[0].guards] == ([3] if mode == "value" else [1, 2])
