"""Fitting the output rule of a plan end to end through the sampler (:func:`fit_output_rule`).

Why it exists: with a plan fixed, the fitted rule of :mod:`fx_fastcache.runtime.output_rule` makes a generation's
final output a differentiable function of a few numbers per interval between computed steps, and of the model only at
the computed steps.  So the rule can be fitted by gradient descent on what users judge, the final output against the
uncached one, instead of on a formula's local error (forecast, noise forecast, drift damping): it raised the mean of
70 %-replaced generations by 1.8–2.6 dB on the five trained models (docs/BENCHMARKS.md, "Thirty-first session").

The captured graphs run without gradients, so during the fit the optimized model's calls go to a
:class:`PlanEmulator`: the model itself at the plan's computed steps (each call checkpointed, so the backward pass
keeps only its inputs), the rule at every step, exactly what the graph computes with the rule's table installed.
``generate()`` must run the user's sampler with gradients enabled (a diffusers pipeline's ``__call__`` and
:func:`fx_fastcache.trained.sample` run under ``torch.no_grad``: call their undecorated ``__wrapped__``).  Each fitted
fraction is then scored through the graph itself, on the same generations or on held-out ones (``validate``),
against the library's rules alone (the noise forecast and drift correction where configured), and keeps the better
by ``min_gain``.

Parametrisation (as measured): per interval ``n`` from computed step ``j`` to ``j'``, the coefficients ``c_{n,i}`` of
the last ``HISTORY`` computed outputs and ``g_n``, with ``G_n = g_n / (σ_{j'} − σ_j)``; σ is the clock's timestep over
the first step's, and the last interval ends at 0.  The start is the forecast rule (the output linear in σ through
the last two computed steps, averaged over the interval), ``g = 0``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Callable, Iterator

import torch
import torch.utils._pytree as pytree
import torch.utils.checkpoint

from ..calibration import store_put
from ..runtime.output_rule import COLUMNS, HISTORY, TABLE_ROWS, identity_rows
from .planned import (PLANS_KEY, RULES_KEY, SEARCH_OBJECTIVES, budget, check_data_range, holding_plan, install_plan,
                      output_peak, quarter, sample_psnr, set_rule_table)
from .schedule import scheduled_blocks

logger = logging.getLogger(__name__)

#: How much better (dB of the objective) the fitted rule must score on the calibration generations to be kept.  They
#: are the images it was fitted to: on wan-mnist at 60 % replaced a gain of 0.95 dB there became a loss of 1.1 dB on
#: the evaluation images, where gains of 4.8 to 7.4 dB at 70 % held (docs/BENCHMARKS.md, "Thirty-second session").
MIN_GAIN_DB = 1.0


def interval_end(plan: list[int], n: int, steps: int) -> int:
    """The step after the ``n``-th computed step's interval: the next computed step, or ``steps`` (the end)."""
    return plan[n + 1] if n + 1 < len(plan) else steps


def forecast_coefficients(plan: list[int], sig: list[float]) -> torch.Tensor:
    """``[len(plan), HISTORY + 1]``: the forecast rule as the fit's start.  Each step ``k`` after computed steps
    ``p < j`` gets ``V_j + (σ_k − σ_j) / (σ_j − σ_p) · (V_j − V_p)``; averaged over the interval with the step sizes as
    weights.  The first interval holds ``V_0``; ``g = 0``."""
    steps = len(sig) - 1
    c = torch.zeros(len(plan), HISTORY + 1)
    c[:, 0] = 1.0
    for n in range(1, len(plan)) if HISTORY > 1 else ():
        j, p, j2 = plan[n], plan[n - 1], interval_end(plan, n, steps)
        if sig[j] == sig[p] or sig[j2] == sig[j]:
            continue
        r = sum((sig[k + 1] - sig[k]) * (sig[k] - sig[j]) / (sig[j] - sig[p]) for k in range(j, j2)) / (sig[j2] - sig[j])
        c[n, 0], c[n, 1] = 1 + r, -r
    return c


