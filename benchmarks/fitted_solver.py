"""What a plan's computed steps could give if the skipped steps were fitted end to end: a learned multistep
solver over the computed steps, emulated outside the library.

Why it exists: at 70 % replaced (6 of 20 steps computed) the worst image misses the 28 dB target on dit-mnist,
pixart-mnist and wan-mnist, and no plan of whole steps reaches it with the library's fixed forecast rules
(docs/BENCHMARKS.md, thirteenth session).  The rules tried so far (the forecast, the noise forecast, the drift
correction, gains fitted per step on local residuals) are fixed formulas or local fits.  But a skipped step's
latent is never read by the model: only the latents at the computed steps and the final one matter.  So with a
plan fixed, what a linear cache rule does between two computed steps ``j`` and ``j'`` comes down to

    x_{j'} = x_j + (σ_{j'} − σ_j) · Σ_i c_{n,i} V_{n−i} + g_n · x_j,

the guided velocities ``V`` of the last ``m`` computed steps and the last computed latent (the forecast is such a
rule; the noise forecast and the drift correction nearly are, up to older velocities; CFG commutes with them
because they are linear).  This fits those ``(m + 1) · len(plan)`` numbers by gradient descent through the
sampler on calibration images (seeds 0–31 by default; never the evaluation seeds 1000–1015, nor the unseen
seeds from 100 that ``--unseen N`` adds), minimising the mean over images of the log squared error against the
uncached 20-step image (the mean PSNR), optionally with a soft maximum that weights the worst images
(``--worst``), and reports the evaluation images before and after, in the benchmark's terms::

    python benchmarks/fitted_solver.py --model wan-mnist --plan 0,1,3,8,13,18

``--init lin`` starts from the forecast rule (linear in σ through the last two computed steps), ``--init hold``
from a held velocity.  ``--base library --drift β`` instead keeps the
library's rules (the noise forecast and the drift correction, as ``output_forecasts.py`` emulates them) and fits
a correction of the same form added to them, zero at the start, so the fit starts from the library's images.
``--frozen R`` fits without differentiating through the model (R generations, the rules fitted to each one's
velocities held fixed or moved with their latents by ``--jacobian``), which is what a black-box generation
would allow.  ``--batch B`` fits each Adam step on a fresh random ``B`` of the calibration images, so a large
calibration pool costs what ``B`` images cost per step (``--mine K``: the pool's ``B`` worst, rescored every ``K``
steps).  ``--save`` / ``--load`` keep a fit; ``--unseen N`` also scores N more unseen images (seeds from 100).  A
fitted rule is a table of numbers per plan, so the library could carry it as it carries a plan; this measures
whether it is worth it first.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.utils.checkpoint

from fx_fastcache.bench.metrics import psnr
from fx_fastcache.policies.rule_fit import interval_end  # the library's fit uses the same intervals
from fx_fastcache.trained import _initial_noise, guided_velocity, load_trained, sample

STEPS = 20


def lin_coefficients(plan: list[int], sig: torch.Tensor, m: int) -> torch.Tensor:
    """``c`` of the forecast rule: each skipped step ``k`` after computed steps ``p < j`` hands the sampler
    ``V_j + (σ_k − σ_j) / (σ_j − σ_p) · (V_j − V_p)``; summed over the interval, per unit of σ."""
    c = torch.zeros(len(plan), m)
    c[:, 0] = 1  # a held velocity, where there is no earlier computed step (or m = 1)
    for n, j in enumerate(plan[1:] if m > 1 else [], start=1):
        j2, p = interval_end(plan, n, len(sig) - 1), plan[n - 1]
        r = sum(float(sig[k + 1] - sig[k]) * float(sig[k] - sig[j]) / float(sig[j] - sig[p])
                for k in range(j + 1, j2)) / float(sig[j2] - sig[j])
        c[n, 0], c[n, 1] = 1 + r, -r
    return c


class FittedSolver(torch.nn.Module):
    """The plan's computed steps with fitted interval rules (see the module docstring)."""

    def __init__(self, plan: list[int], sig: torch.Tensor, m: int, init: str) -> None:
        super().__init__()
        self.plan, self.sig, self.m = plan, sig, m
        c = lin_coefficients(plan, sig, m) if init == "lin" else torch.eye(1, m).expand(len(plan), m).clone()
        self.c = torch.nn.Parameter(c)
        self.g = torch.nn.Parameter(torch.zeros(len(plan)))
        self.checkpoint = False

    def forward(self, tm, x: torch.Tensor, y: torch.Tensor, frozen: list[tuple] | None = None,
                record: list[tuple] | None = None) -> torch.Tensor:
        """The final images.  ``frozen``: per computed step, ``(velocity, latent, slope)`` of an earlier run, used
        instead of calling the model (the velocity moved with the latent by the slope); ``record``: a list each
        computed step's ``(velocity, latent)`` is appended to."""
        vs: list[torch.Tensor] = []
        for n, j in enumerate(self.plan):
            s = self.sig[j]
            if frozen is not None:
                v0, x0, lam = frozen[n]
                vs.append(v0 + lam * (x - x0))
            elif self.checkpoint and torch.is_grad_enabled():  # recomputed in the backward pass: less memory
                vs.append(torch.utils.checkpoint.checkpoint(guided_velocity, tm, x, s, y, use_reentrant=False))
            else:
                vs.append(guided_velocity(tm, x, s, y))
            if record is not None:
                record.append((vs[-1].detach(), x.detach()))
            j2 = interval_end(self.plan, n, len(self.sig) - 1)
            comb = sum(self.c[n, i] * vs[-1 - i] for i in range(min(self.m, len(vs))))
            x = x + (self.sig[j2] - self.sig[j]) * comb + self.g[n] * x
        return x.clamp(-1, 1)


