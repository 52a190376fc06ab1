"""Evaluation nodes placed ahead: a computed step evaluates the model where the skipped steps after it need it.

Why it exists: with ``noise_forecast="flow_euler"`` the skipped steps after a computed step ``c`` extrapolate the
predicted noise ε linearly in σ through the last two computed steps.  Quadrature puts one evaluation per interval
inside the interval, not at its start: here a computed step ``c`` (after ``--first`` plain ones) evaluates the
model at ``σ_e``, a fraction ``lam`` of the way to the next computed step, on the latent a DDIM jump with the
forecast noise predicts there, ``x̃ = (1 − σ_e) x̂₀ + σ_e ε̂(σ_e)``, ``x̂₀ = (x_c − σ_c ε̂(σ_c)) / (1 − σ_c)``; every
step then takes ε piecewise linear in σ through the evaluated nodes (an interpolation where two nodes bracket it,
the library's extrapolation past the last), so step ``c`` itself and the steps up to ``σ_e`` interpolate.  The cost
is the same: one model call per computed step.  ``lam = 0`` is the library's noise forecast.

This is an emulation on the model's output (the combined CFG velocity; the forecast and the correction are linear
in it), with the library's :class:`~fx_fastcache.runtime.drift.DriftCorrection` module applied to the velocities
as the graph applies it: at ``lam = 0`` it gives the library's images (tests/test_bench_scripts.py checks the
velocities against the library's two modules).  Fixed plans (``computed steps@β``; no ``@``: no drift
correction), or ``--search START``: per ``lam``, the library's plan search (:func:`plan_search.search`, mean PSNR on
the 16 calibration seeds 0-15, β = 0) from ``START``, then β fitted over ``DAMPING_GRID``, as ``search_plan`` does
with the noise forecast on; the ``lam`` whose calibration score is best is the one a search would keep::

    python benchmarks/lookahead_nodes.py --model sd3-mnist --plans 0,1,2,4,7,10,14,18@1 --lams 0,0.15,0.25
    python benchmarks/lookahead_nodes.py --model sd3-mnist --search 0,1,2,4,7,10,14,18 --lams 0,0.15
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

#: ``eps_fn(x, σ) -> (ε, v)``: the model's predicted noise and velocity at latent ``x`` and noise level ``σ``.
EpsFn = Callable[[torch.Tensor, float], "tuple[torch.Tensor, torch.Tensor]"]


def eps_at(nodes: list[tuple[float, torch.Tensor]], s: float) -> torch.Tensor:
    """ε at ``s``: piecewise linear in σ through ``nodes`` ((σ, ε), σ falling), extrapolated from the last two
    past the last node; held after a single node."""
    if len(nodes) == 1:
        return nodes[0][1]
    for (s1, e1), (s2, e2) in zip(nodes[:-1], nodes[1:]):
        if s2 <= s <= s1:
            return e1 + (s - s1) / (s2 - s1) * (e2 - e1)
    (s1, e1), (s2, e2) = nodes[-2:]
    return e2 + (s - s2) / (s2 - s1) * (e2 - e1)


def node_sigma(sig: list[float], k: int, nxt: int, lam: float) -> float:
    """σ at position ``k + lam · (nxt − k)`` of the schedule ``sig`` (linear between its entries)."""
    pos = k + lam * (nxt - k)
    i = min(int(pos), len(sig) - 1)
    j = min(i + 1, len(sig) - 1)
    return sig[i] + (pos - i) * (sig[j] - sig[i])


def generate(eps_fn: EpsFn, x: torch.Tensor, sig: list[float], computed: set[int], lam: float = 0.0,
             beta: float | None = None, first: int = 2, rows: bool = False, cfg: float = 2.0) -> torch.Tensor:
    """Euler from ``x`` through ``sig`` with the model evaluated at the computed steps (the first ``first``
    evaluations where they stand, later ones ``lam`` ahead), ε piecewise linear between evaluations, and the
    library's drift correction at damping ``beta`` (``None``: none).  Returns the final latent.

    ``rows``: ``eps_fn`` takes and returns the batched CFG rows stacked (conditional, then unconditional; 2B, ...),
    as the graph sees them: each row keeps its own nodes and jumps ahead on its own forecast noise, so the two rows
    are evaluated on different latents, and the sampler steps with the guided velocity (scale ``cfg``)."""
    drift = None
    if beta is not None:
        from fx_fastcache.runtime.drift import DriftCorrection
        drift = DriftCorrection(tuple(x.shape), x.device, torch.tensor(float(beta)))
    order = sorted(computed)
    nodes: list[tuple[float, torch.Tensor]] = []
    for k in range(len(sig) - 1):
        s = sig[k]
        xm = torch.cat([x, x]) if rows else x  # the latents the model is given
        v = None
        if k in computed:
            nxt = next((j for j in order if j > k), len(sig) - 1)
            if len(nodes) < first or lam == 0:
                e, v = eps_fn(xm, s)  # where it stands: the model's own velocity
                nodes.append((s, e))
            else:
                se = node_sigma(sig, k, nxt, lam)
                x0 = (xm - s * eps_at(nodes, s)) / (1 - s)
                e, _ = eps_fn((1 - se) * x0 + se * eps_at(nodes, se), se)
                nodes.append((se, e))
        if v is None:  # a skipped step, or a computed one evaluated ahead: the velocity of the noise at x
            v = (eps_at(nodes, s) - xm) / (1 - s)
        if rows:
            v = guided(v, cfg)
        if drift is not None:
            v = drift(k not in computed, torch.tensor(k == 0), torch.tensor(s), v)
        x = x + (sig[k + 1] - s) * v
    return x


def guided(v2: torch.Tensor, cfg: float) -> torch.Tensor:
    """The guided velocity of stacked CFG rows (conditional, then unconditional)."""
    v_c, v_u = v2.chunk(2)
    return v_u + cfg * (v_c - v_u)


def trained_eps_fn(tm, classes: list[int], rows: bool = False, cfg: float = 2.0) -> EpsFn:
    """The trained model's ε and v: per CFG row on stacked latents (``rows``), or guided on the sampler's latent
    (batched CFG, as :func:`fx_fastcache.trained.sample`)."""
    from fx_fastcache.trained import NULL_CLASS
    y = torch.as_tensor(classes, dtype=torch.long)
    yy = torch.cat([y, torch.full_like(y, NULL_CLASS)])

    def eps_fn(x: torch.Tensor, s: float):
        x2 = x if rows else torch.cat([x, x])
        with torch.no_grad():
            out = tm.unpack_output(tm.model(**tm.call_kwargs(x2, torch.full((len(yy),), float(s)), yy))[0])
        v = out[:, :tm.in_channels]
        if not rows:
            v = guided(v, cfg)
        return x + (1 - s) * v, v

    return eps_fn


def parse_plan(text: str, steps: int) -> tuple[set[int], float | None]:
    """``"0,1,3@2"`` → ({0, 1, 3}, 2.0); without ``@``, no drift correction."""
    plan, _, beta = text.partition("@")
    try:
        computed = {int(v) for v in plan.split(",")}
        damping = float(beta) if beta else None
    except ValueError:
        raise SystemExit(f"plan {text!r}: give computed steps, e.g. 0,1,3,6,10,15, optionally @β (e.g. @2)") from None
    if 0 not in computed or not all(0 <= k < steps for k in computed):
        raise SystemExit(f"plan {text!r}: the steps must lie in 0..{steps - 1} and include step 0")
    return computed, damping


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd3-mnist")
    p.add_argument("--plans", nargs="*", default=[], help="computed steps[@β], e.g. 0,1,2,4,7,10,14,18@1")
    p.add_argument("--search", default=None, help="search from these computed steps per lam (β fitted)")
    p.add_argument("--lams", default="0,0.15,0.25", help="comma-separated: how far ahead a node is (0: the library)")
    p.add_argument("--first", type=int, default=2, help="evaluations made where they stand before nodes move ahead "
                                                         "(and the warm-up steps every searched plan computes)")
    p.add_argument("--max-runs", type=int, default=150)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--eval-seed", type=int, default=1000)
    p.add_argument("--rows", action="store_true",
                   help="each CFG row jumps ahead on its own forecast noise (what the graph sees) instead of the "
                        "guided one (what the sampler follows)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    steps = 20
    lams = [float(v) for v in a.lams.split(",")]
    if any(not 0 <= v < 1 for v in lams):
        p.error(f"--lams {a.lams!r}: each must be in [0, 1)")
    if not a.plans and a.search is None:
        p.error("give --plans or --search")
    plans = [parse_plan(t, steps) for t in a.plans]
    start = parse_plan(a.search, steps)[0] if a.search is not None else None
    torch.set_num_threads(a.threads)
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.policies import plan_search
    from fx_fastcache.policies.planned import DAMPING_GRID
    from fx_fastcache.trained import _initial_noise, load_trained

    tm = load_trained(a.model)
    sig = torch.linspace(1.0, 0.0, steps + 1).tolist()

    def image_set(seed0: int, n: int):
        classes, seeds = [i % 10 for i in range(n)], [seed0 + i for i in range(n)]
        x = _initial_noise(seeds, (tm.in_channels, tm.sample_size, tm.sample_size), tm.device, tm.dtype)
        fn = trained_eps_fn(tm, classes, a.rows)
        ref = run(fn, x, set(range(steps)), 0.0, None).clamp(-1, 1)
        return seeds, fn, x, ref

    def run(fn, x, computed, lam, beta):
        return generate(fn, x, sig, computed, lam, beta, a.first, a.rows)

    def quality(images, computed, lam, beta):
        seeds, fn, x, ref = images
        return psnr(run(fn, x, computed, lam, beta).clamp(-1, 1), ref)

    ev = image_set(a.eval_seed, a.images)
    t0 = time.perf_counter()

    def report(**kw):
        print(json.dumps({"model": a.model, "rows": a.rows, **kw, "s": round(time.perf_counter() - t0)}), flush=True)

    for computed, beta in plans:
        for lam in lams:
            q = quality(ev, computed, lam, beta)
            report(plan=sorted(computed), beta=beta, lam=lam, mean=round(float(q.mean()), 2),
                   worst=round(float(q.min()), 2), argworst=ev[0][int(q.argmin())],
                   below_32=int((q < 32).sum()), below_28=int((q < 28).sum()))
    if start is not None:
        cal = image_set(0, 16)
        row0 = torch.zeros(steps, dtype=torch.bool)
        row0[sorted(start)] = True
        for lam in lams:
            def score(row, beta=0.0, lam=lam):
                return float(quality(cal, set(row.nonzero().flatten().tolist()), lam, beta).mean())
            best, best_score, tried = plan_search.search(row0, a.first, set(), 0, score, a.max_runs)
            damping = 0.0
            for b in DAMPING_GRID[1:]:
                s = score(best, b)
                if s > best_score:
                    damping, best_score = b, s
            computed = set(best.nonzero().flatten().tolist())
            q = quality(ev, computed, lam, damping)
            report(search=sorted(start), lam=lam, plan=sorted(computed), beta=damping, tried=tried,
                   calibration_score=round(best_score, 3), mean=round(float(q.mean()), 2),
                   worst=round(float(q.min()), 2), argworst=ev[0][int(q.argmin())])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