def table_rows(plan: list[int], sig: list[float], coef: torch.Tensor) -> torch.Tensor:
    """The per-step table of :mod:`fx_fastcache.runtime.output_rule` for the interval coefficients ``coef``."""
    steps = len(sig) - 1
    rows = identity_rows(steps)
    for n, j in enumerate(plan):
        j2 = interval_end(plan, n, steps)
        span = sig[j2] - sig[j]
        for k in range(j, j2):
            rows[k, 0] = 0.0
            rows[k, 1:1 + HISTORY] = coef[n, :HISTORY].detach()
            rows[k, 1 + HISTORY] = float(coef[n, HISTORY]) / span if span != 0 else 0.0
    return rows


class PlanEmulator:
    """The optimized model's calls during a fit (see the module docstring).

    ``computed``: the plan's steps (bool per step); ``coef``: the interval coefficients (``None``: reference mode,
    every step the model's own output, for the uncached generation); ``sig``: σ per step and at the end."""

    def __init__(self, opt, computed: list[bool], coef: torch.Tensor | None, sig: list[float] | None,
                 checkpoint: bool) -> None:
        self.opt, self.computed, self.coef, self.sig, self.checkpoint = opt, computed, coef, sig, checkpoint
        self.plan = [k for k, c in enumerate(computed) if c]
        self.start()

    def start(self) -> None:
        """A new generation."""
        self.step = 0
        self.timesteps: list[float] = []
        self.hist: list[torch.Tensor] = []
        self.x_c: torch.Tensor | None = None
        self.last: tuple[list, object] | None = None

    def _model(self, kw: dict):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.opt.model, use_reentrant=False, **kw)
        return self.opt.model(**kw)

    def __call__(self, *args, **kwargs):
        opt = self.opt
        kw = opt._bind(args, kwargs)
        t = opt.call_timestep(kw)
        if self.timesteps and t == self.timesteps[-1]:
            raise ValueError("fit_output_rule: generate() called the model twice at one timestep (classifier-free "
                             "guidance as two calls per step?); the fit needs one call per step: batch the branches "
                             "into one call")
        k = self.step
        if k >= len(self.computed):
            raise ValueError(f"fit_output_rule: generate() called the model more than the {len(self.computed)} times "
                             f"of the calibrated plans' steps; generate as many steps as in calibration")
        self.timesteps.append(t)
        self.step += 1
        if self.coef is None or self.computed[k]:
            out = self._model(kw)
            leaves, spec = pytree.tree_flatten(out)
            if not leaves or not isinstance(leaves[0], torch.Tensor):
                raise TypeError(f"fit_output_rule: {type(opt.model).__name__} returned no tensor first")
            if self.coef is None:
                return out
            x = kw[opt.spec.stream_arg]
            self.hist = [leaves[0].float()] + self.hist[:HISTORY - 1]
            self.x_c = x.float()
            self.last = (leaves, spec)
        leaves, spec = self.last
        n = sum(1 for j in self.plan if j <= k) - 1  # the interval of step k (step 0 always computes)
        j2 = interval_end(self.plan, n, len(self.computed))
        span = self.sig[j2] - self.sig[self.plan[n]]
        u = self.coef[n, HISTORY] * self.x_c / span if span != 0 else torch.zeros_like(self.x_c)
        for i, h in enumerate(self.hist):
            u = u + self.coef[n, i] * h
        return pytree.tree_unflatten([u.to(leaves[0].dtype), *leaves[1:]], spec)


@contextlib.contextmanager
def emulating(opt, emulator: PlanEmulator, others: tuple[torch.nn.Module, ...] = ()) -> Iterator[None]:
    """Route ``opt``'s calls to ``emulator``, with the parameters of the model and of ``others`` (a pipeline's text
    encoders, VAE) frozen: the fit needs gradients with respect to the latents only, and a text encoder run with
    gradients would keep its activations."""
    grads = [(p, p.requires_grad) for m in (opt.model, *others) for p in m.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)
    opt._emulator = emulator
    try:
        yield
    finally:
        opt._emulator = None
        for p, g in grads:
            p.requires_grad_(g)


def _worst_quarter(log_err: torch.Tensor) -> torch.Tensor:
    return log_err.topk(quarter(len(log_err))).values.mean()  # the images planned.worst_quarter scores


