"""The noise forecast switched per skipped step instead of per fraction: does a mask searched on calibration
images keep the forecast's worst image and the plain fallback's mean?

Why it exists: ``search_plan`` chooses the noise forecast per fraction; on dit-mnist at 70 % replaced it gives
34.11 (27.72) with it and 35.17 (22.10) without it, each half of the target met by one of the two
(docs/BENCHMARKS.md, "Twenty-fifth session"), and the emulation found the forecast's gain in the early skipped
steps.  This runs a fixed plan (one letter per step, ``F`` computed, ``S`` skipped) through the library
(``policy="schedule"``, ``fallback="forecast"``, ``drift_correction`` with damping β, ``noise_forecast``) and
switches the forecast between steps (the store tensor ``noise_forecast.enabled``, set from the sampler's
``on_step``).  The mask starts all on or all off and is searched by coordinate descent over the skipped steps on
``--search-images`` calibration images (seeds 0, 1, ...; score: the mean or the worst-quarter PSNR), then
measured on the evaluation images (seeds 1000, ...) beside all on and all off::

    python benchmarks/noise_steps.py --model dit-mnist --plan FFSFSSFSSSSFSSSSFSSS --damping 2 --start off

Two variants of the forecast itself: ``--gain g`` scales the extrapolated slope (``ε̂ = ε_c + g · r · (ε_c − ε_p)``;
1 is the library's, 0 holds the last ε) and ``--variable logsnr`` extrapolates linearly in ``λ = log((1 − σ) / σ)``
instead of σ (the variable DPM-Solver's multistep updates are linear in).  Both replace
:class:`~fx_fastcache.runtime.noise_forecast.NoiseForecast`'s ``slope`` in this process only
(:func:`variant_slope`; ``gain=1, variable="sigma"`` is the library's, which tests/test_bench_scripts.py checks).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

#: σ is kept inside (0, 1) before the log-SNR is taken (step 0 has σ = 1).
_LOGSNR_EPS = 1e-3


def to_variable(sig: torch.Tensor, variable: str) -> torch.Tensor:
    """The variable the forecast extrapolates ε linearly in."""
    if variable == "sigma":
        return sig
    s = sig.clamp(_LOGSNR_EPS, 1 - _LOGSNR_EPS)
    return torch.log((1 - s) / s)


def variant_slope(gain: float, variable: str):
    """``NoiseForecast.slope`` scaled by ``gain`` and taken in ``variable``."""
    from fx_fastcache.runtime.noise_forecast import _safe

    def slope(self, sig, count):
        u, u_c, u_p = (to_variable(q, variable) for q in (sig, self.s_c, self.s_p))
        ok = (count >= 2) & (u_c != u_p)
        return torch.where(ok, gain * (u - u_c) / _safe(u_c - u_p), torch.zeros_like(self.s_c))

    return slope


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-mnist")
    p.add_argument("--plan", required=True, help="one letter (F or S) per step, 20 steps")
    p.add_argument("--damping", type=float, default=0.0, help="the drift correction's damping β")
    p.add_argument("--start", choices=("on", "off"), default="on", help="the mask the search starts from")
    p.add_argument("--objective", choices=("mean", "worst_quarter"), default="mean")
    p.add_argument("--passes", type=int, default=2, help="coordinate-descent sweeps over the skipped steps")
    p.add_argument("--search-images", type=int, default=16)
    p.add_argument("--eval-seed", type=int, default=1000)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--mask", default=None, help="skip the search: measure this mask (one letter per step, N or "
                                                "O: noise forecast on / off)")
    p.add_argument("--gain", type=float, default=1.0, help="the forecast's slope gain (1: the library's)")
    p.add_argument("--variable", choices=("sigma", "logsnr"), default="sigma",
                   help="extrapolate ε linearly in σ (the library's) or in the log-SNR")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    steps = 20
    if len(a.plan) != steps or set(a.plan) - {"F", "S"}:
        p.error(f"--plan {a.plan!r}: give one letter, F or S, per step ({steps})")
    if a.mask is not None and (len(a.mask) != steps or set(a.mask) - {"N", "O"}):
        p.error(f"--mask {a.mask!r}: give one letter, N or O, per step ({steps})")
    torch.set_num_threads(a.threads)
    import fx_fastcache as fastcache
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.policies.planned import set_damping, set_noise_forecast, worst_quarter
    from fx_fastcache.runtime.noise_forecast import ENABLED_KEY, NoiseForecast
    from fx_fastcache.trained import load_trained, sample

    if (a.gain, a.variable) != (1.0, "sigma"):
        NoiseForecast.slope = variant_slope(a.gain, a.variable)
    tm = load_trained(a.model)
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", warmup_steps=0,
                             drift_correction="flow_euler", noise_forecast="flow_euler")
    set_damping(opt.store, a.damping, opt.device)
    table = torch.tensor([c == "S" for c in a.plan]).unsqueeze(1).expand(steps, len(opt.block_names()))
    fastcache.set_schedule(opt, table.contiguous())
    set_noise_forecast(opt.store, 1.0, opt.device)  # the switch the graphs will read (made before capture)
    enabled = opt.store.tensors[ENABLED_KEY]
    skipped = [i for i, c in enumerate(a.plan) if c == "S"]

    def images(seed0: int, n: int):
        return [i % 10 for i in range(n)], [seed0 + i for i in range(n)]

    def run(mask: list[bool], classes, seeds) -> torch.Tensor:
        def on_step(i: int) -> None:  # the switch for the next step
            if i + 1 < steps:
                enabled.fill_(float(mask[i + 1]))
        enabled.fill_(float(mask[0]))
        fastcache.reset(opt)
        return sample(tm, classes, seeds, steps=steps, model=opt, on_step=on_step)

    def word(mask):
        return "".join("N" if m else "O" for m in mask)

    cal = images(0, a.search_images)
    t0 = time.perf_counter()
    if a.mask is None:
        ref = sample(tm, *cal, steps=steps)
        score_of = (lambda q: float(q.mean())) if a.objective == "mean" else worst_quarter
        mask = [a.start == "on"] * steps
        best = score_of(psnr(run(mask, *cal), ref))
        runs = 1
        for sweep in range(a.passes):
            moved = False
            for k in skipped:
                trial = list(mask)
                trial[k] = not trial[k]
                s = score_of(psnr(run(trial, *cal), ref))
                runs += 1
                if s > best:
                    mask, best, moved = trial, s, True
            print(json.dumps({"sweep": sweep, "mask": word(mask), "score": round(best, 3), "runs": runs,
                              "s": round(time.perf_counter() - t0, 1)}), flush=True)
            if not moved:
                break
    else:
        mask = [c == "N" for c in a.mask]
    ev = images(a.eval_seed, a.images)
    ref = sample(tm, *ev, steps=steps)
    for name, m in (("on", [True] * steps), ("off", [False] * steps), ("mask", mask)):
        q = psnr(run(m, *ev), ref)
        print(json.dumps({"model": a.model, "plan": a.plan, "damping": a.damping, "gain": a.gain,
                          "variable": a.variable, "noise": name, "mask": word(m),
                          "seeds": f"{ev[1][0]}-{ev[1][-1]}", "psnr_mean": round(float(q.mean()), 2),
                          "psnr_worst": round(float(q.min()), 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
