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
steps, the set that minimises the summed error (its root-mean-square over the calibration
samples, so that one bad sample weighs more than in a plain mean), and ``target_fraction``
picks the budget.

The plan is a ``steps × blocks`` table of the ``schedule`` policy, so every decision is known
before the step: step dispatch reads it on the host without a sync, and it exports to ONNX.  The
plan holds for the step count it was calibrated with; :func:`plan_steps` tells it, and a
generation of another length gets a warning (steps past the plan compute in full).
Uncalibrated, nothing is planned and every step computes (logged once).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..calibration import Calibrator, Observation, store_put
from ..runtime.distributed import all_reduce_sum
from .schedule import SchedulePolicy, install_table, read_table

logger = logging.getLogger(__name__)

#: Calibration store keys: every budget's plan (row ``M − 1``: the steps computed with ``M``
#: computed steps) and the step count the plans are for.
PLANS_KEY = "planned.plans"
STEPS_KEY = "planned.steps"
#: Token rows kept per sample, guard, stream and step (strided); bounds calibration memory.
ROWS_PER_SAMPLE = 64
#: Exponent of the mean over calibration samples of the summed errors (2: root-mean-square).
SAMPLE_NORM = 2.0


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


def forecast_errors(ts: list[float], residuals: list[list[torch.Tensor]], outputs: list[list[torch.Tensor]]
                    ) -> dict[tuple[int, int, int], torch.Tensor]:
    """``err[(p, c, k)]``: per-sample error of forecasting step ``k`` from computed steps ``p < c < k``
    (``p = −1``: ``c`` is the only computed step, plain reuse), over every recorded stream.

    ``residuals[k][j]`` / ``outputs[k][j]``: stream ``j``'s rows (B, rows, C) at step ``k``.  The
    forecast replaces output ``y`` by ``y + R̂ − R``; the error is ``‖LN(y + R̂ − R) − LN(y)‖`` summed
    over streams, times the step weight.
    """
    n = len(ts)
    w = step_weights(ts)

    def ln(z: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(z, z.shape[-1:])

    normed = [[ln(y) for y in ys] for ys in outputs]
    err: dict[tuple[int, int, int], torch.Tensor] = {}
    for c in range(n):
        for p in range(-1, c):
            if p >= 0 and ts[c] == ts[p]:
                continue
            for k in range(c + 1, n):
                s = (ts[k] - ts[c]) / (ts[c] - ts[p]) if p >= 0 else 0.0
                e = 0.0
                for j, (r_k, y_k) in enumerate(zip(residuals[k], outputs[k])):
                    r_hat = residuals[c][j] + s * (residuals[c][j] - residuals[p][j]) if p >= 0 else residuals[c][j]
                    d = ln(y_k + (r_hat - r_k)) - normed[k][j]
                    e = e + d.flatten(1).pow(2).sum(1)
                err[(p, c, k)] = w[k] * torch.as_tensor(e).sqrt()
    return err


def plan(err: dict[tuple[int, int, int], torch.Tensor], n: int, warmup: int = 0, max_skip: int = 0,
         power: float = SAMPLE_NORM) -> torch.Tensor:
    """Every budget's best computed-step set: a (n, n) bool tensor whose row ``M − 1`` marks the ``M``
    computed steps minimising ``mean_samples((Σ edge errors)^power)^(1/power)``.

    Dynamic program over the last two computed steps ``(p, c)``; step 0 and the first ``warmup``
    steps always compute, and no more than ``max_skip`` steps in a row are skipped (``0``: no cap).
    Rows whose budget cannot be met under those constraints repeat the nearest feasible larger one.
    """
    forced = max(1, min(warmup, n))

    def agg(v: torch.Tensor) -> float:
        return float(v.pow(power).mean().pow(1.0 / power))

    def edge(p: int, c: int, nxt: int) -> torch.Tensor:
        tot = 0.0
        for k in range(c + 1, nxt):
            tot = tot + err[(p, c, k)]
        return torch.as_tensor(tot)

    zero = next(iter(err.values())).new_zeros(()) if err else torch.zeros(())
    # states: (p, c, m) -> (cost vector, computed steps); the forced prefix 0..forced-1 computed
    start_p = forced - 2 if forced >= 2 else -1
    best: dict[tuple, tuple[torch.Tensor, list[int]]] = {(start_p, forced - 1, forced): (zero, list(range(forced)))}
    ends: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for c in range(forced - 1, n):
        for p in range(-1, c):
            for m in range(forced, n + 1):
                st = best.get((p, c, m))
                if st is None:
                    continue
                cost, path = st
                last = n if max_skip <= 0 else min(n, c + max_skip + 1)
                for nxt in range(c + 1, last + 1):
                    if nxt < n and (p, c, nxt) not in err and nxt > c + 1:
                        continue  # p and c at the same timestep: no forecast from them
                    new = cost + edge(p, c, nxt) if nxt > c + 1 else cost
                    key = ("end", m) if nxt == n else (c, nxt, m + 1)
                    table = ends if nxt == n else best
                    k2 = m if nxt == n else key
                    cur = table.get(k2)
                    if cur is None or agg(new) < agg(cur[0]):
                        table[k2] = (new, path + ([nxt] if nxt < n else []))
    plans = torch.zeros(n, n, dtype=torch.bool)
    for m in range(n, 0, -1):
        if m in ends:
            plans[m - 1, ends[m][1]] = True
        elif m < n:
            plans[m - 1] = plans[m]
        else:
            plans[m - 1] = True
    return plans


def budget(target_fraction: float, n: int) -> int:
    """Computed steps for ``target_fraction`` of ``n`` steps replaced (at least one)."""
    return max(1, n - int(round(target_fraction * n)))


def plan_steps(store) -> int | None:
    """The step count the installed plans are for (``None``: not calibrated)."""
    t = store.tensors.get(STEPS_KEY)
    return None if t is None else int(t)


class PlannedCalibrator(Calibrator):
    """Records every step's span residuals and outputs (strided token rows) during calibration and
    plans the computed steps of every budget (:func:`forecast_errors`, :func:`plan`)."""

    def __init__(self) -> None:
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
        cost = None
        for gen in self.generations:
            ts = [s[0] for s in gen]
            e = forecast_errors(ts, [s[1] for s in gen], [s[2] for s in gen])
            cost = e if cost is None else {k: torch.cat([cost[k], v]) for k, v in e.items()}
        if self.group is not None:  # every rank saw its own tokens: plan on the errors of all of them
            keys = sorted(cost)
            sq = torch.stack([cost[k].pow(2) for k in keys])
            sq = all_reduce_sum(sq.to(self.device), self.group).cpu()
            cost = {k: sq[i].sqrt() for i, k in enumerate(keys)}
        plans = plan(cost, n, warmup=config.warmup_steps, max_skip=config.max_skip_steps)
        store_put(store, PLANS_KEY, plans)
        store_put(store, STEPS_KEY, torch.tensor(n))
        install_plan(store, self.blocks, config.target_fraction, store_device(store))
        m = budget(config.target_fraction, n)
        logger.info("fx-fastcache: planned %d generation(s) of %d steps; target_fraction=%.2f computes steps %s",
                    len(self.generations), n, config.target_fraction, plans[m - 1].nonzero().flatten().tolist())
        return {"planned.steps": float(n), "planned.computed": float(int(plans[m - 1].sum()))}


def store_device(store) -> torch.device:
    t = next(iter(store.tensors.values()), None)
    return t.device if t is not None else torch.device("cpu")


def install_plan(store, blocks: list[str], target_fraction: float, device: torch.device) -> bool:
    """Write the plan for ``target_fraction`` into the schedule columns of ``blocks``; False if no plans."""
    plans = store.tensors.get(PLANS_KEY)
    if plans is None or not blocks:
        return False
    n = plans.shape[0]
    computed = plans[budget(target_fraction, n) - 1].to("cpu", torch.bool)
    table = (~computed).unsqueeze(1).expand(n, len(blocks)).contiguous()
    install_table(store, blocks, table, device)
    return True


def planned_blocks(store) -> list[str]:
    """The blocks whose schedule columns a plan was installed into."""
    return [k[: -len(".schedule")] for k in store.tensors if k.endswith(".schedule")]


_warned_uncalibrated = False


class PlannedPolicy(SchedulePolicy):
    name = "planned"
    scope = "block"  # the plan's table is read per block (all blocks share it)
    signal = None
    host_decidable = True
    exportable = True
    needs_calibration = True

    sweep_field = "target_fraction"

    @staticmethod
    def configure_store(store, config, device) -> None:
        """``target_fraction`` changed: install that budget's plan (no re-capture: the graphs read the columns)."""
        install_plan(store, planned_blocks(store), config.target_fraction, device)

    @classmethod
    def calibrator(cls, config) -> PlannedCalibrator:
        return PlannedCalibrator()

    @staticmethod
    def install_table(store, blocks, table, device) -> None:
        raise ValueError("policy='planned' plans its own table in calibration (`with fastcache.calibrate(model): "
                         "...`); to install a table of your own use policy='schedule'")

    @staticmethod
    def read_table(store, blocks):
        return read_table(store, blocks)

    def make_block_decider(self, index, block, signal_shape, device, dtype, store, group=None):
        global _warned_uncalibrated
        if index == 0:  # (re-)capture: the plan of the current target_fraction into the planned columns
            install_plan(store, planned_blocks(store), self.config.target_fraction, device)
        if index == 0 and store.tensors.get(PLANS_KEY) is None and not _warned_uncalibrated:
            _warned_uncalibrated = True
            logger.warning("fx-fastcache: policy='planned' is uncalibrated, so every step computes; "
                           "`with fastcache.calibrate(model): ...` (full sampling loops of the step count you "
                           "use) plans which steps to compute for target_fraction=%.2f", self.config.target_fraction)
        return super().make_block_decider(index, block, signal_shape, device, dtype, store, group)

    def span_groups(self, block_names, store):
        """One span: every block shares the plan's decision."""
        return [list(range(len(block_names)))] if block_names else []