#: The fit's loss per objective of :data:`SEARCH_OBJECTIVES` (the same keys), on per-sample log squared errors (PSNR
#: falls as they rise): their mean, or the worst quarter's mean, so a fit asked for the worst images' score optimises
#: it rather than the mean; and how the fit's log names it.
FIT_LOSSES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "mean": (torch.mean, "mean"),
    "worst_quarter": (_worst_quarter, "worst quarter's mean"),
}


def _positive(name: str, value, integer: bool, zero: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < 0 or (
            value == 0 and not zero):
        what = "an integer" if integer else "a number"
        raise ValueError(f"fit_output_rule: {name}={value!r} must be {what} {'>= 0' if zero else '> 0'}")


def fit_output_rule(opt, generate: Callable[[], torch.Tensor], fractions=None, iters: int = 150, lr: float = 0.01,
                    checkpoint: bool = True, data_range: float | None = None, objective: str = "mean",
                    min_gain: float = MIN_GAIN_DB, validate: Callable[[], torch.Tensor] | None = None,
                    others: tuple[torch.nn.Module, ...] = ()) -> dict[float, dict[str, float | bool]]:
    """Fit the output rule of each fraction's plan (see the module docstring); returns, per fraction, the
    score of the library's rules alone (``"library"``), with the fitted rule (``"fitted"``), both through the graph on
    ``validate()``'s generations (other calibration inputs than the fit's) or, without it, on ``generate()``'s, and
    whether the rule was kept (``"kept"``: it scored more than ``min_gain`` dB better).  ``others``: modules
    ``generate()`` also runs (a pipeline's components), frozen during the fit."""
    cfg, store = opt.fastcache_config, opt.store
    if cfg.output_rule != "fitted":
        raise ValueError(f"fit_output_rule: this model has output_rule={cfg.output_rule!r}; optimize it with "
                         f"FastCacheConfig(policy='planned', output_rule='fitted') (and calibrate it)")
    if PLANS_KEY not in store.tensors:
        raise ValueError("fit_output_rule needs a calibrated policy='planned' model: run `with "
                         "fastcache.calibrate(model): ...` first")
    if not opt.spec.timestep_arg:
        raise ValueError(f"fit_output_rule: {type(opt.model).__name__} has no timestep input; the rule's intervals "
                         f"are measured in it")
    _positive("iters", iters, integer=True, zero=True)
    _positive("lr", lr, integer=False)
    _positive("min_gain", min_gain, integer=False, zero=True)
    if not isinstance(checkpoint, bool):
        raise ValueError(f"fit_output_rule: checkpoint={checkpoint!r} must be True or False")
    check_data_range("fit_output_rule", data_range)
    if validate is not None and not callable(validate):
        raise TypeError(f"fit_output_rule: validate={validate!r} must be a callable like generate() (on other "
                        f"calibration inputs), or None to choose on generate()'s generations")
    if objective not in SEARCH_OBJECTIVES:
        raise ValueError(f"fit_output_rule: objective={objective!r} is not one of {sorted(SEARCH_OBJECTIVES)}")
    if isinstance(fractions, (int, float, str)) or (fractions is not None and not list(fractions)):
        raise ValueError(f"fit_output_rule: fractions={fractions!r} must be a non-empty list of target_fraction "
                         f"values (e.g. [0.7]), or None for the configured target_fraction={cfg.target_fraction}")
    fractions = [cfg.target_fraction] if fractions is None else list(fractions)
    for f in fractions:
        try:
            cfg.replace(target_fraction=f)
        except ValueError as e:
            raise ValueError(f"fit_output_rule: fraction {f!r}: {e}") from None
    plans = store.tensors[PLANS_KEY].detach().cpu().bool()
    n = plans.shape[0]
    if n > TABLE_ROWS:
        raise ValueError(f"fit_output_rule: the plans are for {n} steps; the rule's table holds {TABLE_ROWS}")
    rules = store.tensors.get(RULES_KEY)
    rules = identity_rows(n).expand(n, n, COLUMNS).clone() if rules is None else rules.detach().cpu().clone()

    # the uncached generation, as the fit's target (the model itself at every step), and its timesteps
    ref_em = PlanEmulator(opt, [True] * n, None, None, checkpoint)
    with emulating(opt, ref_em, others), torch.no_grad():
        target = _output("fit_output_rule", generate())
    if ref_em.step != n:
        raise ValueError(f"fit_output_rule: generate() called the model {ref_em.step} times; the plans are for {n} "
                         f"steps: generate as many steps as in calibration")
    ts = ref_em.timesteps
    if ts[0] == 0:
        raise ValueError("fit_output_rule: the first step's timestep is 0; the rule measures σ as the timestep over "
                         "the first step's")
    sig = [t / ts[0] for t in ts] + [0.0]
    result: dict[float, dict[str, float | bool]] = {}
    fitted: dict[int, tuple[list[bool], torch.Tensor]] = {}
    for f in fractions:
        m = budget(float(f), n)
        computed = plans[m - 1].tolist()
        plan = [k for k, c in enumerate(computed) if c]
        coef = torch.nn.Parameter(forecast_coefficients(plan, sig))
        em = PlanEmulator(opt, computed, coef, sig, checkpoint)
        adam = torch.optim.Adam([coef], lr=lr)
        best = (math.inf, coef.detach().clone())  # the lowest loss seen and its coefficients: Adam may overshoot
        with emulating(opt, em, others), torch.enable_grad():
            for it in range(iters):
                em.start()
                out = generate()
                if not isinstance(out, torch.Tensor) or not out.requires_grad:
                    raise ValueError("fit_output_rule: generate() returned an output without gradients: it ran "
                                     "under torch.no_grad() (a diffusers pipeline's __call__ and trained.sample do); "
                                     "pass a generate() that samples with gradients, e.g. with "
                                     "pipe.__call__.__wrapped__(pipe, ...)")
                loss = FIT_LOSSES[objective][0]((out.float() - target).pow(2).flatten(1).mean(1).clamp_min(1e-20).log())
                value = float(loss.detach())
                if value < best[0]:
                    best = (value, coef.detach().clone())
                adam.zero_grad()
                loss.backward()
                adam.step()
                if it % 10 == 0 or it == iters - 1:
                    logger.info("fx-fastcache: fit_output_rule target_fraction=%.2f: iteration %d, calibration %s "
                                "log squared error %.3f", f, it, FIT_LOSSES[objective][1], value)
        if iters and best[0] < math.inf:
            logger.info("fx-fastcache: fit_output_rule target_fraction=%.2f: the lowest calibration %s log squared "
                        "error %.3f", f, FIT_LOSSES[objective][1], best[0])
        fitted[m] = (computed, table_rows(plan, sig, best[1] if iters else coef))
    # each fitted rule against the library's rules alone, through the graph, on the held-out generations if given
    with holding_plan(opt, validate if validate is not None else generate) as run:
        ref = run(torch.ones(n, dtype=torch.bool))
        peak = output_peak("fit_output_rule", ref, data_range)

        def score(computed: list[bool]) -> float:
            return SEARCH_OBJECTIVES[objective](sample_psnr(run(torch.tensor(computed)), ref, peak))

        for f in fractions:
            m = budget(float(f), n)
            computed, rows = fitted[m]
            set_rule_table(store, None, opt.device)
            library = score(computed)
            set_rule_table(store, rows, opt.device)
            with_rule = score(computed)
            kept = with_rule > library + min_gain
            rules[m - 1] = rows if kept else identity_rows(n)
            result[float(f)] = {"library": library, "fitted": with_rule, "kept": kept}
            logger.info("fx-fastcache: fit_output_rule target_fraction=%.2f (computes steps %s): %s %.3f, the "
                        "library's rules %.3f on %s; %s", f, [k for k, c in enumerate(computed) if c], objective,
                        with_rule, library, "the fit's generations" if validate is None else "validate()'s",
                        "kept" if kept else f"not kept (not {min_gain:g} dB better)")
    store_put(store, RULES_KEY, rules)
    install_plan(store, scheduled_blocks(store), cfg.target_fraction, opt.device)
    return result


def _output(who: str, out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who}: generate() must return the generation's final output as a tensor, got "
                        f"{type(out).__name__}")
    return out.detach().float()
