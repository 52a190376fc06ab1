"""Guarded spans on the trained models (dit-mnist, pixart-mnist): span="auto" vs "block".

1. No regression: 4 images x 20 steps, eager, default config; same decisions => same images
   (max abs difference of the images in [-1, 1], replaced fraction, per-block decisions).
2. Skipped-step cost: the time of one model call in which every block is approximated (the
   fallback once per span vs once per block), eager, side by side in one process, best of
   ``--repeats``; and the time of a fully computed call, for scale.

    OMP_NUM_THREADS=2 python benchmarks/span_equivalence.py --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

import fx_fastcache as fastcache
from fx_fastcache.trained import load_trained, sample


def skipped_call_time(tm, span: str, repeats: int) -> tuple[float, float]:
    """(seconds per fully skipped call, seconds per fully computed call), eager."""
    opt = fastcache.optimize(tm.model, backend="eager", span=span, cache_ratio_threshold=1e6, warmup_steps=2)
    x, y = torch.randn(8, tm.in_channels, tm.sample_size, tm.sample_size), torch.arange(8) % 10
    best_skip = best_full = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            fastcache.reset(opt)
            for i, sigma in enumerate([0.9, 0.8, 0.7, 0.6]):  # two computed (warm-up), then skipped
                kw = tm.call_kwargs(x, sigma, y)
                t0 = time.perf_counter()
                opt(**kw)
                dt = time.perf_counter() - t0
                if i >= 2:
                    best_skip = min(best_skip, dt)
                else:
                    best_full = min(best_full, dt)
    return best_skip, best_full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("dit-mnist", "pixart-mnist"):
        tm = load_trained(name)
        res = {}
        for span in ("block", "auto"):
            opt = fastcache.optimize(tm.model, backend="eager", span=span)
            imgs = sample(tm, [1, 3, 5, 7], [0, 1, 2, 3], steps=20, model=opt)
            st = fastcache.get_cache_statistics(opt)
            res[span] = (imgs, st["block_approx_ratio"], [b["approximated"] for b in st["per_block"]],
                         len(opt.entries()[0].guards))
        d = float((res["auto"][0] - res["block"][0]).abs().max())
        print(f"{name}: max |auto - block| = {d:.3g}; replaced fraction block {res['block'][1]:.3f} "
              f"auto {res['auto'][1]:.3f}; same per-block decisions: {res['block'][2] == res['auto'][2]}; "
              f"guards block {res['block'][3]} auto {res['auto'][3]}")
        (sb, fb), (sa, fa) = (skipped_call_time(tm, s, args.repeats) for s in ("block", "auto"))
        print(f"{name}: fully skipped call {1e3 * sb:.2f} ms (block) vs {1e3 * sa:.2f} ms (auto) = {sb / sa:.2f}x; "
              f"computed call {1e3 * fb:.1f} / {1e3 * fa:.1f} ms; "
              f"skipped/computed block {sb / fb:.3f} auto {sa / fa:.3f}")


if __name__ == "__main__":
    main()
