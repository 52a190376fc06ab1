"""Prototype: pick step_forecast's threshold per model from a calibration run, for a target fraction.

The step rule's fraction replaced at a fixed ``cache_ratio_threshold`` is model dependent
(issue #13: 0.07 replaced 45 % on dit-mnist, 60 % on pixart-mnist, 35 % on an unseen model, 0 %
at 0.05).  This script records block 0's probe (the input of its first attention projection,
what ``step_forecast`` looks at) on the calibration seeds of an *uncached* run, then simulates
the rule offline on those probes (computed steps: warm-up, then ``d > τ`` or the ``max_skip``
cap) and bisects τ for a target fraction.  The simulated fraction is checked against the real
runs of the sweep (``--check out/sweep/MODEL-ours.json``).

    python benchmarks/target_fraction.py --model dit-mnist --targets 0.45 0.55 0.65
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fx_fastcache.policies.step_forecast import simulate as replay


def probe_module(model):
    blk = model.transformer_blocks[0]
    attn = getattr(blk, "attn1", None) or getattr(blk, "attn")
    return attn.to_q


@torch.no_grad()
def record_probes(tm, classes, seeds, steps=20, cfg=2.0):
    from fx_fastcache.trained import sample

    us = []
    h = probe_module(tm.model).register_forward_pre_hook(lambda _m, a: us.append(a[0].detach().float().clone()))
    try:
        sample(tm, classes, seeds, steps=steps, cfg=cfg)
    finally:
        h.remove()
    t = torch.linspace(1.0, 0.0, steps + 1)[:steps] * 1000
    return torch.stack(us), t  # (steps, B, N, D)


def simulate(us, t, tau, warmup=2, max_skip=0):
    """Decisions of step_forecast on recorded probes (the library's offline replay); the computed steps."""
    return replay(list(us), [float(x) for x in t], tau, warmup, max_skip)


def fraction(us, t, tau, **kw):
    return 1 - len(simulate(us, t, tau, **kw)) / us.shape[0]


def tau_for(us, t, target, lo=1e-4, hi=2.0, iters=30, **kw):
    """Smallest τ (geometric bisection) whose simulated fraction reaches ``target``."""
    if fraction(us, t, hi, **kw) < target:
        return hi
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        if fraction(us, t, mid, **kw) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dit-mnist")
    p.add_argument("--calib-images", type=int, default=4)
    p.add_argument("--targets", type=float, nargs="*", default=[0.45, 0.55, 0.6, 0.65, 0.7])
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.06, 0.07, 0.08, 0.09, 0.11, 0.13])
    p.add_argument("--check", default=None, help="sweep JSON with real step_forecast runs")
    p.add_argument("--max-skip", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from fx_fastcache.trained import load_trained

    tm = load_trained(a.model)
    n = a.calib_images
    us, t = record_probes(tm, [(3 * i + 7) % 10 for i in range(n)], list(range(n)))
    print(f"{a.model}: probes {tuple(us.shape)}")
    # per-step one-step-forecast deviation of the uncached run (what calibration's step stat sees)
    d1 = [float(((us[i] - (2 * us[i - 1] - us[i - 2])).flatten(1).norm(dim=1)
                 / us[i].flatten(1).norm(dim=1)).max()) for i in range(2, us.shape[0])]
    print("one-step d (uncached): median %.4f, min %.4f, max %.4f" % (sorted(d1)[len(d1) // 2], min(d1), max(d1)))
    for thr in a.thresholds:
        print(f"  τ={thr:.3f}: simulated {100 * fraction(us, t, thr, max_skip=a.max_skip):.0f}% replaced")
    taus = {tg: tau_for(us, t, tg, max_skip=a.max_skip) for tg in a.targets}
    for tg, tau in taus.items():
        print(f"  target {100 * tg:.0f}% -> τ={tau:.4f} (computed steps {simulate(us, t, tau, max_skip=a.max_skip)})")
    if a.check and Path(a.check).is_file():
        res = json.loads(Path(a.check).read_text())
        for r in res["runs"]:
            if r.get("policy") == "step_forecast" and not r.get("max_skip_steps"):
                print(f"  real τ={r['threshold']:.3f}: {100 * r['replaced_fraction']:.0f}% replaced, "
                      f"PSNR {r['psnr_mean']:.2f} ({r['psnr_worst']:.2f})")
    print(json.dumps({"model": a.model, "taus": {str(k): v for k, v in taus.items()}}))


if __name__ == "__main__":
    main()
