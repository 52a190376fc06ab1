"""Planned steps: which steps to compute, chosen offline over the calibration runs (LeMiCa-style).

Why this exists.  A data-dependent rule decides from the current step alone, yet at a given speed
most of the fidelity comes from *which* steps are computed: on the same computed steps our
forecast and diffusers' TaylorSeer give the same images (docs/BENCHMARKS.md).  Calibration
already runs full-compute generations, and on them the error that forecasting step ``k`` from the
computed pair ``(p, c)`` would make is known in closed form for every triple: the ``forecast``
fallback's rule ``R̂ₖ = R_c + (tₖ − t_c)(R_c − R_p)/(t_c − t_p)`` applied to the recorded span
residuals, compared after a parameter-free layer norm over the channels (what a DiT's final
``norm_out`` sees: a per-token scale error that the norm removes does not count) and weighted by
the step size.  A dynamic program over ``(p, c)`` pairs then finds, for every budget of computed
steps, the set that minimises the summed error (mean over the calibration samples; a
root-mean-square or an 8th-power mean picked the same or worse plans, docs/BENCHMARKS.md), and
``target_fraction`` picks the budget.  With ``fallback="forecast_blend"`` the forecast after two
adjacent computed steps also reads the computed step before them (:func:`blend_errors`), and the
program's state carries that step.

The plan is a ``steps × blocks`` table of the ``schedule`` policy, so every decision is known
before the step: step dispatch reads it on the host without a sync, and it exports to ONNX
(``fx_fastcache.export.installed_schedule``).  The plan holds for the step count it was
calibrated with (:func:`plan_steps`): a pipeline call with another ``num_inference_steps`` logs a
warning (``enable_fastcache``), since the plan's rows apply by step index and steps past it
compute in full.  It is also chosen for the calibration's noise schedule (:data:`TIMESTEPS_KEY`): a pipeline
call whose steps ran other timesteps (a shifted or custom schedule, Flux's resolution-dependent shift,
image-to-image strength) logs a warning after the call, since plans do not carry over between schedules
(docs/BENCHMARKS.md, "Twenty-sixth session").  A bare model cannot tell a generation's length or schedule
without a device sync: calibrate with the step count and sampler you sample with.
Uncalibrated, nothing is planned and every step computes (logged once).
"""
from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..calibration import Calibrator, Observation, store_put
from ..runtime.distributed import all_reduce_sum
from ..runtime.drift import DAMPING_KEY
from ..runtime.noise_forecast import ENABLED_KEY
from ..runtime.output_rule import TABLE_KEY, TABLE_ROWS, identity_rows
from . import plan_search
from .schedule import SchedulePolicy, install_table, read_table, scheduled_blocks

logger = logging.getLogger(__name__)

#: Calibration store keys: every budget's plan (row ``M − 1``: the steps computed with ``M``
#: computed steps) and the step count the plans are for.
PLANS_KEY = "planned.plans"
STEPS_KEY = "planned.steps"
#: The mean forecast errors the plans were made from, ``[p + 1, c, k]`` (NaN: no such triple), and
#: the per-step weights :func:`measure_sensitivity` measured (ones until then).
ERRORS_KEY = "planned.errors"
WEIGHTS_KEY = "planned.weights"
#: Steps that always compute, set by :func:`protect_steps` (bool per step; absent: none).
PROTECT_KEY = "planned.protected"
#: Budgets whose plan :func:`search_plan` chose (bool per budget,
#: row ``M − 1``; absent: none).
SEARCHED_KEY = "planned.searched"
#: The timestep of each step of the first calibration generation (as the clock reads it): the schedule the plans
#: were made for (absent from files saved before it).
TIMESTEPS_KEY = "planned.timesteps"
#: Timesteps closer than this fraction of the largest calibrated one count as the same schedule.
SCHEDULE_TOLERANCE = 1e-3
#: The drift correction's damping β per budget (row ``M − 1``; absent: 0), fitted by :func:`search_plan`
#: with ``drift_correction="flow_euler"``; :func:`install_plan` installs the configured budget's.
DAMPINGS_KEY = "planned.drift_damping"
#: Whether the noise forecast applies per budget (row ``M − 1``, 1 or 0; absent: 1), chosen by
#: :func:`search_plan` with ``noise_forecast="flow_euler"``; :func:`install_plan` installs the configured budget's.
NOISE_CHOICES_KEY = "planned.noise_forecast"
#: The fitted output rule's table per budget, ``[M − 1, step, column]`` (identity rows: not fitted, or the fit lost;
#: absent: none), fitted by :func:`fx_fastcache.fit_output_rule` for that budget's plan; :func:`install_plan` installs
#: the configured budget's (:mod:`fx_fastcache.runtime.output_rule`).
RULES_KEY = "planned.output_rules"
#: The constraints the plans were made under, ``[warmup_steps, max_skip_steps]`` (long); a model
#: configured (or a file loaded) with others re-plans (:meth:`PlannedPolicy.configure_store`).
CONSTRAINTS_KEY = "planned.constraints"
#: The dampings :func:`search_plan` tries (0, first: the plain interpolation; larger: a weaker correction
#: after long forecast runs late in the schedule, :mod:`fx_fastcache.runtime.drift`).
DAMPING_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Token rows kept per sample, guard, stream and step (strided); bounds calibration memory.
ROWS_PER_SAMPLE = 64


