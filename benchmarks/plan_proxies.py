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

    def forward(self, hidden_states, *args, **kw):
        h_in, i = hidden_states, self.i
        self.i += 1
        if self.mode == "bypass":
            return self.override
        if self.mode == "plan" and i not in self.computed:
            if len(self.hist) >= 2:
                (tp, rp), (tc, rc) = self.hist
                return h_in + rc + (i - tc) / (tc - tp) * (rc - rp)
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
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.policies.planned import plan
    from fx_fastcache.trained import NULL_CLASS, _initial_noise, load_trained, sample

    steps, cfg = 20, 2.0
    tm = load_trained(a.model)
    stack = _Stack(tm.model.transformer_blocks)
    tm.model.transformer_blocks = nn.ModuleList([stack])

    def gen(classes, seeds, mode, computed=()):
        stack.mode, stack.i, stack.rec, stack.computed, stack.hist = mode, 0, [], set(computed), []
        with torch.no_grad():
            return sample(tm, classes, seeds, steps=steps, cfg=cfg)

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

    err = {}
    for c in range(steps):
        rc = rec[c][1] - rec[c][0]
        for pp in range(-1, c):
            rp = rec[pp][1] - rec[pp][0] if pp >= 0 else None
            for k in range(c + 1, steps):
                y_hat = rec[k][0] + rc + ((k - c) / (c - pp) * (rc - rp) if rp is not None else 0.0)
                yk, dt = rec[k][1], float(sig[k] - sig[k + 1])
                if a.proxy == "ln":
                    e = (F.layer_norm(y_hat, y_hat.shape[-1:]) - F.layer_norm(yk, yk.shape[-1:])).flatten(1).norm(dim=1)
                elif a.proxy == "rel":
                    e = (y_hat - yk).flatten(1).norm(dim=1) / yk.flatten(1).norm(dim=1)
                else:
                    e = (velocity(xs[k], k, y_hat) - vs[k]).flatten(1).norm(dim=1)
                err[(pp, c, k)] = dt * e
    plans = plan(err, steps, warmup=a.warmup)
    print(f"{a.model}: proxy {a.proxy}, {a.calib} calibration images, planned in {time.perf_counter() - t0:.0f}s",
          flush=True)
    ev_seeds = list(range(1000, 1016))
    ev_classes = [i % 10 for i in range(16)]
    ref = gen(ev_classes, ev_seeds, "run")
    for m in a.budgets:
        computed = plans[m - 1].nonzero().flatten().tolist()
        q = psnr(gen(ev_classes, ev_seeds, "plan", computed), ref)
        print(f"replaced {1 - m / steps:.0%}: computed {computed} -> PSNR {q.mean():.2f} ({q.min():.2f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
