"""CUDA-only checks of step dispatch: CUDA graphs really replay, and the numerics are those of the
in-graph guards.  Skipped without a CUDA device (CI); run on the GPU machine with
``python -m pytest -q tests/test_cuda.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

import fx_fastcache as fastcache
from fx_fastcache.step_dispatch import StepDispatch
from fx_fastcache.zoo import make_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: these tests check CUDA-graph replay of step dispatch; "
                                       "run them on a machine with an NVIDIA GPU")

STEPS = torch.linspace(999, 20, 10).tolist()


def _cuda_inputs(tm, t: float) -> dict:
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in tm.make_inputs(t, 2).items()}


@pytest.mark.parametrize("policy, fallback", [("step_forecast", "forecast"), ("schedule", "residual_linear"),
                                              ("first_block_cache", "residual")],
                         ids=["step_forecast-device", "schedule-host", "first_block_cache-device"])
def test_dispatch_replays_cuda_graphs_and_matches_in_graph(policy: str, fallback: str) -> None:
    tm = make_tiny("tiny-pixart", layers=4)
    tm.model.cuda()
    thr = 0.5 if policy == "first_block_cache" else 0.1
    ref, opt = (fastcache.optimize(tm.model, backend="eager", policy=policy, fallback=fallback,
                                   cache_ratio_threshold=thr) for _ in range(2))
    if policy == "schedule":
        table = torch.zeros(len(STEPS), len(ref.block_names()), dtype=torch.bool)
        table[2:, ::2] = True
        for m in (ref, opt):
            fastcache.set_schedule(m, table)
    disp = StepDispatch(opt, compile_mode="reduce-overhead")
    dynamo_utils.counters.clear()
    with torch.no_grad():
        for rep in range(2):  # the second generation replays what the first recorded
            ref.reset()
            disp.reset()
            for t in STEPS:
                a = ref(**_cuda_inputs(tm, t))[0]
                b = disp(**_cuda_inputs(tm, t))[0]
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert dynamo_utils.counters["inductor"]["cudagraph_skips"] == 0, dict(dynamo_utils.counters["inductor"])
    assert not dynamo_utils.counters["graph_break"]
    s_ref, s_opt = fastcache.get_cache_statistics(ref), fastcache.get_cache_statistics(opt)
    assert s_opt["blocks_approximated"] == s_ref["blocks_approximated"] > 0


def test_offload_round_trips_keep_the_cuda_graphs() -> None:
    """Model CPU offload moves the transformer to the GPU at every pipeline call and back after it: the graphs
    captured on the GPU are kept while it is on the CPU and replay when it comes back, with the numerics of a
    model that never moved, and no new capture or compile."""
    tm = make_tiny("tiny-pixart", layers=4)
    tm.model.cuda()
    cfg = dict(cache_ratio_threshold=0.1, execution="step_dispatch", dispatch_compile="reduce-overhead")
    ref = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=0.1)
    with torch.no_grad():
        want = [ref(**_cuda_inputs(tm, t))[0].clone() for t in STEPS]
    opt = fastcache.optimize(tm.model, backend="inductor", **cfg)
    for trip in range(3):
        with torch.no_grad():
            got = [opt(**_cuda_inputs(tm, t))[0].clone() for t in STEPS]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if trip == 0:
            (entry,) = opt.entries()
            graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        else:
            assert opt.entries() == [entry]
            assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
        opt.to("cpu")
        opt.to("cuda")
        opt.reset()
