"""Does the forecast's slope rule decide which images break?  A simulator of step plans on a trained
MNIST DiT (DiT, PixArt or SD3 joint blocks), outside the library, with a choice of slope rule.

Why it exists: at 45–60 % replaced one evaluation image per model falls to ~20 dB while the others
stay near 40, and protecting single steps does not fix it on sd3-mnist (docs/BENCHMARKS.md,
"Seventh session").  This replays given plans (computed steps) with the ``forecast`` fallback's
rule, ``x + R_c + (t − t_c)(R_c − R_p)/(t_c − t_p)`` over the whole block stack, and with variants
that differ only when the last two computed steps are adjacent:

* ``std``: the library's rule (last two computed steps);
* ``base2``: the slope from ``c`` and the latest computed step at least two steps before it;
* ``avg``: the mean of the ``std`` and ``base2`` forecasts;
* ``lsq3``: the least-squares slope through the last three computed steps;
* ``gainG``: ``std`` with the slope times ``G`` (e.g. ``gain0.5``).

``std`` reproduces the library's ``policy="schedule"`` + ``forecast`` images to 0.01 dB.  Images are
the 16 evaluation images of the benchmark (seeds 1000–1015, classes ``i % 10``; ``--first-seed 0
--images 32``: the calibration seeds of ``protect_steps``), compared with the uncached images of the
same seeds::

    python benchmarks/slope_rules.py --model sd3-mnist --rules std,avg --plans 0,1,2,5,8,11,14,17
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fx_fastcache.runtime.state_ops import forecast_slope  # the library's extrapolation factor


class StackSimulator(nn.Module):
    """All blocks as one module: computes on the plan's steps, forecasts the stack residual elsewhere."""

    def __init__(self, blocks: nn.ModuleList, joint: bool) -> None:
        super().__init__()
        self.blocks, self.joint = blocks, joint
        if hasattr(blocks[0], "norm1") and not joint:  # DiT reads transformer_blocks[0].norm1.emb
            self.norm1 = blocks[0].norm1
        self.computed: set[int] = set()
        self.rule = "std"
        self.i, self.hist = 0, []

    def _run(self, h, e, args, kw):
        if self.joint:  # SD3: (encoder, hidden); the last block's encoder output is None
            for b in self.blocks:
                e, h = b(hidden_states=h, encoder_hidden_states=e, **kw)
            return h, e
        for b in self.blocks:
            h = b(h, *args, **kw)
        return h, None

    def forward(self, hidden_states, *args, **kw):
        i = self.i
        self.i += 1
        e = kw.pop("encoder_hidden_states", None) if self.joint else None
        if i in self.computed or not self.hist:
            h, e2 = self._run(hidden_states, e, args, kw)
            self.hist.append((i, (h - hidden_states, None if e is None or e2 is None else e2 - e)))
            return (e2, h) if self.joint else h
        r = self.forecast(i, self.rule)
        h = hidden_states + r[0]
        return (None if r[1] is None else e + r[1], h) if self.joint else h

    def forecast(self, i: int, rule: str):
        hist = self.hist
        tc, rc = hist[-1]
        if len(hist) < 2:
            return rc
        if rule == "avg":
            a, b = self.forecast(i, "std"), self.forecast(i, "base2")
            return tuple(None if x is None else 0.5 * (x + y) for x, y in zip(a, b))
        if rule == "lsq3" and len(hist) >= 3:
            pts = hist[-3:]
            ts = torch.tensor([float(p[0]) for p in pts])
            w = (ts - ts.mean()) / ((ts - ts.mean()) ** 2).sum()
            return tuple(None if rc[j] is None else rc[j] + (i - tc) * sum(float(w[k]) * pts[k][1][j] for k in range(3))
                         for j in range(2))
        gain, (tp, rp) = 1.0, hist[-2]
        if rule == "base2":
            far = [x for x in hist[:-1] if tc - x[0] >= 2]
            tp, rp = far[-1] if far else hist[-2]
        elif rule.startswith("gain"):
            gain = float(rule[4:])
        f = gain * float(forecast_slope(*(torch.tensor(float(v)) for v in (i, tc, tp)), torch.tensor(True)))
        return tuple(None if rc[j] is None else rc[j] + f * (rc[j] - rp[j]) for j in range(2))


RULES = ("std", "base2", "avg", "lsq3")


def uncached_reference(tm, classes, seeds, steps: int, path: Path) -> torch.Tensor:
    """The uncached images of these seeds, generated once and cached in ``path``."""
    from fx_fastcache.trained import sample

    if path.is_file():
        return torch.load(path)
    ref = sample(tm, classes, seeds, steps=steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    return ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd3-mnist")
    p.add_argument("--rules", default="std,avg", help=f"comma-separated: {', '.join(RULES)}, gainG")
    p.add_argument("--plans", nargs="+", required=True, help="computed steps of each plan, e.g. 0,1,2,5,8,11,14,17")
    p.add_argument("--first-seed", type=int, default=1000, help="images use seeds first-seed + i (calibration: 0)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/slope_rules", help="where the uncached reference images are cached")
    a = p.parse_args(argv)
    rules = a.rules.split(",")
    for r in rules:
        if r not in RULES and not (r.startswith("gain") and r[4:].replace(".", "", 1).isdigit()):
            p.error(f"unknown rule {r!r}: use one of {', '.join(RULES)} or gainG (e.g. gain0.5)")
    steps = 20
    plans = []
    for s in a.plans:
        try:
            comp = sorted({int(x) for x in s.split(",")})
        except ValueError:
            p.error(f"plan {s!r}: expected comma-separated step indices")
        if not comp or comp[0] != 0 or comp[-1] >= steps:
            p.error(f"plan {s!r}: must compute step 0 and stay below {steps}")
        plans.append(comp)
    torch.set_num_threads(a.threads)
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.trained import load_trained, sample

    classes, seeds = [i % 10 for i in range(a.images)], [a.first_seed + i for i in range(a.images)]
    tm = load_trained(a.model)
    ref = uncached_reference(tm, classes, seeds, steps, Path(a.out) / f"{Path(a.model).name}-reference-{seeds[0]}-{len(seeds)}.pt")
    stack = StackSimulator(tm.model.transformer_blocks, joint=tm.kind == "sd3")
    tm.model.transformer_blocks = nn.ModuleList([stack])
    for comp in plans:
        for rule in rules:
            stack.computed, stack.rule, stack.i, stack.hist = set(comp), rule, 0, []
            q = psnr(sample(tm, classes, seeds, steps=steps), ref)
            print(json.dumps({"model": a.model, "computed": comp, "rule": rule,
                              "replaced": round(1 - len(comp) / steps, 2), "psnr_mean": round(float(q.mean()), 2),
                              "psnr_worst": round(float(q.min()), 2), "worst_seed": seeds[int(q.argmin())]}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
