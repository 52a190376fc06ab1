"""The step rule deciding per image (one image per call) against one batched call for all images.

Every sweep generates its evaluation images in one batched call, where a step is skipped only when every
image's statistic passes; users of large models generate one image per call, where each image decides for
itself.  Same calibration (seeds 0–3, batched), same thresholds, same evaluation images (seeds 1000 + i,
classes i % 10); PSNR against the uncached images.

    python benchmarks/per_image_decisions.py --model dit-mnist --thresholds 0.07 0.11
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dit-mnist")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.07, 0.11])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--drift", action="store_true", help="drift_correction='flow_euler'")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import fx_fastcache as fastcache
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.trained import load_trained, sample

    tm = load_trained(a.model)
    classes, seeds = [i % 10 for i in range(a.images)], [1000 + i for i in range(a.images)]
    ref = sample(tm, classes, seeds)
    opt = fastcache.optimize(tm.model, backend="eager", policy="step_forecast", fallback="forecast",
                             drift_correction="flow_euler" if a.drift else "none")
    with fastcache.calibrate(opt):
        sample(tm, [0, 1, 2, 3], [0, 1, 2, 3], model=opt)
    print("threshold | batched: replaced, mean (worst, seed) | per image: replaced [range], mean (worst, seed)")
    for thr in a.thresholds:
        fastcache.configure(opt, cache_ratio_threshold=thr)
        fastcache.reset(opt)
        pb = psnr(sample(tm, classes, seeds, model=opt), ref)
        batched = fastcache.get_cache_statistics(opt)["block_approx_ratio"]
        images, fractions = [], []
        for c, s in zip(classes, seeds):
            fastcache.reset(opt)
            images.append(sample(tm, [c], [s], model=opt))
            fractions.append(fastcache.get_cache_statistics(opt)["block_approx_ratio"])
        pi = psnr(torch.cat(images), ref)
        print(f"{thr} | {batched:.0%}, {pb.mean():.1f} ({pb.min():.1f}, {seeds[int(pb.argmin())]}) | "
              f"{sum(fractions) / len(fractions):.0%} [{min(fractions):.0%}–{max(fractions):.0%}], {pi.mean():.1f} "
              f"({pi.min():.1f}, {seeds[int(pi.argmin())]})", flush=True)


if __name__ == "__main__":
    main()
