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
``--rule`` takes ε̂ from the last *three* computed steps instead (:func:`variant_estimate`: the slope through the
first and last, the mean of the two lines, the wider line after neighbouring computed steps, the parabola) or
holds the slope's low or high spatial frequencies (``lowhold`` / ``highhold``, image-shaped outputs)::

    python benchmarks/noise_steps.py --model sd3-mnist --plan FFFSFSSFSSFSSSFSSSFS --damping 1 \
        --mask NNNNNNNNNNNNNNNNNNNN --rule avg3
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


#: ``--rule``: how ε̂ is taken from the last three computed steps c (latest), p, q (std: the library's).
RULES = ("std", "wide", "avg3", "base2", "quad", "lowhold", "highhold")


def lowpass(d: torch.Tensor) -> torch.Tensor:
    """Two 5×5 box filters over the last two dims (an image-shaped output)."""
    if d.dim() != 4:
        raise ValueError(f"lowhold/highhold need an image-shaped output (B, C, H, W), got {tuple(d.shape)}")
    for _ in range(2):
        d = torch.nn.functional.avg_pool2d(d, 5, stride=1, padding=2, count_include_pad=False)
    return d


def variant_estimate(rule: str, base):
    """``NoiseForecast.estimate`` by ``rule`` (``std`` is the library's), from the last three computed steps c, p, q:
    ``wide`` the line through c and q; ``avg3`` the mean of the std and wide lines; ``base2`` the wide line when p
    is c's neighbour (the latest computed step at least two steps before c); ``quad`` the parabola in σ through c,
    p, q; fewer than three computed steps: ``base`` (the estimate it replaces).  ``lowhold`` / ``highhold``: the
    library's line with the slope's low (high) spatial frequencies held.  Needs :func:`keep_third_step`'s state."""
    from fx_fastcache.runtime.noise_forecast import _safe

    def estimate(self, sig, count):
        std = base(self, sig, count)
        if rule in ("lowhold", "highhold"):
            d = self.eps_c - self.eps_p
            low = lowpass(d)
            return self.eps_c + self.slope(sig, count) * ((d - low) if rule == "lowhold" else low)
        sc, sp, sq = self.s_c, self.s_p, self.s_q
        wide = self.eps_c + (sig - sc) / _safe(sc - sq) * (self.eps_c - self.eps_q)
        if rule == "std":
            alt = std
        elif rule == "wide":
            alt = wide
        elif rule == "avg3":
            alt = 0.5 * (std + wide)
        elif rule == "base2":
            alt = torch.where(self.i_c - self.i_p >= 2, std, wide)
        else:  # quad: Lagrange through (s_c, s_p, s_q)
            lc = (sig - sp) * (sig - sq) / _safe((sc - sp) * (sc - sq))
            lp = (sig - sc) * (sig - sq) / _safe((sp - sc) * (sp - sq))
            lq = (sig - sc) * (sig - sp) / _safe((sq - sc) * (sq - sp))
            alt = lc * self.eps_c + lp * self.eps_p + lq * self.eps_q
        return torch.where(count >= 3, alt, std)

    return estimate


def keep_third_step(cls) -> None:
    """Make ``cls`` (a :class:`NoiseForecast`) also keep the computed step before the last two (``eps_q``, ``s_q``)
    and the step indices of the last two (``i_c``, ``i_p``), which :func:`variant_estimate` reads (in place: the
    pass builds the class it imported)."""
    from fx_fastcache.runtime.state_ops import assign, negate

    init, forward = cls.__init__, cls.forward

    def __init__(self, *args, **kw):
        init(self, *args, **kw)
        self.register_buffer("eps_q", torch.zeros_like(self.eps_c))
        for n in ("s_q", "i_c", "i_p", "step"):
            self.register_buffer(n, torch.zeros_like(self.s_c))

    def keeping(self, skipped, new_gen, t, x, v):
        step = torch.where(new_gen, torch.zeros_like(self.step), self.step)
        before = [b.clone() for b in (self.eps_p, self.s_p, self.i_c)]  # the library shifts p ← c
        out = forward(self, skipped, new_gen, t, x, v)
        computed = negate(skipped)
        for dst, src in zip((self.eps_q, self.s_q, self.i_p), before):
            assign(dst, computed, src)
        assign(self.i_c, computed, step)
        self.step.copy_(step + 1)
        return out

    cls.__init__, cls.forward = __init__, keeping


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
    p.add_argument("--rule", choices=RULES, default="std",
                   help="ε̂ from the last three computed steps (std: the library's two; see variant_estimate)")
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
    if a.rule != "std":
        keep_third_step(NoiseForecast)
        NoiseForecast.estimate = variant_estimate(a.rule, NoiseForecast.estimate)
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
                          "variable": a.variable, "rule": a.rule, "noise": name, "mask": word(m),
                          "seeds": f"{ev[1][0]}-{ev[1][-1]}", "psnr_mean": round(float(q.mean()), 2),
                          "psnr_worst": round(float(q.min()), 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
