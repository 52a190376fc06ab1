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
from fx_fastcache.trained import NULL_CLASS, _initial_noise, load_trained

RULES = ("lin", "x0c", "x0l", "mix")


def _extrapolate(hist: list[dict], s: torch.Tensor, key: str) -> torch.Tensor:
    """``key`` linear in σ through the last two computed steps (the last one if there is one)."""
    if len(hist) == 1:
        return hist[-1][key]
    a, b = hist[-2], hist[-1]
    return b[key] + (s - b["s"]) / (b["s"] - a["s"]) * (b[key] - a[key])


class Emulator:
    def __init__(self, model: str, steps: int = 20, cfg: float = 2.0, first_seed: int = 1000, images: int = 16):
        self.tm = load_trained(model)
        self.seeds = list(range(first_seed, first_seed + images))
        self.y = torch.tensor([i % 10 for i in range(images)])
        self.sig = torch.linspace(1.0, 0.0, steps + 1)
        self.steps, self.cfg = steps, cfg

    def _call(self, x: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tm = self.tm
        out = tm.unpack_output(tm.model(**tm.call_kwargs(x, s.expand(len(x)) * 1.0, y))[0])
        return out[:, : x.shape[1]]

    def _skip(self, hist: list[dict], s: torch.Tensor, x: torch.Tensor, rule: str) -> torch.Tensor:
        v = _extrapolate(hist, s, "v")
        if rule == "lin":
            return v
        x0 = hist[-1]["x0"] if rule == "x0c" else _extrapolate(hist, s, "x0")
        vx = (x - x0) / s
        return vx if rule in ("x0c", "x0l") else 0.5 * (v + vx)

    @torch.no_grad()
    def run(self, plan: str, rule: str = "lin", uncond: str = "lin") -> torch.Tensor:
        tm, y, sig = self.tm, self.y, self.sig
        null = torch.full_like(y, NULL_CLASS)
        x = _initial_noise(self.seeds, (tm.in_channels, tm.sample_size, tm.sample_size), tm.device, tm.dtype)
        hc: list[dict] = []  # computed steps of the conditional row: {"s", "v", "x0"}
        hu: list[dict] = []
        for i, letter in enumerate(plan):
            s = sig[i]
            if letter == "F":
                c, u = self._call(torch.cat([x, x]), s, torch.cat([y, null])).chunk(2)
            elif letter == "C":
                c = self._call(x, s, y)
                if uncond == "lin":
                    u = self._skip(hu, s, x, "lin")
                else:  # the guidance difference of the last full step
                    u = c - (hc[-1]["v"] - hu[-1]["v"])
            else:
                c, u = self._skip(hc, s, x, rule), self._skip(hu, s, x, rule)
            if letter in "FC":
                hc.append({"s": s, "v": c, "x0": x - s * c})
            if letter == "F":
                hu.append({"s": s, "v": u, "x0": x - s * u})
            x = x + (sig[i + 1] - s) * (u + self.cfg * (c - u))
        return x.clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dit-mnist")
    ap.add_argument("--rules", default="lin", help=f"comma-separated, of {', '.join(RULES)}")
    ap.add_argument("--uncond", default="lin", choices=("lin", "diff"), help="the unconditional row at a C step")
    ap.add_argument("--plans", nargs="+", required=True, help="one letter (F, S, C) per step, 20 steps")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rules = a.rules.split(",")
    for r in rules:
        if r not in RULES:
            raise SystemExit(f"--rules: {r!r} is not one of {', '.join(RULES)}")
    em = Emulator(a.model)
    for p in a.plans:
        if len(p) != em.steps or set(p) - set("FSC") or p[0] != "F":
            raise SystemExit(f"--plans: {p!r} must be {em.steps} letters of F, S, C starting with F")
    ref = em.run("F" * em.steps)
    for p in a.plans:
        cost = p.count("F") + 0.5 * p.count("C")
        for r in rules:
            q = psnr(em.run(p, r, a.uncond), ref)
            print(f"{a.model} {p} rule={r} uncond={a.uncond}: {100 * (1 - cost / em.steps):.1f} % replaced, "
                  f"{q.mean():.1f} ({q.min():.1f}) dB", flush=True)


if __name__ == "__main__":
    main()