def _rows(t: torch.Tensor) -> torch.Tensor:
    """At most :data:`ROWS_PER_SAMPLE` strided token rows per sample: (B, rows, C), float32, CPU."""
    t = t.detach()
    flat = t.reshape(t.shape[0], -1, t.shape[-1]) if t.ndim >= 3 else t.reshape(t.shape[0], 1, -1)
    stride = max(1, flat.shape[1] // ROWS_PER_SAMPLE)
    return flat[:, ::stride].to("cpu", torch.float32).clone()


def step_weights(ts: list[float]) -> list[float]:
    """How much an error in each step moves the sample: the step size ``|tₖ₊₁ − tₖ|`` (the last step
    runs to 0 when the timesteps fall towards it, else it weighs as the one before)."""
    n = len(ts)
    w = [abs(ts[k + 1] - ts[k]) for k in range(n - 1)]
    if n == 1:
        return [1.0]
    falling = all(ts[k + 1] < ts[k] for k in range(n - 1)) and ts[-1] > 0
    w.append(abs(ts[-1]) if falling else w[-1])
    return w


#: The fallbacks a plan can be made for, and the order of their forecast in the timestep:
#: ``forecast`` and ``forecast_blend`` extrapolate the residual linearly (1), ``residual`` reuses it
#: (0).  The fitted fallbacks correct the residual with the input change, which the recorded rows
#: cannot replay.
FORECAST_ORDER = {"forecast": 1, "forecast_blend": 1, "residual": 0}
#: Fallbacks whose forecast after two adjacent computed steps also reads the one before them: their
#: plans need :func:`blend_errors` (``forecast_blend``).
BLENDED = frozenset({"forecast_blend"})
#: ``[q, c, k]``: the mean error of forecasting ``k`` with ``forecast_blend`` from computed steps
#: ``q < c − 1 < c`` (NaN: no such triple); stored only for that fallback.
ADJACENT_ERRORS_KEY = "planned.errors_adjacent"
#: What is sized by the step count: a calibration with another step count replaces all of it.
STEP_COUNT_KEYS = (ERRORS_KEY, ADJACENT_ERRORS_KEY, WEIGHTS_KEY, STEPS_KEY, PLANS_KEY, PROTECT_KEY, SEARCHED_KEY,
                   DAMPINGS_KEY, NOISE_CHOICES_KEY, TIMESTEPS_KEY, RULES_KEY)


class _ErrorMeter:
    """The planner's error of replacing step ``k``'s residuals by a forecast, over every stream:
    ``‖LN(y + R̂ − R) − LN(y)‖`` summed over streams (per sample), times the step weight."""

    def __init__(self, ts: list[float], residuals: list[list[torch.Tensor]], outputs: list[list[torch.Tensor]]):
        self.ts, self.residuals, self.outputs = ts, residuals, outputs
        self.w = step_weights(ts)
        self.normed = [[self.ln(y) for y in ys] for ys in outputs]

    @staticmethod
    def ln(z: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(z, z.shape[-1:])

    def slope(self, k: int, c: int, p: int) -> float:
        """The forecast's extrapolation factor ``(t_k − t_c) / (t_c − t_p)``."""
        ts = self.ts
        return (ts[k] - ts[c]) / (ts[c] - ts[p])

    def __call__(self, k: int, forecast) -> torch.Tensor:
        e = 0.0
        for j, (r_k, y_k) in enumerate(zip(self.residuals[k], self.outputs[k])):
            d = self.ln(y_k + (forecast(j) - r_k)) - self.normed[k][j]
            e = e + d.flatten(1).pow(2).sum(1)
        return self.w[k] * torch.as_tensor(e).sqrt()


def forecast_errors(ts: list[float], residuals: list[list[torch.Tensor]], outputs: list[list[torch.Tensor]],
                    order: int = 1) -> dict[tuple[int, int, int], torch.Tensor]:
    """``err[(p, c, k)]``: per-sample error of forecasting step ``k`` from computed steps ``p < c < k``
    (``p = −1``: ``c`` is the only computed step, plain reuse), over every recorded stream.
    ``order`` 1: the ``forecast`` fallback's rule; 0: the ``residual`` fallback's (reuse ``R_c``).

    ``residuals[k][j]`` / ``outputs[k][j]``: stream ``j``'s rows (B, rows, C) at step ``k``.  The
    forecast replaces output ``y`` by ``y + R̂ − R``; the error is ``‖LN(y + R̂ − R) − LN(y)‖`` summed
    over streams, times the step weight.
    """
    n = len(ts)
    meter = _ErrorMeter(ts, residuals, outputs)
    r = residuals
    err: dict[tuple[int, int, int], torch.Tensor] = {}
    for c in range(n):
        for p in range(-1, c):
            if p >= 0 and ts[c] == ts[p]:
                continue
            for k in range(c + 1, n):
                s = meter.slope(k, c, p) if p >= 0 and order == 1 else 0.0
                err[(p, c, k)] = meter(k, lambda j: r[c][j] + s * (r[c][j] - r[p][j]) if s else r[c][j])
    return err


def blend_errors(ts: list[float], residuals: list[list[torch.Tensor]],
                 outputs: list[list[torch.Tensor]]) -> dict[tuple[int, int, int], torch.Tensor]:
    """``err[(q, c, k)]``: per-sample error of forecasting step ``k`` with the ``forecast_blend`` rule
    when the last computed steps are ``q < c − 1 < c`` (``c − 1`` and ``c`` adjacent): the mean of the
    first-order forecasts through ``(c − 1, c)`` and ``(q, c)``.  Every other case of that fallback is
    the ``forecast`` rule, whose errors :func:`forecast_errors` gives."""
    n = len(ts)
    meter = _ErrorMeter(ts, residuals, outputs)
    r = residuals
    err: dict[tuple[int, int, int], torch.Tensor] = {}
    for c in range(2, n):
        p = c - 1
        if ts[c] == ts[p]:
            continue
        for q in range(0, p):
            if ts[c] == ts[q]:
                continue
            for k in range(c + 1, n):
                a, b = 0.5 * meter.slope(k, c, p), 0.5 * meter.slope(k, c, q)
                err[(q, c, k)] = meter(k, lambda j: r[c][j] + a * (r[c][j] - r[p][j]) + b * (r[c][j] - r[q][j]))
    return err


def forced_steps(warmup: int, n: int) -> int:
    """How many first steps of ``n`` every plan computes: the warm-up, and at least step 0 (nothing to
    forecast from before it)."""
    return max(1, min(warmup, n))


def plan(err: dict[tuple[int, int, int], torch.Tensor], n: int, warmup: int = 0, max_skip: int = 0,
         adjacent: dict[tuple[int, int, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Every budget's best computed-step set: a (n, n) bool tensor whose row ``M − 1`` marks the ``M``
    computed steps with the least summed forecast error (mean over the calibration samples).

    Exact dynamic program over the last two computed steps ``(p, c)``, vectorised over the budget:
    O(n³) small tensor operations (n = 50 steps plans in well under a second).  Step 0 and the
    first ``warmup`` steps always compute; no more than ``max_skip`` steps in a row are skipped
    (``0``: no cap).  A budget that cannot be met under those constraints gets the plan of the
    nearest feasible larger budget.

    ``adjacent`` (the ``forecast_blend`` fallback, :func:`blend_errors`): the errors ``[(q, c, k)]``
    that replace ``err[(c − 1, c, k)]`` when step ``q`` is the computed step before ``c − 1``; the
    program's state then also holds ``q`` after two adjacent computed steps (still O(n³) states).
    """
    inf = float("inf")
    forced = forced_steps(warmup, n)
    size = n + 2  # budgets 0..n+1 (index = number of computed steps)
    mean = {key: float(v.float().mean()) for key, v in err.items()}
    amean = {} if adjacent is None else {key: float(v.float().mean()) for key, v in adjacent.items()}

    def cost(p: int, c: int, q: int, k: int) -> float:  # (q, c, k) absent: t_q = t_c, the plain forecast
        return amean[(q, c, k)] if q >= 0 and (q, c, k) in amean else mean[(p, c, k)]

    # a state is (p, c, q): the last two computed steps, and q the one before p when p = c − 1 and
    # the fallback blends (−1: none before p; −2: not tracked)
    enc = n + 3  # parent codes: p * enc + (q + 2)
    best: dict[tuple[int, int, int], torch.Tensor] = {}
    parent: dict[tuple[int, int, int], torch.Tensor] = {}
    if forced >= 2:
        start = (forced - 2, forced - 1, (forced - 3 if forced >= 3 else -1) if adjacent is not None else -2)
    else:
        start = (-1, forced - 1, -2)
    best[start] = torch.full((size,), inf, dtype=torch.float64)
    best[start][forced] = 0.0
    parent[start] = torch.full((size,), -2, dtype=torch.long)
    end_cost = torch.full((size,), inf, dtype=torch.float64)
    end_state: dict[int, tuple[int, int, int]] = {}
    for c in range(forced - 1, n):
        for p in range(-1, c):
            for q in range(-2, p):
                state = (p, c, q)
                d = best.get(state)
                if d is None or not bool(torch.isfinite(d).any()):
                    continue
                can_skip = c == n - 1 or (p, c, c + 1) in mean  # (p, c) at one timestep: no forecast from them
                last = c + 1 if not can_skip else (n if max_skip <= 0 else min(n, c + max_skip + 1))
                e = 0.0
                for nxt in range(c + 1, last + 1):
                    if nxt > c + 1:
                        e += cost(p, c, q, nxt - 1)
                    cand = d + e
                    if nxt == n:
                        better = cand < end_cost
                        end_cost = torch.where(better, cand, end_cost)
                        for m in better.nonzero().flatten().tolist():
                            end_state[m] = state
                        continue
                    key = (c, nxt, p if adjacent is not None and nxt == c + 1 else -2)
                    if key not in best:
                        best[key] = torch.full((size,), inf, dtype=torch.float64)
                        parent[key] = torch.full((size,), -2, dtype=torch.long)
                    shifted = torch.full((size,), inf, dtype=torch.float64)
                    shifted[1:] = cand[:-1]  # one more computed step
                    better = shifted < best[key]
                    best[key] = torch.where(better, shifted, best[key])
                    parent[key] = torch.where(better, torch.full_like(parent[key], p * enc + q + 2), parent[key])
    plans = torch.zeros(n, n, dtype=torch.bool)
    for m in range(n, 0, -1):
        if m in end_state and m <= n:
            state, k = end_state[m], m
            steps = [state[1]]
            while state != start:
                pp, qq = divmod(int(parent[state][k]), enc)
                steps.append(state[0])
                state, k = (pp, state[0], qq - 2), k - 1
            plans[m - 1, [s for s in steps if s >= 0]] = True
            plans[m - 1, :forced] = True
        elif m < n:
            plans[m - 1] = plans[m]
        else:
            plans[m - 1] = True
    return plans


def budget(target_fraction: float, n: int) -> int:
    """Computed steps for ``target_fraction`` of ``n`` steps replaced (at least one)."""
    return max(1, n - round(target_fraction * n))


def plan_steps(store) -> int | None:
    """The step count the installed plans are for (``None``: not calibrated)."""
    t = store.tensors.get(STEPS_KEY)
    return None if t is None else int(t)


class PlannedCalibrator(Calibrator):
    """Records every step's span residuals and outputs (strided token rows) during calibration and
    plans the computed steps of every budget (:func:`forecast_errors`, :func:`plan`)."""

    def __init__(self, order: int = 1, blended: bool = False) -> None:
        self.order, self.blended = order, blended
        # generations -> steps -> (t, [residual rows per stream], [output rows per stream])
        self.generations: list[list[tuple[float, list[torch.Tensor], list[torch.Tensor]]]] = []
        self.blocks: list[str] = []

    def observe(self, obs: Observation) -> None:
        for b in obs.guard.blocks:
            if b not in self.blocks:
                self.blocks.append(b)
        if obs.guard.index == 0:
            if obs.new_gen or not self.generations:
                self.generations.append([])
            self.generations[-1].append((obs.t, [], []))
        _, res, outs = self.generations[-1][-1]
        for x, y in zip(obs.ins, obs.outs):
            if x.shape != y.shape:
                continue  # a stream that changes shape has no residual to forecast
            res.append(_rows(y - x))
            outs.append(_rows(y))

    def fit(self, store, dtype, config) -> dict[str, float]:
        if not self.generations:
            return {}
        lengths = sorted({len(g) for g in self.generations})
        if len(lengths) != 1:
            raise ValueError(f"policy='planned' plans one step count, but the calibration generations ran {lengths} "
                             f"steps; calibrate with generations of the step count you will sample with")
        n = lengths[0]
        before = store.tensors.get(STEPS_KEY)
        if before is not None and int(before) != n:  # sized by the old step count: nothing of it applies
            dropped = [k for k in STEP_COUNT_KEYS if store.tensors.pop(k, None) is not None]
            logger.info("fx-fastcache: policy='planned' calibrated for %d steps, its plans were for %d: %s replaced",
                        n, int(before), dropped)
        store_put(store, ERRORS_KEY, self._table(n, forecast_errors, self.order, offset=1))
        if self.blended:
            store_put(store, ADJACENT_ERRORS_KEY, self._table(n, blend_errors, offset=0))
        store_put(store, WEIGHTS_KEY, torch.ones(n))
        store_put(store, STEPS_KEY, torch.tensor(n))
        store_put(store, TIMESTEPS_KEY, torch.tensor([s[0] for s in self.generations[0]], dtype=torch.float32))
        plans = replan(store, config, self.blocks, self.device)
        m = budget(config.target_fraction, n)
        logger.info("fx-fastcache: planned %d generation(s) of %d steps; target_fraction=%.2f computes steps %s",
                    len(self.generations), n, config.target_fraction, plans[m - 1].nonzero().flatten().tolist())
        return {"planned.steps": float(n), "planned.computed": float(int(plans[m - 1].sum()))}


    def _table(self, n: int, errors, *args, offset: int) -> torch.Tensor:
        """The mean over every calibration sample (and rank) of ``errors(ts, residuals, outputs, *args)``
        as a ``[first + offset, c, k]`` table (NaN: no such triple)."""
        cost = None
        for gen in self.generations:
            e = errors([s[0] for s in gen], [s[1] for s in gen], [s[2] for s in gen], *args)
            cost = e if cost is None else {k: torch.cat([cost[k], v]) for k, v in e.items()}
        if self.group is not None and cost:  # every rank saw its own tokens: plan on the errors of all of them
            keys = sorted(cost)
            sq = torch.stack([cost[k].pow(2) for k in keys])
            sq = all_reduce_sum(sq.to(self.device), self.group).cpu()
            cost = {k: sq[i].sqrt() for i, k in enumerate(keys)}
        table = torch.full((n + offset, n, n), float("nan"), dtype=torch.float32)
        for (p, c, k), v in (cost or {}).items():
            table[p + offset, c, k] = float(v.float().mean())
        return table


def replan(store, config, blocks: list[str], device: torch.device) -> torch.Tensor:
    """Plan every budget from the stored errors times the step weights; store and install the plans."""
    table, weights = store.tensors[ERRORS_KEY].detach().cpu(), store.tensors[WEIGHTS_KEY].detach().cpu()
    n = table.shape[1]
    protected = protected_steps(store)
    inf = torch.tensor(float("inf"))
    err = {(p - 1, c, k): inf if k in protected else table[p, c, k] * weights[k]
           for p, c, k in (~torch.isnan(table)).nonzero().tolist()}
    adjacent = None
    if config.fallback in BLENDED:
        adj = store.tensors.get(ADJACENT_ERRORS_KEY)
        if adj is None:
            raise ValueError(f"fallback={config.fallback!r}: this calibration was made for another fallback and holds "
                             f"no errors for its forecast after adjacent computed steps; calibrate again with "
                             f"fallback={config.fallback!r}")
        adj = adj.detach().cpu()
        adjacent = {(q, c, k): inf if k in protected else adj[q, c, k] * weights[k]
                    for q, c, k in (~torch.isnan(adj)).nonzero().tolist()}
    plans = plan(err, n, warmup=config.warmup_steps, max_skip=config.max_skip_steps, adjacent=adjacent)
    searched = store.tensors.get(SEARCHED_KEY)
    if searched is not None and bool(searched.any()):
        logger.warning("fx-fastcache: re-planning (after measure_sensitivity / protect_steps, or for a new "
                       "warmup_steps / max_skip_steps) replaces the plans search_plan chose for %s computed steps; "
                       "run search_plan again", (searched.detach().cpu().nonzero().flatten() + 1).tolist())
        store_put(store, SEARCHED_KEY, torch.zeros_like(searched))
        if DAMPINGS_KEY in store.tensors:  # fitted to the searched plans
            store_put(store, DAMPINGS_KEY, torch.zeros_like(store.tensors[DAMPINGS_KEY]))
        if NOISE_CHOICES_KEY in store.tensors:  # chosen with them
            store_put(store, NOISE_CHOICES_KEY, torch.ones_like(store.tensors[NOISE_CHOICES_KEY]))
    drop_rules(store, "re-planning")
    store_put(store, PLANS_KEY, plans)
    store_put(store, CONSTRAINTS_KEY, plan_constraints(config))
    install_plan(store, blocks, config.target_fraction, device)
    warn_unmet(plans, config.target_fraction, protected)
    return plans


def plan_constraints(config) -> torch.Tensor:
    """What the plans depend on besides the calibrated errors: ``[warmup_steps, max_skip_steps]``."""
    return torch.tensor([config.warmup_steps, config.max_skip_steps], dtype=torch.long)


def protected_steps(store) -> set[int]:
    """The steps :func:`protect_steps` made always compute (empty if it never ran)."""
    t = store.tensors.get(PROTECT_KEY)
    return set() if t is None else set(t.detach().cpu().nonzero().flatten().tolist())


def warn_unmet(plans: torch.Tensor, target_fraction: float, protected: set[int]) -> None:
    """Log a warning when no plan replaces ``target_fraction``: the forced and protected steps
    need more computed steps than its budget (the plan then computes more, never fewer)."""
    n = plans.shape[0]
    m = budget(target_fraction, n)
    got = int(plans[m - 1].sum())
    if got > m:
        logger.warning("fx-fastcache: policy='planned' cannot replace target_fraction=%.2f (%d computed steps of %d): "
                       "the warm-up and protected steps %s need %d, so it replaces %.0f %%; lower protect_steps' "
                       "floor_db or warmup_steps, or ask for less", target_fraction, m, n, sorted(protected), got,
                       100 * (1 - got / n))


#: ``id`` of the stores whose table :func:`holding_plan` holds: a capture during its runs (a new
#: input shape) must not install the plan over the single-skip table.
_held: set[int] = set()


@contextmanager
def holding_plan(opt, generate):
    """Yield ``run(computed)``: ``generate()`` with only the steps where the bool row ``computed`` is
    True computed (each run from a reset), returning its final output (float32, CPU).  The fitted output rule is
    off (identity rows) unless the caller installs one.

    The installed plan is restored afterwards (also when ``generate()`` fails), and the model reset, so
    the trial runs leave no state or statistics behind.  ``generate()`` may
    use another batch than calibration: the capture that this triggers keeps the table installed
    here.
    """
    store, cfg = opt.store, opt.fastcache_config
    if store.tensors.get(ERRORS_KEY) is None:
        raise ValueError("measure_sensitivity / protect_steps / search_plan need a calibrated policy='planned' "
                         "model: run `with fastcache.calibrate(model): ...` first")
    blocks = scheduled_blocks(store)
    installed = store.tensors[PLANS_KEY].clone()
    shape: list[tuple[int, ...]] = []
    if TABLE_KEY in store.tensors or RULES_KEY in store.tensors:  # a fitted rule is for its own plan only
        set_rule_table(store, None, opt.device)

    def run(computed: torch.Tensor) -> torch.Tensor:
        table = (~computed.to("cpu", torch.bool)).unsqueeze(1).expand(-1, len(blocks)).contiguous()
        install_table(store, blocks, table, opt.device)
        opt.reset()
        with torch.no_grad():
            out = generate()
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"generate() must return the generation's final output as a tensor, got "
                            f"{type(out).__name__}")
        if shape and tuple(out.shape) != shape[0]:
            raise ValueError(f"generate() returned shape {shape[0]}, then {tuple(out.shape)}: it must generate "
                             f"the same inputs every time")
        shape[:] = [tuple(out.shape)]
        return out.detach().float().cpu()

    _held.add(id(store))
    try:
        yield run
    finally:
        _held.discard(id(store))
        store_put(store, PLANS_KEY, installed)  # restore before re-planning (and if generate() failed)
        install_plan(store, blocks, cfg.target_fraction, opt.device)
        opt.reset()  # the trial generations' state and statistics are not the user's (as after calibrate)


def check_data_range(who: str, data_range) -> None:
    """``data_range`` is ``None`` or a positive number (the PSNR peak), else a ValueError naming ``who``."""
    if data_range is not None and not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"{who}: data_range={data_range!r} must be a positive number (the outputs' peak "
                         f"range, e.g. 2.0 for images in [-1, 1]) or None (the full output's max - min)")


def output_peak(who: str, ref: torch.Tensor, data_range: float | None) -> float:
    """The PSNR peak for outputs like ``ref`` (batch first): ``data_range``, else ``ref``'s max − min."""
    if ref.ndim == 0:
        raise ValueError(f"{who}: generate() returned a 0-d tensor; return the final output with the batch first "
                         f"(e.g. latents (B, C, H, W)), so each sample gets its own PSNR")
    peak = float(data_range) if data_range is not None else float(ref.max() - ref.min())
    if peak <= 0:
        raise ValueError(f"{who}: generate() returned a constant output, so a PSNR has no peak; pass data_range= "
                         f"(e.g. 2.0 for images in [-1, 1])")
    return peak


def sample_psnr(out: torch.Tensor, ref: torch.Tensor, peak: float) -> torch.Tensor:
    """PSNR of each sample of ``out`` against ``ref`` (float64, one per batch row)."""
    diff = (out.double() - ref.double()).reshape(out.shape[0], -1)
    mse = torch.nan_to_num(diff.pow(2).mean(1), nan=float("inf"))  # a NaN sample is the worst, not incomparable
    return 10.0 * torch.log10(peak ** 2 / mse.clamp_min(1e-300))


def _skip_each(opt, generate):
    """Run ``generate()`` once in full, then once per skippable step with only that step skipped.

    Yields ``(None, ref)`` first, then ``(k, out)`` for every step past the forced ones
    (:func:`holding_plan` restores the installed plan afterwards).
    """
    with holding_plan(opt, generate) as run:
        n = opt.store.tensors[ERRORS_KEY].shape[1]
        forced = forced_steps(opt.fastcache_config.warmup_steps, n)
        full = torch.ones(n, dtype=torch.bool)
        yield None, run(full)
        for k in range(forced, n):
            row = full.clone()
            row[k] = False
            yield k, run(row)


def measure_sensitivity(opt, generate, metric=None) -> list[float]:
    """Weigh each step's forecast error by how much it grows by the end of the generation, and re-plan.

    Why: the planner measures each forecast's error where it is made, but an error in an early
    step, where the sample's layout is still being decided, grows more by the last step than one
    in a late step: on pixart-mnist one evaluation image falls to 20 dB whenever step 3 is
    skipped, though step 3's own error is small.  This runs ``generate()`` (a whole generation
    on calibration inputs, returning its final output, e.g. latents) once in full and once per
    skippable step ``k`` with only ``k`` skipped; step ``k``'s weight is the final output's error
    over the error the planner recorded for that forecast.  Costs one generation per step.

    ``opt``: a calibrated ``policy="planned"`` module.  Returns the weights (1 for forced steps).
    """
    store, cfg = opt.store, opt.fastcache_config
    runs = _skip_each(opt, generate)
    try:
        _, ref = next(runs)  # raises first if uncalibrated
        if metric is None and ref.ndim == 0:
            raise ValueError("measure_sensitivity: generate() returned a 0-d tensor; return the final output with "
                             "the batch first (e.g. latents (B, C, H, W)), or pass a metric")
        table = store.tensors[ERRORS_KEY].detach().cpu()
        n = table.shape[1]
        weights = torch.ones(n)
        for k, out in runs:
            final = (out - ref).reshape(len(out), -1).norm(dim=1).mean() if metric is None else metric(out, ref)
            recorded = table[max(k - 2, -1) + 1, k - 1, k]
            if cfg.fallback in BLENDED and k >= 3:  # computed k − 3, k − 2, k − 1: the blended forecast
                recorded = store.tensors[ADJACENT_ERRORS_KEY].detach().cpu()[k - 3, k - 1, k]
            value = float(final)
            if not math.isfinite(value) or value < 0:  # a NaN weight would make every plan compute everything
                why = (f"metric(out, ref) returned {value!r}; it must return a finite number >= 0 (the final error)"
                       if metric is not None else f"the final output's error is {value!r}: generate() returned "
                       f"non-finite values; check the generation, or pass a metric")
                raise ValueError(f"measure_sensitivity: with step {k} skipped, {why}")
            weights[k] = value / max(float(recorded), 1e-12)
    finally:
        runs.close()  # restores the installed plan if the metric failed
    store_put(store, WEIGHTS_KEY, weights)
    plans = replan(store, cfg, scheduled_blocks(store), opt.device)
    logger.info("fx-fastcache: step sensitivity %s; target_fraction=%.2f now computes steps %s",
                [round(float(w), 3) for w in weights], cfg.target_fraction,
                plans[budget(cfg.target_fraction, n) - 1].nonzero().flatten().tolist())
    return weights.tolist()


def protect_steps(opt, generate, floor_db: float, data_range: float | None = None) -> list[int]:
    """Always compute the steps whose skip alone breaks a calibration sample, and re-plan the rest.

    Why: a few samples amplify an ordinary forecast error at one early step into a different
    image (pixart-mnist: skipping step 3 alone takes one of 16 evaluation images to 20 dB, step 2
    another), and nothing a rule sees at that step tells them apart (docs/BENCHMARKS.md).  Such
    samples are rare, so the error the planner averages over calibration samples, and the
    sensitivity weights, barely see them.  A worst case over many calibration samples does: this
    runs ``generate()`` once in full and once per skippable step with only that step skipped, and
    every step that takes some sample's output below ``floor_db`` PSNR (against the full run's,
    per sample; peak ``data_range``, default the full output's max − min) is computed by every
    plan from then on.  Use a larger calibration batch here than for ``calibrate`` (e.g. 32 seeds):
    the samples it must catch are about one in 16.  Costs one generation per step.

    ``opt``: a calibrated ``policy="planned"`` module.  Returns the protected steps (saved with
    the calibration; calling it again replaces them).
    """
    if isinstance(floor_db, bool) or not (isinstance(floor_db, numbers.Real) and 0 < float(floor_db) < 100):
        raise ValueError(f"protect_steps: floor_db={floor_db!r} must be a PSNR in dB between 0 and 100 (e.g. 34): "
                         f"a step that takes a sample's output below it always computes")
    check_data_range("protect_steps", data_range)
    store, cfg = opt.store, opt.fastcache_config
    runs = _skip_each(opt, generate)
    try:
        _, ref = next(runs)  # raises first if uncalibrated
        peak = output_peak("protect_steps", ref, data_range)
        n = store.tensors[ERRORS_KEY].shape[1]
        protected = torch.zeros(n, dtype=torch.bool)
        worst = {}
        for k, out in runs:
            worst[k] = float(sample_psnr(out, ref, peak).min())
            protected[k] = worst[k] < float(floor_db)
    finally:
        runs.close()  # restores the installed plan if anything failed
    store_put(store, PROTECT_KEY, protected)
    plans = replan(store, cfg, scheduled_blocks(store), opt.device)
    steps = protected.nonzero().flatten().tolist()
    logger.info("fx-fastcache: worst sample PSNR with each step skipped alone %s; steps %s now always compute "
                "(floor %.1f dB); target_fraction=%.2f computes steps %s",
                {k: round(v, 1) for k, v in worst.items()}, steps, float(floor_db), cfg.target_fraction,
                plans[budget(cfg.target_fraction, n) - 1].nonzero().flatten().tolist())
    return steps


def quarter(n: int) -> int:
    """How many of ``n`` images are their worst quarter (at least one)."""
    return max(1, -(-n // 4))


def worst_quarter(psnr: torch.Tensor) -> float:
    """The mean PSNR of the worst quarter of the images (at least one): a score that guards the worst
    images without following a single one."""
    return float(psnr.sort().values[:quarter(len(psnr))].mean())


#: ``search_plan``'s scores of a plan, from the per-image PSNRs of its outputs.
SEARCH_OBJECTIVES: dict[str, Callable[[torch.Tensor], float]] = {
    "mean": lambda psnr: float(psnr.mean()),
    "worst_quarter": worst_quarter,
}


def search_plan(opt, generate, fractions=None, data_range: float | None = None,
                max_runs: int = 150, objective: str = "mean") -> dict[float, list[int]]:
    """Replace the plan of each fraction in ``fractions`` (default: the configured ``target_fraction``)
    by the computed steps whose ``generate()`` outputs score best against a full run
    (:mod:`~fx_fastcache.policies.plan_search`, which says why); returns ``{fraction: computed steps}``.
    The score is :data:`SEARCH_OBJECTIVES` ``[objective]`` of the outputs' PSNRs.

    One generation per plan tried, at most ``max_runs`` per search.  With ``warmup_steps`` below 2 each fraction is
    searched over the plans that keep the warm-up and once more over those that compute steps 0 and 1
    (:func:`~fx_fastcache.policies.plan_search.search_split`), and keeps the better.  With a drift correction, the
    searched plan's damping is then fitted over :data:`DAMPING_GRID` (:func:`fit_damping`, one
    generation per value past 0) and kept in :data:`DAMPINGS_KEY`.  With a noise forecast, each fraction is
    searched twice, with the forecast and without it (the fallback's output at skipped steps), and keeps the
    better on the same score, in :data:`NOISE_CHOICES_KEY`: it helps some models and fractions and costs others
    (docs/BENCHMARKS.md, "Twenty-fifth session").  The plans are saved with the
    calibration and marked in :data:`SEARCHED_KEY`; :func:`replan` (``measure_sensitivity``,
    ``protect_steps``) drops them with a warning.  A budget whose constraints (warm-up, protected
    steps, ``max_skip_steps``) need more computed steps keeps the program's plan, with a warning.
    """
    if not isinstance(max_runs, int) or isinstance(max_runs, bool) or max_runs < 1:
        raise ValueError(f"search_plan: max_runs={max_runs!r} must be a positive integer (generations tried per "
                         f"fraction, e.g. 150)")
    check_data_range("search_plan", data_range)
    if objective not in SEARCH_OBJECTIVES:
        raise ValueError(f"search_plan: objective={objective!r} is not one of {sorted(SEARCH_OBJECTIVES)}; use "
                         f"'mean' (the mean PSNR) or 'worst_quarter' (the mean PSNR of the worst quarter of the "
                         f"images)")
    store, cfg = opt.store, opt.fastcache_config
    if isinstance(fractions, (int, float, str)) or (fractions is not None and not list(fractions)):
        raise ValueError(f"search_plan: fractions={fractions!r} must be a non-empty list of target_fraction values "
                         f"(e.g. [0.6]), or None for the configured target_fraction={cfg.target_fraction}")
    fractions = [cfg.target_fraction] if fractions is None else list(fractions)
    for f in fractions:  # each must be a valid target_fraction: the config says what that is
        try:
            cfg.replace(target_fraction=f)
        except ValueError as e:
            raise ValueError(f"search_plan: fraction {f!r}: {e}") from None
    result: dict[float, list[int]] = {}
    with holding_plan(opt, generate) as run:
        n = store.tensors[ERRORS_KEY].shape[1]
        forced = forced_steps(cfg.warmup_steps, n)
        protected = protected_steps(store)
        plans = store.tensors[PLANS_KEY].detach().cpu().clone()
        searched = store.tensors.get(SEARCHED_KEY)
        searched = torch.zeros(n, dtype=torch.bool) if searched is None else searched.detach().cpu().clone()
        ref = run(torch.ones(n, dtype=torch.bool))
        peak = output_peak("search_plan", ref, data_range)
        drift = cfg.drift_correction != "none"
        dampings = store.tensors.get(DAMPINGS_KEY)
        dampings = torch.zeros(n) if dampings is None else dampings.detach().cpu().float().clone()
        noise = cfg.noise_forecast != "none"
        choices = store.tensors.get(NOISE_CHOICES_KEY)
        choices = torch.ones(n) if choices is None else choices.detach().cpu().float().clone()

        def score(row: torch.Tensor) -> float:
            return SEARCH_OBJECTIVES[objective](sample_psnr(run(row), ref, peak))

        for f in fractions:
            m = budget(float(f), n)
            start = plans[m - 1].clone()
            if int(start.sum()) != m:  # the constraints need more computed steps: keep the program's plan
                logger.warning("fx-fastcache: search_plan cannot search target_fraction=%.2f: the warm-up steps, "
                               "protected steps and max_skip_steps need %d computed steps of %d; its plan stays", f,
                               int(start.sum()), n)
                result[float(f)] = start.nonzero().flatten().tolist()
                continue
            found = []  # (score, plan, damping, noise on) of each search: with the noise forecast, then without
            for on in ((1.0, 0.0) if noise else (1.0,)):
                if noise:
                    set_noise_forecast(store, on, opt.device)
                if drift:
                    set_damping(store, 0.0, opt.device)
                best, best_score, tried = plan_search.search_split(start, forced, protected, cfg.max_skip_steps,
                                                                   score, max_runs)
                damping = 0.0
                if drift:
                    damping, best_score = fit_damping(store, opt.device, functools.partial(score, best), best_score)
                found.append((best_score, best, damping, on))
                logger.info("fx-fastcache: search_plan target_fraction=%.2f%s: %d generations (at most %d per "
                            "search); computes steps %s (the program's plan: %s)%s; score %.3f", f,
                            f", noise forecast {'on' if on else 'off'}" if noise else "", tried,
                            max_runs, best.nonzero().flatten().tolist(),
                            start.nonzero().flatten().tolist(), f"; drift damping {damping:g}" if drift else "",
                            best_score)
            _, best, dampings[m - 1], choices[m - 1] = max(found, key=lambda r: r[0])  # the first on ties
            if not torch.equal(plans[m - 1], best):
                drop_rules(store, f"search_plan's new plan for target_fraction={f:.2f}", m)
            plans[m - 1], searched[m - 1] = best, True
            result[float(f)] = best.nonzero().flatten().tolist()
    store_put(store, PLANS_KEY, plans)
    store_put(store, SEARCHED_KEY, searched)
    if drift:
        store_put(store, DAMPINGS_KEY, dampings)
    if noise:
        store_put(store, NOISE_CHOICES_KEY, choices)
    install_plan(store, scheduled_blocks(store), cfg.target_fraction, opt.device)
    return result


def set_damping(store, value: float, device: torch.device) -> None:
    """Install the drift correction's damping (in place: captured graphs read the same tensor)."""
    store_put(store, DAMPING_KEY, torch.tensor(float(value), dtype=torch.float32, device=device))


def set_noise_forecast(store, on: float, device: torch.device) -> None:
    """Switch the noise forecast on (1) or off (0) (in place: captured graphs read the same tensor)."""
    store_put(store, ENABLED_KEY, torch.tensor(float(on), dtype=torch.float32, device=device))


def fit_damping(store, device: torch.device, score: Callable[[], float], undamped: float) -> tuple[float, float]:
    """The value of :data:`DAMPING_GRID` whose generations ``score()`` best (the first on ties), installed, and
    its score; ``undamped`` is the score at β = 0, which the plan search already measured.

    Why: how much of the drift correction's estimate to trust after a run of forecasts depends on the
    run's length and the model (docs/BENCHMARKS.md, "Fourteenth session"); a handful of calibration
    generations measure it for the plan the search chose.
    """
    best, best_score = 0.0, undamped
    for value in DAMPING_GRID[1:]:
        set_damping(store, value, device)
        s = score()
        if s > best_score:
            best, best_score = value, s
    set_damping(store, best, device)
    return best, best_score


def install_plan(store, blocks: list[str], target_fraction: float, device: torch.device) -> bool:
    """Write the plan for ``target_fraction`` into the schedule columns of ``blocks``, its drift damping
    (where the model has a drift correction or fitted ones) and its noise forecast switch (likewise); False
    if no plans."""
    plans = store.tensors.get(PLANS_KEY)
    if plans is None or not blocks:
        return False
    n = plans.shape[0]
    m = budget(target_fraction, n)
    computed = plans[m - 1].to("cpu", torch.bool)
    table = (~computed).unsqueeze(1).expand(n, len(blocks)).contiguous()
    install_table(store, blocks, table, device)
    dampings = store.tensors.get(DAMPINGS_KEY)
    if dampings is not None or DAMPING_KEY in store.tensors:
        set_damping(store, 0.0 if dampings is None else float(dampings[m - 1]), device)
    choices = store.tensors.get(NOISE_CHOICES_KEY)
    if choices is not None or ENABLED_KEY in store.tensors:
        set_noise_forecast(store, 1.0 if choices is None else float(choices[m - 1]), device)
    rules = store.tensors.get(RULES_KEY)
    if rules is not None or TABLE_KEY in store.tensors:
        set_rule_table(store, None if rules is None else rules[m - 1], device)
    return True


def set_rule_table(store, rows: torch.Tensor | None, device: torch.device) -> None:
    """Install the output rule's rows for the first steps (``None``: identity everywhere; in place: captured graphs
    read the same tensor)."""
    table = identity_rows(TABLE_ROWS)
    if rows is not None:
        table[:rows.shape[0]] = rows.detach().to("cpu", torch.float32)
    store_put(store, TABLE_KEY, table.to(device))


def drop_rules(store, why: str, budget_rows: int | None = None) -> None:
    """Reset the fitted output rules (of budget ``budget_rows`` only, if given) to identity, with a warning naming
    ``why`` when any was fitted: a rule is fitted for one plan."""
    rules = store.tensors.get(RULES_KEY)
    if rules is None:
        return
    new = rules.detach().cpu().clone()
    rows = slice(None) if budget_rows is None else slice(budget_rows - 1, budget_rows)
    fitted = [i + 1 for i in range(new.shape[0])[rows] if not torch.equal(new[i], identity_rows(new.shape[1]))]
    if not fitted:
        return
    logger.warning("fx-fastcache: %s drops the output rules fit_output_rule fitted for %s computed steps (a rule is "
                   "fitted for its plan); run fit_output_rule again", why, fitted)
    new[rows] = identity_rows(new.shape[1])
    store_put(store, RULES_KEY, new)


_warned_uncalibrated = False


class PlannedPolicy(SchedulePolicy):
    name = "planned"
    scope = "block"  # the plan's table is read per block (all blocks share it)
    signal = None
    host_decidable = True
    exportable = True
    needs_calibration = True

    sweep_field = "target_fraction"
    plans_for_fallback = True  # the plan is made for the fallback's forecast
    # search_plan's and protect_steps' results, absent from files saved without them; the constraints, from
    # files saved before them
    optional_keys = (SEARCHED_KEY, DAMPINGS_KEY, NOISE_CHOICES_KEY, CONSTRAINTS_KEY, PROTECT_KEY, TIMESTEPS_KEY,
                     RULES_KEY)
    step_count_keys = STEP_COUNT_KEYS

    @staticmethod
    def config_error(config) -> str | None:
        if config.fallback in FORECAST_ORDER:
            return None
        return (f"fallback={config.fallback!r} cannot be planned: policy='planned' replays the fallback on the "
                f"recorded residuals to choose the steps, which it can do for {sorted(FORECAST_ORDER)}; use one of "
                f"those (default 'forecast')")

    @classmethod
    def measure_sensitivity(cls, opt, generate, metric=None) -> list[float]:
        return measure_sensitivity(opt, generate, metric)

    @classmethod
    def protect_steps(cls, opt, generate, floor_db, data_range=None) -> list[int]:
        return protect_steps(opt, generate, floor_db, data_range)

    @classmethod
    def search_plan(cls, opt, generate, fractions=None, data_range=None, max_runs=150,
                    objective="mean") -> dict[float, list[int]]:
        return search_plan(opt, generate, fractions, data_range, max_runs, objective)

    @staticmethod
    def steps_mismatch(store, steps: int) -> str | None:
        planned = plan_steps(store)
        if planned is None or planned == steps:
            return None
        return (f"policy='planned' was calibrated on {planned}-step generations, this one runs {steps} steps: the "
                f"plan's rows apply by step index and the steps past it compute; calibrate with {steps} steps")

    @staticmethod
    def schedule_mismatch(store, timesteps: list[float]) -> str | None:
        made = store.tensors.get(TIMESTEPS_KEY)
        if made is None or len(timesteps) != made.numel():  # no record, or another step count (steps_mismatch)
            return None
        made = made.detach().cpu().float()
        ran = torch.tensor(timesteps, dtype=torch.float32)
        scale = float(made.abs().max()) or 1.0
        if float((ran - made).abs().max()) <= SCHEDULE_TOLERANCE * scale:
            return None
        show = lambda t: "[" + ", ".join(f"{v:.4g}" for v in t.tolist()) + "]"  # noqa: E731
        return (f"policy='planned' chose its computed steps for the calibration's timesteps {show(made)}, and this "
                f"generation ran {show(ran)} (another shift or custom schedule, a resolution-dependent shift, or "
                f"image-to-image strength): plans do not carry over between schedules (on a shifted schedule, plans "
                f"searched for the uniform one scored 4-6 dB below a fixed-interval plan, docs/BENCHMARKS.md "
                f"'Twenty-sixth session'); calibrate (and search_plan) with the schedule you sample with")

    @staticmethod
    def configure_store(store, config, device) -> None:
        """``target_fraction`` changed: install that budget's plan (no re-capture: the graphs read the columns).
        ``warmup_steps`` or ``max_skip_steps`` changed (or a file made under others was loaded): plan again,
        since the plans were made under the old ones (the warm-up's forced steps would replace less)."""
        made = store.tensors.get(CONSTRAINTS_KEY)
        if made is not None and not torch.equal(made.cpu(), plan_constraints(config)):
            logger.info("fx-fastcache: policy='planned' re-plans for warmup_steps=%d, max_skip_steps=%d (the plans "
                        "were made for %s)", config.warmup_steps, config.max_skip_steps, made.tolist())
            replan(store, config, scheduled_blocks(store), device)
        elif install_plan(store, scheduled_blocks(store), config.target_fraction, device):
            warn_unmet(store.tensors[PLANS_KEY], config.target_fraction, protected_steps(store))

    @classmethod
    def calibrator(cls, config) -> PlannedCalibrator:
        return PlannedCalibrator(FORECAST_ORDER[config.fallback], config.fallback in BLENDED)

    @staticmethod
    def install_table(store, blocks, table, device) -> None:
        raise ValueError("policy='planned' plans its own table in calibration (`with fastcache.calibrate(model): "
                         "...`); to install a table of your own use policy='schedule'")

    @staticmethod
    def read_table(store, blocks):
        """The plan's table; uncalibrated (no columns yet), a table that computes every step."""
        table = read_table(store, blocks)
        return table if table is not None else torch.zeros(1, len(blocks), dtype=torch.bool)

    def make_block_decider(self, index, block, signal_shape, device, dtype, store, group=None):
        global _warned_uncalibrated
        if index == 0 and id(store) not in _held:  # (re-)capture: the current target_fraction's plan
            install_plan(store, scheduled_blocks(store), self.config.target_fraction, device)
        if index == 0 and store.tensors.get(PLANS_KEY) is None and not _warned_uncalibrated:
            _warned_uncalibrated = True
            logger.info("fx-fastcache: policy='planned' is uncalibrated, so every step computes; "
                           "`with fastcache.calibrate(model): ...` (full sampling loops of the step count you "
                           "use) plans which steps to compute for target_fraction=%.2f", self.config.target_fraction)
        return super().make_block_decider(index, block, signal_shape, device, dtype, store, group)

    def span_groups(self, block_names, store):
        """One span: every block shares the plan's decision."""
        return [list(range(len(block_names)))] if block_names else []
