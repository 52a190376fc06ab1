"""Same computed steps, different fallbacks: our ``forecast`` (block input + first-order residual
forecast in t) on TaylorSeer's fixed schedule, against diffusers' TaylorSeer (each block's output
extrapolated in the step index) on that schedule.  Separates "which steps" from "how to fill them".

    python benchmarks/schedule_compare.py --model dit-mnist --before 3 --intervals 2 3
(needs the reference written by peer_sweep.py: out/sweep/MODEL-reference.pt)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dit-mnist")
    p.add_argument("--before", type=int, default=3)
    p.add_argument("--intervals", type=int, nargs="+", default=[3])
    p.add_argument("--out", default="out/sweep")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import fx_fastcache as fastcache
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.bench.peers import taylorseer_computed_steps
    from fx_fastcache.trained import load_trained, sample

    ref = torch.load(Path(a.out) / f"{a.model}-reference.pt")
    key = ref["key"]
    tm = load_trained(a.model)
    n_blocks = len(tm.model.transformer_blocks)
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", fallback="forecast", warmup_steps=0)
    rows = []
    for iv in a.intervals:
        comp = taylorseer_computed_steps(key["steps"], iv, a.before)
        table = torch.ones(key["steps"], n_blocks, dtype=torch.bool)
        table[comp] = False
        fastcache.set_schedule(opt, table)
        fastcache.reset(opt)
        img = sample(tm, key["classes"], key["seeds"], steps=key["steps"], cfg=key["cfg"], model=opt)
        q = psnr(img, ref["images"])
        frac = fastcache.get_cache_statistics(opt)["block_approx_ratio"]
        rows.append({"model": a.model, "schedule": f"taylorseer b{a.before} i{iv}", "computed": comp,
                     "replaced_fraction": frac, "psnr_mean": float(q.mean()), "psnr_worst": float(q.min())})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
