"""What the global decisions cost under context parallelism, and that they change nothing.

Run under torchrun (CPU, gloo; the CPU workarounds of ``fx_fastcache.cpu_parallel`` are applied)::

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/context_parallel.py --config tiny
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/context_parallel.py --config mid

For a Flux transformer with Ulysses context parallelism over 2 processes it prints, side by side
in one run:

* the step time of the optimized model with the statistic's all-reduce, and without it (the same
  graph captured with no process group, at threshold 0 so that no rank ever skips and the ranks
  cannot diverge), alternated step by step, medians; their difference is the all-reduce's cost;
* the all-reduce alone (the decider's ``(2, batch)`` float32 sums), median of many calls;
* the skip pattern and skip fraction of a 10-step Euler run at ``--threshold``, single process
  and per rank, and the largest output difference between them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def build(config: str, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    if config == "tiny":
        from fx_fastcache.zoo import tiny_flux

        tm = tiny_flux(seed)
        return tm.model, tm.make_inputs
    # mid: 2 double + 2 single blocks, dim 256, 3072 image tokens (a 48x64 latent) + 128 text tokens
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
                               num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                               axes_dims_rope=(16, 24, 24)).eval()
    h, w, txt = 48, 64, 128

    def inputs(t: float, batch: int = 1) -> dict:
        g = torch.Generator().manual_seed(seed + 1)
        ids = torch.zeros(h * w, 3)
        ids[:, 1] = torch.arange(h * w) // w
        ids[:, 2] = torch.arange(h * w) % w
        return dict(hidden_states=torch.randn(batch, h * w, 16, generator=g),
                    encoder_hidden_states=torch.randn(batch, txt, 64, generator=g),
                    pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), t / 1000.0),
                    img_ids=ids, txt_ids=torch.zeros(txt, 3), guidance=None, return_dict=False)

    return m, inputs


def euler(model, make_inputs, steps: int):
    import fx_fastcache as fastcache

    kw = make_inputs(1000.0)
    x = kw["hidden_states"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    pattern = []
    for i in range(steps):
        before = fastcache.get_cache_statistics(model)["blocks_approximated"]
        v = model(**dict(kw, hidden_states=x, timestep=make_inputs(float(sigmas[i]) * 1000.0)["timestep"]))[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        pattern.append(fastcache.get_cache_statistics(model)["blocks_approximated"] - before)
    return x, pattern


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["tiny", "mid"], default="tiny")
    p.add_argument("--threshold", type=float, default=0.112)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backend", choices=["eager", "inductor"], default="eager",
                   help="backend of the context-parallel Euler run (the timing and the reference stay eager)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default: 30 tiny, 6 mid)")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    import fx_fastcache as fastcache
    import fx_fastcache.module as fc_module
    from diffusers import ContextParallelConfig
    from fx_fastcache.cpu_parallel import patch_diffusers_for_cpu
    from fx_fastcache.runtime.distributed import all_reduce_sum

    patch_diffusers_for_cpu()
    say = print if rank == 0 else (lambda *a, **k: None)
    model, make_inputs = build(args.config)
    n_tokens = make_inputs(0.0)["hidden_states"].shape[1]
    kw = dict(backend="eager", policy="step_forecast", fallback="forecast", warmup_steps=2)

    ref, ref_pattern = euler(fastcache.optimize(model, cache_ratio_threshold=args.threshold, **kw), make_inputs,
                             args.steps)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    # -- A/B: the same graph with and without the statistic's all-reduce (threshold 0: nobody skips)
    with_group = fastcache.optimize(model, cache_ratio_threshold=0.0, **kw)
    auto = fc_module.process_group_of
    fc_module.process_group_of = lambda m: None  # benchmark only: capture without the group
    try:
        without = fastcache.optimize(model, cache_ratio_threshold=0.0, **kw)
        without(**make_inputs(1000.0))
    finally:
        fc_module.process_group_of = auto
    with_group(**make_inputs(1000.0))
    repeats = args.repeats or (30 if args.config == "tiny" else 6)
    times: dict[str, list[float]] = {"with": [], "without": []}
    for i in range(repeats):
        for name, opt in (("with", with_group), ("without", without)):
            inp = make_inputs(900.0 - i)
            dist.barrier()
            t0 = time.perf_counter()
            opt(**inp)
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    step_with, step_without = statistics.median(times["with"]), statistics.median(times["without"])

    batch = make_inputs(0.0)["hidden_states"].shape[0]
    x = torch.rand(2, batch)
    for _ in range(20):
        all_reduce_sum(x, dist.group.WORLD)
    ar = []
    for _ in range(500):
        t0 = time.perf_counter()
        all_reduce_sum(x, dist.group.WORLD)
        ar.append(time.perf_counter() - t0)
    ar_time = statistics.median(ar)

    # -- the decisions and the output against the single process
    opt = fastcache.optimize(model, cache_ratio_threshold=args.threshold, **dict(kw, backend=args.backend))
    out, pattern = euler(opt, make_inputs, args.steps)
    err = float((out - ref).abs().max())
    every = [None] * world
    dist.all_gather_object(every, (pattern, err))
    n_blocks = len(fastcache.get_cache_statistics(opt)["per_block"])

    say(f"## Flux ({args.config}: {n_blocks} blocks, {n_tokens} image tokens, batch {batch}), Ulysses over {world} "
        f"processes, CPU gloo, 1 thread each")
    say("| step with all-reduce | step without | difference | all-reduce alone | all-reduce / step |")
    say("|---|---|---|---|---|")
    say(f"| {step_with * 1e3:.2f} ms | {step_without * 1e3:.2f} ms | {(step_with - step_without) * 1e3:+.2f} ms | "
        f"{ar_time * 1e6:.0f} us | {ar_time / step_with:.2%} |")
    frac = sum(ref_pattern) / (n_blocks * args.steps)
    say(f"\nthreshold {args.threshold}, {args.steps} Euler steps: single process (eager) skips {ref_pattern} "
        f"({frac:.0%} of block evaluations)")
    for r, (pat, e) in enumerate(every):
        say(f"rank {r} ({args.backend}): skips {pat} ({sum(pat) / (n_blocks * args.steps):.0%}), "
            f"{'same' if pat == ref_pattern else 'DIFFERENT'} pattern, max |output - single process| = {e:.2e}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
