"""Does the *shape* of the threshold over a generation matter?  (Negative results, kept honest.)

Two variants of the default step rule on a trained model, both set through run-time buffers
during sampling (no re-capture):

* ``--late K``: force the last K steps to compute in full (``enable_block_approx=False``);
* ``--ramp A:B``: threshold ramps linearly from A (first step) to B (last step).

    python benchmarks/threshold_shape.py --threshold 0.09 --late 0 2 4 --ramp 0.05:0.15 0.04:0.25
"""
from __future__ import annotations

import argparse

import fx_fastcache as fastcache
from fx_fastcache.bench.metrics import psnr
from fx_fastcache.trained import load_trained, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit-mnist")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threshold", type=float, default=0.09)
    ap.add_argument("--late", type=int, nargs="*", default=[0, 2, 4])
    ap.add_argument("--ramp", nargs="*", default=[])
    args = ap.parse_args()
    tm = load_trained(args.model)
    classes = [i % 10 for i in range(args.images)]
    seeds = list(range(1000, 1000 + args.images))  # the evaluation seeds of `fx-fastcache bench`
    ref = sample(tm, classes, seeds, steps=args.steps)
    opt = fastcache.optimize(tm.model, backend="eager")
    last = args.steps - 1

    def report(label: str, out) -> None:
        p = psnr(out, ref)
        ratio = fastcache.get_cache_statistics(opt)["block_approx_ratio"]
        print(f"{args.model} {label}: replaced {ratio:.1%}, PSNR {p.mean():.2f} (worst {p.min():.2f})", flush=True)

    for k in args.late:
        fastcache.reset(opt)
        fastcache.configure(opt, cache_ratio_threshold=args.threshold, enable_block_approx=True)

        def force_late(i: int, k: int = k) -> None:
            if k and i == last - k:
                fastcache.configure(opt, enable_block_approx=False)

        report(f"threshold {args.threshold}, last {k} steps computed",
               sample(tm, classes, seeds, steps=args.steps, model=opt, on_step=force_late))
    fastcache.configure(opt, enable_block_approx=True)
    for spec in args.ramp:
        a, b = (float(v) for v in spec.split(":"))
        fastcache.reset(opt)
        fastcache.configure(opt, cache_ratio_threshold=a)

        def ramp(i: int, a: float = a, b: float = b) -> None:
            fastcache.configure(opt, cache_ratio_threshold=a + (b - a) * (i + 1) / last)

        report(f"threshold ramp {a}->{b}", sample(tm, classes, seeds, steps=args.steps, model=opt, on_step=ramp))


if __name__ == "__main__":
    main()
