"""Which error proxy should ``policy="planned"`` plan on?  A simulator of step-level caching on a
trained MNIST DiT, outside the library, to compare proxies cheaply.

The transformer's block list is replaced by one module that runs every block (computed step) or
returns the ``forecast`` fallback's ``x + R_c + (t − t_c)(R_c − R_p)/(t_c − t_p)`` (skipped step),
so a plan's images equal the library's ``policy="schedule"`` + ``forecast`` with that table.
Calibration generations (seeds ``0..calib−1``) record every step's span input/output; the error of
forecasting step k from computed steps (p, c) is measured with the chosen proxy; the library's
dynamic program (:func:`fx_fastcache.policies.planned.plan`) plans every budget; the plans are
evaluated on the 16 evaluation images (seeds 1000-1015) against the uncached images.

Proxies (``--proxy``):
* ``ln``: the library's: ‖LN(ŷ) − LN(y)‖ of the span output (parameter-free layer norm), × step size;
* ``rel``: ‖ŷ − y‖/‖y‖ of the span output, × step size;
* ``output``: the model's velocity after CFG, from running the model's tail on the forecast span
  output (what the final images see; the library cannot do this: it only sees the span).

    python benchmarks/plan_proxies.py --model dit-mnist --proxy output --budgets 9 8 7 6

Two diagnostics of the fifth session (docs/BENCHMARKS.md, "Planned steps"):
* ``--gains 0,0.25,0.5,0.75,1``: the forecast's slope times a gain chosen per triple ``(p, c, k)`` by the
  proxy (so per skipped step of a plan), planned and evaluated beside the plain forecast;
* ``--single-skip SEED``: that evaluation image alone, every step skipped on its own with slope gains
  0 (plain reuse), 0.5, 0.75 and 1, and every evaluation image's forecast error at every step over
  the median image's (does an image that breaks stand out where the decision is made?).

A diagnostic of the sixth session:
* ``--single-skip all``: all 16 evaluation images, every step up to ``--last-step`` skipped on its
  own with the forecast and with plain reuse: each image's PSNR, the worst, and which images fall
  below 32 dB.  A step whose single skip breaks an image must be computed by every plan that keeps
  that image, whatever else it skips: a floor under what any step plan can reach.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


class _Stack(nn.Module):
    """All blocks as one module: computes, records, replays a plan with the forecast, or bypasses."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks
        if hasattr(blocks[0], "norm1"):  # DiT reads transformer_blocks[0].norm1.emb
            self.norm1 = blocks[0].norm1
        self.mode, self.i, self.rec, self.computed, self.hist, self.override = "run", 0, [], set(), [], None
        self.gains: dict | float = 1.0  # slope gain: one number, or per (p, c, k)

    def forward(self, hidden_states, *args, **kw):
        h_in, i = hidden_states, self.i
        self.i += 1
        if self.mode == "bypass":
            return self.override
        if self.mode == "plan" and i not in self.computed:
            if len(self.hist) >= 2:
                (tp, rp), (tc, rc) = self.hist
                gain = self.gains.get((tp, tc, i), 1.0) if isinstance(self.gains, dict) else self.gains
                return h_in + rc + gain * (i - tc) / (tc - tp) * (rc - rp)
            return h_in + self.hist[-1][1]
        h = h_in
        for b in self.blocks:
            h = b(h, *args, **kw)
        if self.mode == "record":
            self.rec.append((h_in.clone(), h.clone()))
        if self.mode == "plan":
            self.hist = (self.hist + [(i, h - h_in)])[-2:]
        return h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-mnist")
    p.add_argument("--proxy", choices=("ln", "rel", "output"), default="ln")
    p.add_argument("--calib", type=int, default=4, help="calibration images (seeds 0..N-1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budgets", type=int, nargs="+", default=[9, 8, 7, 6], help="computed steps of 20")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gains", default=None, help="comma-separated slope gains to choose from per (p, c, k)")
    p.add_argument("--single-skip", default=None, metavar="SEED|all",
                   help="skip each step alone on this evaluation seed (1000-1015) and print per-image errors; "
                        "'all': on all 16 evaluation images, forecast and reuse")
    p.add_argument("--last-step", type=int, default=9, help="--single-skip all: the last step skipped alone")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.policies.planned import plan
    from fx_fastcache.trained import NULL_CLASS, _initial_noise, load_trained, sample

    steps, cfg = 20, 2.0
    tm = load_trained(a.model)
    stack = _Stack(tm.model.transformer_blocks)
    tm.model.transformer_blocks = nn.ModuleList([stack])

    def gen(classes, seeds, mode, computed=(), gains=1.0):
        stack.mode, stack.i, stack.rec, stack.computed, stack.hist, stack.gains = mode, 0, [], set(computed), [], gains
        with torch.no_grad():
            return sample(tm, classes, seeds, steps=steps, cfg=cfg)

    if a.single_skip == "all":
        return _single_skip_all(gen, steps, a.warmup, a.last_step)
    if a.single_skip is not None:
        try:
            seed = int(a.single_skip)
        except ValueError:
            raise SystemExit(f"--single-skip {a.single_skip!r}: give an evaluation seed (1000-1015) or 'all'") from None
        return _single_skip(seed, gen, stack, steps, a.warmup)

    seeds = list(range(a.calib))
    classes = [i % 10 for i in seeds]
    t0 = time.perf_counter()
    gen(classes, seeds, "record")
    rec = stack.rec
    sig = torch.linspace(1.0, 0.0, steps + 1)
    y = torch.tensor(classes)
    b = len(seeds)

    def velocity(x, k, h_out):  # the model's tail on a given span output, CFG-combined
        stack.mode, stack.i, stack.override = "bypass", 0, h_out
        xx = torch.cat([x, x])
        kw = tm.call_kwargs(xx, torch.cat([sig[k].expand(b)] * 2), torch.cat([y, torch.full_like(y, NULL_CLASS)]))
        with torch.no_grad():
            out = tm.model(**kw)[0][:, : tm.in_channels]
        vc, vu = out.chunk(2)
        return vu + cfg * (vc - vu)

    xs, vs = [], []
    x = _initial_noise(seeds, (tm.in_channels, tm.sample_size, tm.sample_size), tm.device, tm.dtype)
    for k in range(steps):  # the reference trajectory's latents and velocities
        v = velocity(x, k, rec[k][1])
        xs.append(x)
        vs.append(v)
        x = x + (sig[k + 1] - sig[k]) * v

    gains = [float(g) for g in a.gains.split(",")] if a.gains else [1.0]
    err, err_g, gain_of = {}, {}, {}
    for c in range(steps):
        rc = rec[c][1] - rec[c][0]
        for pp in range(-1, c):
            rp = rec[pp][1] - rec[pp][0] if pp >= 0 else None
            for k in range(c + 1, steps):
                yk, dt = rec[k][1], float(sig[k] - sig[k + 1])
                by_gain = {}
                for g in (sorted(set(gains) | {1.0}) if rp is not None else [1.0]):
                    y_hat = rec[k][0] + rc + (g * (k - c) / (c - pp) * (rc - rp) if rp is not None else 0.0)
                    if a.proxy == "ln":
                        e = (F.layer_norm(y_hat, y_hat.shape[-1:]) - F.layer_norm(yk, yk.shape[-1:])).flatten(1).norm(dim=1)
                    elif a.proxy == "rel":
                        e = (y_hat - yk).flatten(1).norm(dim=1) / yk.flatten(1).norm(dim=1)
                    else:
                        e = (velocity(xs[k], k, y_hat) - vs[k]).flatten(1).norm(dim=1)
                    by_gain[g] = dt * e
                err[(pp, c, k)] = by_gain[1.0]  # the plain forecast's
                chosen = [g for g in by_gain if g in gains] or [1.0]
                gain_of[(pp, c, k)] = min(chosen, key=lambda g: float(by_gain[g].pow(2).mean()))
                err_g[(pp, c, k)] = by_gain[gain_of[(pp, c, k)]]
    plans = plan(err, steps, warmup=a.warmup)
    plans_g = plan(err_g, steps, warmup=a.warmup) if a.gains else None
    print(f"{a.model}: proxy {a.proxy}, {a.calib} calibration images, planned in {time.perf_counter() - t0:.0f}s",
          flush=True)
    ev_seeds = list(range(1000, 1016))
    ev_classes = [i % 10 for i in range(16)]
    ref = gen(ev_classes, ev_seeds, "run")
    for m in a.budgets:
        computed = plans[m - 1].nonzero().flatten().tolist()
        q = psnr(gen(ev_classes, ev_seeds, "plan", computed), ref)
        print(f"replaced {1 - m / steps:.0%}: computed {computed} -> PSNR {q.mean():.2f} ({q.min():.2f})", flush=True)
        if plans_g is not None:
            computed = plans_g[m - 1].nonzero().flatten().tolist()
            q = psnr(gen(ev_classes, ev_seeds, "plan", computed, gains=gain_of), ref)
            print(f"  with gains {a.gains}: computed {computed} -> PSNR {q.mean():.2f} ({q.min():.2f})", flush=True)
    return 0