class CorrectedRows(torch.nn.Module):
    """``--base library``: the library's rules (the noise forecast, the drift correction with damping ``β``, as
    ``output_forecasts.PlannedRows`` emulates them) plus a fitted correction, the same for both CFG rows (so the
    guided velocity gets it whole): at every step of the interval after the ``n``-th computed step,
    ``Σ_i d_{n,i} V_{n−i} + e_n · x_j / (σ_{j'} − σ_j)``.  Zero at the start: the fit starts from the library's
    images.  Call :meth:`rows` for a fresh stand-in model per generation."""

    def __init__(self, plan: list[int], sig: torch.Tensor, m: int, drift: float, cfg: float = 2.0) -> None:
        super().__init__()
        self.plan, self.sig, self.m, self.drift, self.cfg = plan, sig, m, drift, cfg
        self.d = torch.nn.Parameter(torch.zeros(len(plan), m))
        self.e = torch.nn.Parameter(torch.zeros(len(plan)))

    def rows(self, model):
        from output_forecasts import PlannedRows

        letters = "".join("F" if i in self.plan else "S" for i in range(len(self.sig) - 1))
        base = PlannedRows(model, letters, "epsl", "lin", self.drift)
        vs: list[torch.Tensor] = []
        state = {}

        def call(**kw):
            i = base.i
            out = base(**kw)[0]
            if i in self.plan:
                n = self.plan.index(i)
                vs.append(base.hu[-1]["v"] + self.cfg * (base.hc[-1]["v"] - base.hu[-1]["v"]))
                j2 = interval_end(self.plan, n, len(self.sig) - 1)
                state.update(n=n, x=kw["hidden_states"][: len(out) // 2], span=self.sig[j2] - self.sig[i])
            n = state["n"]
            delta = sum(self.d[n, k] * vs[-1 - k] for k in range(min(self.m, len(vs)))) + self.e[n] * state["x"] / state["span"]
            return (out + torch.cat([delta, delta]),)

        return call


def noise(tm, seeds: list[int]) -> torch.Tensor:
    """The initial latents :func:`sample` draws for ``seeds``."""
    return _initial_noise(seeds, (tm.in_channels, tm.sample_size, tm.sample_size), tm.device, tm.dtype)


def loss_of(out: torch.Tensor, ref: torch.Tensor, worst: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (mean log squared error per image, plus a soft maximum of it at temperature ``worst``) and
    the per-image log errors."""
    err = ((out - ref) ** 2).flatten(1).mean(1).clamp_min(1e-12).log()
    loss = err.mean()
    if worst > 0:
        loss = loss + worst * torch.logsumexp(err / worst, 0) - worst * math.log(len(err))
    return loss, err


def batches(n: int, a, score=None):
    """The calibration images each Adam step fits: all ``n`` (``None``), or with ``--batch B`` a fresh random ``B``
    of them per step (index tensors drawn from ``--batch-seed``), so a large calibration pool costs what ``B``
    images cost per step; with ``--mine K`` too, the ``B`` worst of the pool by ``score()`` (per-image PSNR under
    the current rules), scored again every ``K`` steps."""
    g = torch.Generator().manual_seed(a.batch_seed)
    worst = None
    for it in range(a.iters):
        if not a.batch:
            yield None
        elif a.mine:
            if it % a.mine == 0:
                q = score()
                worst = q.argsort()[: a.batch]
                print(f"  iter {it}: the pool's worst {a.batch}: {q[worst].mean():.2f} dB, worst {q.min():.2f} "
                      f"(pool mean {q.mean():.2f})", flush=True)
            yield worst
        else:
            yield torch.randperm(n, generator=g)[: a.batch]


def adam_fit(params, generate, ref: torch.Tensor, a, score=None) -> None:
    """``a.iters`` Adam steps (learning rate ``a.lr``) on :func:`loss_of` of ``generate(idx)`` against ``ref``
    (``idx``: the images of the step, ``None`` for all; see :func:`batches`), printing the calibration PSNR every
    ten.  (L-BFGS with a line search stalled at the start: the clamp to [−1, 1] flattens the loss.)"""
    opt = torch.optim.Adam(params, lr=a.lr)
    t0 = time.perf_counter()
    for it, idx in enumerate(batches(len(ref), a, score)):
        opt.zero_grad()
        loss, err = loss_of(generate(idx), ref if idx is None else ref[idx], a.worst)
        loss.backward()
        opt.step()
        if it % 10 == 0 or it == a.iters - 1:
            db = -10 * err / math.log(10) + 10 * math.log10(4)  # PSNR at peak 2 from the log squared error
            print(f"  iter {it}: calibration{'' if idx is None else f' batch of {len(idx)}'} mean "
                  f"{db.mean().item():.2f} dB, worst {db.min().item():.2f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)


def fit_frozen(solver: FittedSolver, tm, cal, a) -> None:
    """Fit without differentiating through the model: run the calibration images once (no gradient),
    keep the computed steps' velocities, fit the rules to those frozen velocities (the final images are
    then a cheap function of the rules), move ``a.step`` of the way there, and repeat ``a.frozen`` times.  This is what
    a library could do with a black-box generation."""
    prev = None
    for r in range(a.frozen):
        rec: list = []
        with torch.no_grad():
            out = solver(tm, cal[0], cal[1], record=rec)
        q = psnr(out, cal[2])
        lams = []
        for n, (v, x) in enumerate(rec):
            s = float(solver.sig[solver.plan[n]])
            if a.jacobian == "none" or n == 0:
                lam = 0.0
            elif a.jacobian == "sigma" or prev is None:
                lam = 1.0 / s
            else:  # least squares of the velocity's change on the latent's change since the last round
                dv, dx = v - prev[n][0], x - prev[n][1]
                lam = float((dv * dx).sum() / (dx * dx).sum().clamp_min(1e-20))
            lams.append(lam)
        frozen = [(v, x, lam) for (v, x), lam in zip(rec, lams)]
        prev = rec
        before = [p.detach().clone() for p in solver.parameters()]
        opt = torch.optim.Adam(solver.parameters(), lr=a.lr)
        for _ in range(a.inner):
            opt.zero_grad()
            loss, _ = loss_of(solver(tm, cal[0], cal[1], frozen=frozen), cal[2], a.worst)
            loss.backward()
            opt.step()
        with torch.no_grad():
            for p, b in zip(solver.parameters(), before):
                p.copy_(b + a.step * (p - b))
        print(f"  round {r}: calibration {q.mean():.2f} ({q.min():.2f}) dB before it; slopes "
              f"{', '.join(f'{v:.2f}' for v in lams)}", flush=True)


def fit_on_library(tm, plan, sig, cal, ev, more, a, replaced) -> None:
    """``--base library``: fit :class:`CorrectedRows` by gradient descent through :func:`sample` (its
    undecorated function, so gradients flow through the computed steps' model calls)."""
    corr = CorrectedRows(plan, sig, a.m, a.drift)

    def generate(data, grad: bool = False, idx: torch.Tensor | None = None) -> torch.Tensor:
        _, y, _, seeds = data
        if idx is not None:
            y, seeds = y[idx], [seeds[i] for i in idx.tolist()]
        fn = sample.__wrapped__ if grad else sample
        return fn(tm, y.tolist(), seeds, steps=STEPS, model=corr.rows(tm.model))

    def evaluate(what: str) -> None:
        parts = [f"{name} {q.mean():.2f} ({q.min():.2f})" for name, q in
                 (("evaluation", psnr(generate(ev), ev[2])), ("calibration", psnr(generate(cal), cal[2])),
                  *(((f"{a.unseen} unseen seeds from 100", psnr(generate(more), more[2])),) if more is not None else ()))]
        print(f"{a.model} plan {a.plan} ({replaced:.0f} % replaced), library rules (noise forecast, drift β {a.drift}) "
              f"{what}: " + ", ".join(parts) + " dB", flush=True)

    if a.load:
        corr.load_state_dict(torch.load(a.load))
        evaluate(f"+ correction loaded from {a.load}")
        return
    evaluate("alone")
    adam_fit(corr.parameters(), lambda idx: generate(cal, grad=True, idx=idx), cal[2], a,
             score=lambda: psnr(generate(cal), cal[2]))
    evaluate("+ fitted correction")
    if a.save:
        torch.save(corr.state_dict(), a.save)
    torch.set_printoptions(precision=3, sci_mode=False)
    print("d =", corr.d.data, "\ne =", corr.e.data)


def _no_grad_psnr(solver: FittedSolver, tm, data) -> torch.Tensor:
    """Per-image PSNR of ``solver``'s images of ``data`` (noise, classes, references, seeds) against the references."""
    with torch.no_grad():
        return psnr(solver(tm, data[0], data[1]), data[2])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wan-mnist")
    ap.add_argument("--plan", required=True, help="computed steps, comma-separated, starting with 0")
    ap.add_argument("--m", type=int, default=3, help="computed velocities each interval's rule combines")
    ap.add_argument("--init", default="lin", choices=("lin", "hold"))
    ap.add_argument("--base", default="none", choices=("none", "library"),
                    help="library: fit a correction added to the library's rules (noise forecast + drift) instead")
    ap.add_argument("--drift", type=float, default=0.0, help="--base library: the drift damping β")
    ap.add_argument("--calibration", type=int, default=32, help="calibration images (seeds from --calibration-first)")
    ap.add_argument("--calibration-first", type=int, default=0, help="first calibration seed")
    ap.add_argument("--unseen", type=int, default=0, help="also report this many more unseen images (seeds 100..)")
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--lr", type=float, default=0.01, help="Adam's learning rate")
    ap.add_argument("--batch", type=int, default=0,
                    help="fit each Adam step on a random this many of the calibration images (0: all of them)")
    ap.add_argument("--batch-seed", type=int, default=0, help="--batch: the seed of the draws")
    ap.add_argument("--mine", type=int, default=0, metavar="K",
                    help="--batch: fit the pool's worst B images instead of random ones, scored every K steps")
    ap.add_argument("--worst", type=float, default=0.0,
                    help="temperature of a soft maximum of the per-image log error added to the loss (0: mean only)")
    ap.add_argument("--frozen", type=int, default=0, metavar="ROUNDS",
                    help="fit on frozen velocities instead of through the model, this many generations")
    ap.add_argument("--jacobian", default="none", choices=("none", "sigma", "fit"),
                    help="--frozen: how a velocity follows its latent: not at all, as 1/σ (the predicted clean "
                         "image held), or a slope per step fitted across rounds (1/σ in the first)")
    ap.add_argument("--inner", type=int, default=300, help="--frozen: gradient steps per round")
    ap.add_argument("--step", type=float, default=0.5, help="--frozen: share of each round's move taken")
    ap.add_argument("--checkpoint", action="store_true",
                    help="recompute each model call in the backward pass (more time, less memory: DiT and "
                         "PixArt on 32 calibration images, side by side, ran out of 24 GB without it)")
    ap.add_argument("--save", default=None, help="save the fitted rules (a state dict) to this path")
    ap.add_argument("--load", default=None, help="evaluate the rules saved at this path instead of fitting")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    plan = [int(p) for p in a.plan.split(",")]
    if plan[0] != 0 or plan != sorted(set(plan)) or plan[-1] >= STEPS:
        ap.error(f"--plan {a.plan!r}: increasing step indices from 0, below {STEPS}")
    if a.m < 1:
        ap.error(f"--m {a.m}: at least 1")
    if a.base == "library" and (a.frozen or a.checkpoint or a.init != "lin"):
        ap.error("--base library fits its correction through the model from zero: drop --frozen, "
                 "--checkpoint and --init")
    if a.batch and not 0 < a.batch < a.calibration:
        ap.error(f"--batch {a.batch}: between 1 and the calibration images ({a.calibration}) less one; "
                 f"0 fits on all of them")
    if a.mine < 0 or (a.mine and not a.batch):
        ap.error(f"--mine {a.mine}: a positive number of steps, with --batch B")
    if a.batch and a.frozen:
        ap.error(f"--batch {a.batch}: not with --frozen (each round runs every calibration image)")
    if a.jacobian != "none" and not a.frozen:
        ap.error(f"--jacobian {a.jacobian}: only with --frozen R")
    if a.base == "none" and a.drift:
        ap.error(f"--drift {a.drift}: only with --base library (the fitted rules replace the drift correction)")
    if (a.calibration_first <= 1015 and a.calibration_first + a.calibration > 1000) or (
            a.unseen and a.calibration_first < 100 + a.unseen and 100 < a.calibration_first + a.calibration):
        ap.error(f"--calibration-first {a.calibration_first}: the calibration seeds overlap the evaluation seeds "
                 f"(1000-1015) or the unseen ones (from 100)")
    torch.set_num_threads(a.threads)
    tm = load_trained(a.model)
    sig = torch.linspace(1.0, 0.0, STEPS + 1)
    replaced = 100 * (1 - len(plan) / STEPS)

    def images(first: int, count: int):
        seeds = list(range(first, first + count))
        y = torch.tensor([i % 10 for i in range(count)])
        return noise(tm, seeds), y, sample(tm, y.tolist(), seeds, steps=STEPS), seeds

    cal, ev = images(a.calibration_first, a.calibration), images(1000, 16)
    more = images(100, a.unseen) if a.unseen else None
    if a.base == "library":
        fit_on_library(tm, plan, sig, cal, ev, more, a, replaced)
        return
    solver = FittedSolver(plan, sig, a.m, a.init)
    solver.checkpoint = a.checkpoint

    def evaluate(what: str) -> None:
        q, qc = _no_grad_psnr(solver, tm, ev), _no_grad_psnr(solver, tm, cal)
        qu = _no_grad_psnr(solver, tm, more) if more is not None else None
        print(f"{a.model} plan {a.plan} ({replaced:.0f} % replaced) {what}: evaluation {q.mean():.2f} ({q.min():.2f}) dB, "
              f"calibration {qc.mean():.2f} ({qc.min():.2f})"
              + (f", {a.unseen} unseen seeds from 100 {qu.mean():.2f} ({qu.min():.2f})" if qu is not None else ""),
              flush=True)

    if a.load:
        solver.load_state_dict(torch.load(a.load))
        evaluate(f"loaded from {a.load}")
        return
    evaluate(f"init={a.init}")
    if a.frozen:
        fit_frozen(solver, tm, cal, a)
        evaluate(f"fitted on frozen velocities, {a.frozen} rounds")
        return
    adam_fit(solver.parameters(),
             lambda idx: solver(tm, cal[0], cal[1]) if idx is None else solver(tm, cal[0][idx], cal[1][idx]),
             cal[2], a, score=lambda: _no_grad_psnr(solver, tm, cal))
    evaluate("fitted")
    if a.save:
        torch.save(solver.state_dict(), a.save)
    torch.set_printoptions(precision=3, sci_mode=False)
    print("c =", solver.c.data, "\ng =", solver.g.data)


if __name__ == "__main__":
    main()
