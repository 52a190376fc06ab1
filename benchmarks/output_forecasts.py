"""Other things to do at a skipped step, emulated on the model's output outside the library: anchor the
forecast on the predicted clean image, or compute the conditional row of classifier-free guidance only.

Why it exists: at 70 % replaced (6 of 20 steps computed) the worst image is far below the 28 dB target
on every model (docs/BENCHMARKS.md, "Thirteenth session").  Two ideas change what a skipped step hands
the sampler rather than which steps compute; this measures them before any library work:

* the rule for a skipped step, per CFG row (``--rules``): ``lin`` extrapolates the velocity linearly in
  σ through the last two computed steps (the ``forecast`` fallback's rule, applied to the output);
  ``x0c`` keeps the last computed prediction of the clean image ``x0 = x − σ v`` and steers the current
  latent to it, ``v = (x − x0) / σ``; ``x0l`` extrapolates ``x0`` linearly in σ instead; ``mix`` is the
  mean of ``lin`` and ``x0l``;
* CFG-split plans (FasterCache's CFG cache): besides ``F`` (both rows computed) and ``S`` (none), a step
  may be ``C``: the conditional row computed, the unconditional one forecast (``--uncond lin``) or taken
  as the new conditional output minus the guidance difference of the last full step (``--uncond diff``).
  A ``C`` step costs half a step, so ``FFSCSCSCSCSCSCSCSCSS`` replaces as much as six whole steps of 20.

Images are the benchmark's 16 evaluation images (seeds 1000–1015, classes ``i % 10``, 20 Euler steps,
guidance 2), compared with the uncached images::

    python benchmarks/output_forecasts.py --model dit-mnist --rules lin,x0c --plans FFSFSSFSSSFSSSSFSSSS
"""
from __future__ import annotations

import argparse

import torch

from fx_fastcache.bench.metrics import psnr
from fx_fastcache.trained import load_trained, sample

RULES = ("lin", "x0c", "x0l", "mix")
STEPS = 20


def _extrapolate(hist: list[dict], s: torch.Tensor, key: str) -> torch.Tensor:
    """``key`` linear in σ through the last two computed steps (the last one if there is one)."""
    if len(hist) == 1:
        return hist[-1][key]
    a, b = hist[-2], hist[-1]
    return b[key] + (s - b["s"]) / (b["s"] - a["s"]) * (b[key] - a[key])


def _skip(hist: list[dict], s: torch.Tensor, x: torch.Tensor, rule: str) -> torch.Tensor:
    """The velocity of one CFG row at a skipped step, by ``rule``."""
    v = _extrapolate(hist, s, "v")
    if rule == "lin":
        return v
    x0 = hist[-1]["x0"] if rule == "x0c" else _extrapolate(hist, s, "x0")
    vx = (x - x0) / s
    return vx if rule in ("x0c", "x0l") else 0.5 * (v + vx)


class PlannedRows:
    """Stands in for the model in :func:`fx_fastcache.trained.sample` (batch ``[cond, uncond]``): computes
    the rows ``plan`` says at each call and hands the sampler the rule's velocity for the others."""

    def __init__(self, model, plan: str, rule: str, uncond: str) -> None:
        self.model, self.plan, self.rule, self.uncond = model, plan, rule, uncond
        self.sig = torch.linspace(1.0, 0.0, len(plan) + 1)  # the sampler's default schedule
        self.i = 0
        self.hc: list[dict] = []  # computed steps of each row: {"s", "v", "x0"}
        self.hu: list[dict] = []

    def __call__(self, **kw):
        letter, s = self.plan[self.i], self.sig[self.i]
        self.i += 1
        x = kw["hidden_states"]
        b = len(x) // 2
        if letter == "F":
            c, u = self.model(**kw)[0].chunk(2)
        elif letter == "C":  # the conditional half of every batched argument
            c = self.model(**{k: v[:b] if isinstance(v, torch.Tensor) and v.ndim and len(v) == 2 * b else v
                              for k, v in kw.items()})[0]
            if self.uncond == "lin":
                u = _skip(self.hu, s, x[b:], "lin")
            else:  # the guidance difference of the last full step
                u = c - (self.hc[-1]["v"] - self.hu[-1]["v"])
        else:
            c, u = _skip(self.hc, s, x[:b], self.rule), _skip(self.hu, s, x[b:], self.rule)
        if letter in "FC":
            self.hc.append({"s": s, "v": c, "x0": x[:b] - s * c})
        if letter == "F":
            self.hu.append({"s": s, "v": u, "x0": x[b:] - s * u})
        return (torch.cat([c, u]),)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dit-mnist")
    ap.add_argument("--rules", default="lin", help=f"comma-separated, of {', '.join(RULES)}")
    ap.add_argument("--uncond", default="lin", choices=("lin", "diff"), help="the unconditional row at a C step")
    ap.add_argument("--plans", nargs="+", required=True, help=f"one letter (F, S, C) per step, {STEPS} steps")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rules = a.rules.split(",")
    for r in rules:
        if r not in RULES:
            raise SystemExit(f"--rules: {r!r} is not one of {', '.join(RULES)}")
    for p in a.plans:
        if len(p) != STEPS or set(p) - set("FSC") or p[0] != "F":
            raise SystemExit(f"--plans: {p!r} must be {STEPS} letters of F, S, C starting with F")
    tm = load_trained(a.model)
    seeds = list(range(1000, 1016))
    classes = [i % 10 for i in range(len(seeds))]
    ref = sample(tm, classes, seeds, steps=STEPS)
    for p in a.plans:
        cost = p.count("F") + 0.5 * p.count("C")
        for r in rules:
            out = sample(tm, classes, seeds, steps=STEPS, model=PlannedRows(tm.model, p, r, a.uncond))
            q = psnr(out, ref)
            print(f"{a.model} {p} rule={r} uncond={a.uncond}: {100 * (1 - cost / STEPS):.1f} % replaced, "
                  f"{q.mean():.1f} ({q.min():.1f}) dB", flush=True)


if __name__ == "__main__":
    main()
