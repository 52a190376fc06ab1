"""Shared fixtures: tiny models of every family and a sampling-loop helper."""
from __future__ import annotations

import os

import pytest
import torch

from fx_fastcache.runtime.routing import attention_context_fn
from fx_fastcache.zoo import TINY, make_tiny

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one intra-op thread per worker, not 2 × the cores
    torch.set_num_threads(1)

FAMILIES = ["tiny-dit", "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-custom",
            "tiny-cogvideox", "tiny-ltx-video", "tiny-wan", "tiny-hunyuan-video"]  # the last four: video DiTs
TIMESTEPS = [1000.0, 900.0, 800.0, 700.0, 600.0, 500.0]
#: diffusers models registered beyond the eight families above (tests of their block lists only)
MORE_FAMILIES = ["tiny-qwenimage", "tiny-chroma", "tiny-flux2", "tiny-wan-vace", "tiny-z-image", "tiny-flux3",
                 "tiny-ltx2", "tiny-wan-animate", "tiny-kandinsky5", "tiny-kandinsky6", "tiny-longcat-image",
                 "tiny-ovis-image", "tiny-cogview3plus", "tiny-hunyuan-video15",
                 "tiny-hunyuan-image"]


#: Families whose block structure differs most: plain (DiT), joint + single lists (Flux), video with a
#: joint attention mask (HunyuanVideo).  Matrices over families × policies run every policy on these.
STRUCTURAL = ("tiny-dit", "tiny-flux", "tiny-hunyuan-video")


def family_policy_cases(policies) -> list:
    """``(family, policy)`` pairs: every policy on the :data:`STRUCTURAL` families, and each other
    family with one policy, in turn (every family and every policy covered, the suite kept short)."""
    others = [f for f in FAMILIES if f not in STRUCTURAL]
    return ([(f, p) for f in STRUCTURAL for p in policies]
            + [(f, policies[i % len(policies)]) for i, f in enumerate(others)])


@pytest.fixture(autouse=True)
def _diffusers_attention_backend():
    """diffusers' ``set_attention_backend`` on any model also sets the process-wide backend, which every
    other model then uses: restore it after each test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = before


def exact_without_approximation(model, x, steps, **config):
    """``optimize(model, enable_block_approx=False, blocks="blocks")`` called as ``model(x=..., timestep=...)``
    at ``steps`` equals ``model`` (to 1e-6); returns the optimized model."""
    import fx_fastcache as fastcache

    opt = fastcache.optimize(model, backend="eager", blocks="blocks", enable_block_approx=False, **config)
    with torch.no_grad():
        for t in steps:
            kw = dict(x=x, timestep=torch.full((x.shape[0],), t))
            torch.testing.assert_close(opt(**kw), model(**kw), rtol=0, atol=1e-6)
    return opt


class TinyStack(torch.nn.Module):
    """The smallest model of no family: tokens ``x`` (B, N, 4) in, ``dim`` channels through ``blocks`` (``make(dim)``,
    zoo's ``CustomBlock`` by default; called ``block(h, temb)``), 4 out.  Test models vary ``forward`` around
    :meth:`embed`."""

    def __init__(self, blocks: int = 3, dim: int = 16, make=None) -> None:
        super().__init__()
        from fx_fastcache.zoo import CustomBlock

        make = make or CustomBlock
        self.proj_in, self.temb, self.proj_out = torch.nn.Linear(4, dim), torch.nn.Linear(1, dim), torch.nn.Linear(dim, 4)
        self.blocks = torch.nn.ModuleList([make(dim) for _ in range(blocks)])

    def embed(self, x, timestep):
        """``(h, temb)``: the tokens projected in and the timestep's conditioning."""
        temb = torch.nn.functional.silu(self.temb(timestep.view(-1, 1) / 1000.0))
        return self.proj_in(x), temb

    def forward(self, x, timestep):
        h, temb = self.embed(x, timestep)
        for b in self.blocks:
            h = b(h, temb)
        return self.proj_out(h)


def first(out):
    """The sample tensor of a model output (tuple, dataclass or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        out = out[0]
    else:
        out = getattr(out, "sample", out)
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image: a list of per-sample tensors


def run_loop(model, tm, timesteps=TIMESTEPS, batch: int = 2) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first(model(**tm.make_inputs(t, batch))).clone() for t in timesteps]


def call_with_full_context(orig, block, bound, x_full):
    """``orig(*bound)``; DiT/PixArt blocks: self-attention keys/values from all tokens ``x_full``
    (what the routed graph does for these families)."""
    fn = attention_context_fn(block)
    if fn is None:
        return orig(*bound.args, **bound.kwargs)
    context = fn(block, bound.arguments, x_full)
    attn = block.attn1
    a_orig = attn.forward
    attn.forward = lambda h, encoder_hidden_states=None, **kw: a_orig(h, encoder_hidden_states=context, **kw)
    try:
        return orig(*bound.args, **bound.kwargs)
    finally:
        attn.__dict__.pop("forward", None)


def calibrated_file(tm, path, **config):
    """An optimized ``tm.model`` (eager, ``config``) calibrated on one loop, and its file at ``path``."""
    import fx_fastcache as fastcache

    opt = fastcache.optimize(tm.model, backend="eager", **config)
    with fastcache.calibrate(opt):
        run_loop(opt, tm)
    fastcache.save_calibration(opt, path)
    return opt, path


@pytest.fixture(params=FAMILIES, ids=FAMILIES)
def tiny(request):
    return make_tiny(request.param)


assert set(FAMILIES) | set(MORE_FAMILIES) == set(TINY)
