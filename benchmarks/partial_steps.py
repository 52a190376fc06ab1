"""Partial steps: is computing half the blocks on twice as many steps better than whole steps?

Why it exists: at 60 % replaced with steps 0–3 computed (what keeps every PixArt image,
docs/BENCHMARKS.md "Sixth session"), a whole-step plan has only four computed steps left for the
other sixteen.  The same block budget buys eight half steps.  This runs plans through the library
(``policy="schedule"``, ``fallback="forecast"``, ``fastcache.set_schedule``) with one letter per step:

* ``F``: every block computes; ``S``: every block is forecast;
* ``a``: the first ``--split`` blocks compute, the rest are forecast;
* ``b``: the first ``--split`` blocks are forecast, the rest compute.

The 16 evaluation images of the benchmark (seeds 1000–1015) against the uncached images::

    python benchmarks/partial_steps.py --model pixart-mnist --plans FFFFSFSSFSSSFSSSFSSS FFFFSabSabSSabSSabSS
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def table_of(plan: str, n_blocks: int, split: int) -> torch.Tensor:
    """The ``steps × blocks`` skip table of a plan string (True = forecast)."""
    table = torch.zeros(len(plan), n_blocks, dtype=torch.bool)
    for s, m in enumerate(plan):
        if m == "S":
            table[s] = True
        elif m == "a":
            table[s, split:] = True
        elif m == "b":
            table[s, :split] = True
        elif m != "F":
            raise ValueError(f"plan {plan!r}: step {s} is {m!r}; use F, S, a or b")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pixart-mnist")
    p.add_argument("--plans", nargs="+", required=True, help="one letter (F, S, a, b) per step, 20 steps")
    p.add_argument("--split", type=int, default=6, help="blocks in the front part")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/partial_steps", help="where the uncached reference images are cached")
    a = p.parse_args(argv)
    steps = 20
    for plan in a.plans:
        if len(plan) != steps:
            p.error(f"plan {plan!r} has {len(plan)} steps; give one letter per step ({steps})")
    torch.set_num_threads(a.threads)
    import fx_fastcache as fastcache
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.trained import load_trained, sample
    from slope_rules import uncached_reference  # benchmarks/ is on sys.path when run as a script

    classes, seeds = [i % 10 for i in range(16)], [1000 + i for i in range(16)]
    tm = load_trained(a.model)
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", fallback="forecast", warmup_steps=0)
    n_blocks = len(opt.block_names())  # every guarded block (Flux: double-stream, then single-stream)
    if not 0 < a.split < n_blocks:
        p.error(f"--split {a.split}: must be between 1 and {n_blocks - 1} (the model has {n_blocks} blocks)")
    ref = uncached_reference(tm, classes, seeds, steps, Path(a.out) / f"{Path(a.model).name}-reference.pt")
    for plan in a.plans:
        try:
            table = table_of(plan, n_blocks, a.split)
        except ValueError as e:
            p.error(str(e))
        fastcache.set_schedule(opt, table)
        fastcache.reset(opt)
        q = psnr(sample(tm, classes, seeds, steps=steps, model=opt), ref)
        print(json.dumps({"model": a.model, "plan": plan, "split": a.split,
                          "replaced": round(fastcache.get_cache_statistics(opt)["block_approx_ratio"], 3),
                          "psnr_mean": round(float(q.mean()), 2), "psnr_worst": round(float(q.min()), 2)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