def _single_skip(seed: int, gen, stack: _Stack, steps: int, warmup: int) -> int:
    """One evaluation image, each step skipped alone with slope gains 0/0.5/0.75/1; then every
    evaluation image's forecast error (from the two steps before) at every step, over the median's."""
    from fx_fastcache.bench.metrics import psnr

    if not 1000 <= seed < 1016:
        raise SystemExit(f"--single-skip {seed}: use an evaluation seed, 1000-1015")
    cls = [(seed - 1000) % 10]
    ref = gen(cls, [seed], "run")
    for k in range(warmup, steps):
        row = [float(psnr(gen(cls, [seed], "plan", [s for s in range(steps) if s != k], gains=g), ref))
               for g in (0.0, 0.5, 0.75, 1.0)]
        print(f"seed {seed}: skip step {k} alone, slope gain 0/0.5/0.75/1 -> PSNR "
              + " / ".join(f"{v:.1f}" for v in row), flush=True)
    from fx_fastcache.policies.planned import forecast_errors

    seeds = list(range(1000, 1016))
    gen([i % 10 for i in range(16)], seeds, "record")
    rec = stack.rec
    ts = torch.linspace(1.0, 0.0, steps + 1)[:steps].tolist()
    err = forecast_errors(ts, [[y - x] for x, y in rec], [[y] for _, y in rec])  # the library's error
    for k in range(2, steps):
        e = err[(k - 2, k - 1, k)]
        e = e[:16] + e[16:]  # conditional + unconditional halves of the CFG batch
        print(f"step {k}: forecast error / median, seeds 1000-1015: "
              + " ".join(f"{v:.2f}" for v in (e / e.median()).tolist()), flush=True)
    return 0


def _single_skip_all(gen, steps: int, warmup: int, last: int) -> int:
    """All 16 evaluation images, each step from ``warmup`` to ``last`` skipped alone, forecast and reuse."""
    from fx_fastcache.bench.metrics import psnr

    if not warmup <= last < steps:
        raise SystemExit(f"--last-step {last}: use a step from --warmup ({warmup}) to {steps - 1}")
    seeds = list(range(1000, 1016))
    classes = [i % 10 for i in range(16)]
    ref = gen(classes, seeds, "run")
    for k in range(warmup, last + 1):
        computed = [s for s in range(steps) if s != k]
        for label, g in (("forecast", 1.0), ("reuse", 0.0)):
            q = psnr(gen(classes, seeds, "plan", computed, gains=g), ref)
            broken = [f"{seeds[i]} ({float(q[i]):.1f})" for i in range(16) if q[i] < 32]
            print(f"skip step {k} alone, {label:8s}: worst {q.min():.1f}, mean {q.mean():.1f}; below 32 dB: "
                  f"{', '.join(broken) or 'none'}; all: " + " ".join(f"{v:.0f}" for v in q.tolist()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
