"""Step-level forecast-consistency rule ("mod0fc"), the best rule measured so far.

Before any block runs, block 0's modulated input ``u₀`` (which sees the timestep) is compared
with its linear extrapolation from the last two fully computed steps,
``û₀ = u_c + (t − t_c)(u_c − u_p)/(t_c − t_p)``; ``d = ‖u₀ − û₀‖/‖u₀‖``.  If every sample has
``d ≤ cache_ratio_threshold`` the whole step is approximated (block 0 included).  It pairs with
the ``forecast`` fallback: the statistic checks exactly what the forecast assumes (that the
trajectory is locally linear in t).  One decision per step, made before the blocks: on GPU
this is the rule that needs no per-block sync.  Measured (docs/BENCHMARKS.md): DiT 40.6 dB
(worst 34.0) at 55 % replaced with the calibrated default.

Scale.  The raw statistic's scale is model dependent: at the same threshold one model
replaces 45 %, another 60 %, an unseen one 0 %.  Calibration therefore fits a per-model
``scale`` (:func:`fit_scale`): it replays this rule offline on the probes recorded during the
full-compute calibration runs and bisects the raw threshold ``τ`` at which the calibration
generations replace :data:`CALIBRATION_TARGET` of their steps; ``scale = τ /
REFERENCE_THRESHOLD``.  The decider tests ``d ≤ cache_ratio_threshold · scale``, so after
calibration the default threshold (0.07) means "about 55 % replaced" on every model, and other
thresholds scale from there.  Uncalibrated, ``scale = 1`` (raw threshold; logged once).  Under
context parallelism every rank gathers the probes of all ranks and replays the rule on all tokens,
as one process would (exactly, unless a rank's probe exceeds :data:`MAX_PROBE_VALUES` and is
subsampled per rank).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..calibration import Calibrator, Observation, store_put
from ..runtime.distributed import norm_ratio
from ..runtime.state_ops import assign, forecast_slope, shift
from .base import Decider, Policy

logger = logging.getLogger(__name__)

#: Fraction of steps the calibration generations replace at ``REFERENCE_THRESHOLD`` after calibration.
CALIBRATION_TARGET = 0.55
#: The threshold that calibration maps onto ``CALIBRATION_TARGET`` (the config's default).
REFERENCE_THRESHOLD = 0.07
#: The calibration store key of the fitted scale.
SCALE_KEY = "step_forecast.scale"
#: Probe values kept per sample and step for the replay (bounded memory).
MAX_PROBE_VALUES = 262144
_warned_uncalibrated = False


def simulate(us: list[torch.Tensor], ts: list[float], tau: float, warmup: int = 2, max_skip: int = 0) -> list[int]:
    """The steps this rule computes on recorded probes ``us[i]`` (B, ...) at timesteps ``ts[i]``.

    Offline replay of :class:`StepForecastDecider` plus the clock's warm-up and the guards'
    ``max_skip`` cap, with every step's probe taken from a full-compute run (in a cached run the
    probes drift slightly, so the fraction is approximate).
    """
    computed: list[int] = []
    run = 0
    for i, u in enumerate(us):
        skip = False
        if i >= warmup and len(computed) >= 2 and (max_skip <= 0 or run < max_skip):
            c, p = computed[-1], computed[-2]
            if ts[c] != ts[p]:
                u_hat = us[c] + (ts[i] - ts[c]) / (ts[c] - ts[p]) * (us[c] - us[p])
                d = norm_ratio(u - u_hat, u, None)
                skip = bool((d <= tau).all())
        if skip:
            run += 1
        else:
            computed.append(i)
            run = 0
    return computed


def fit_scale(generations: list[tuple[list[float], list[torch.Tensor]]], warmup: int, max_skip: int,
              target: float = CALIBRATION_TARGET) -> tuple[float, float]:
    """``(scale, achieved fraction)``: the smallest raw τ at which the calibration generations
    (each ``(timesteps, probes)``) replace ``target`` of their steps on average, over
    :data:`REFERENCE_THRESHOLD` (geometric bisection on [1e-4, 4]).  Where even τ = 4 replaces
    less (runs too short for the warm-up, or a ``max_skip`` cap), the scale is that upper bound:
    the caller refuses to store it."""
    gens = [(ts, us) for ts, us in generations if len(us) >= 3]
    if not gens:
        raise ValueError("step_forecast calibration needs generations of at least 3 steps")

    def frac(tau: float) -> float:
        return sum(1 - len(simulate(us, ts, tau, warmup, max_skip)) / len(us) for ts, us in gens) / len(gens)

    lo, hi = 1e-4, 4.0
    if frac(hi) < target:
        return hi / REFERENCE_THRESHOLD, frac(hi)
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        if frac(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi / REFERENCE_THRESHOLD, frac(hi)


class StepForecastCalibrator(Calibrator):
    """Records block 0's probe at every calibration step (from the step decider, which ran first) and
    fits the statistic's per-model scale (:func:`fit_scale`)."""

    def __init__(self) -> None:
        self.generations: list[tuple[list[float], list[torch.Tensor]]] = []

    def observe(self, obs: Observation) -> None:
        u_c = getattr(obs.step_decider, "u_c", None)
        if obs.guard.index != 0 or u_c is None:
            return
        if obs.new_gen or not self.generations:
            self.generations.append(([], []))
        u = u_c.detach().float().cpu()
        stride = max(1, u[0].numel() // MAX_PROBE_VALUES)
        self.generations[-1][0].append(obs.t)
        self.generations[-1][1].append(u.flatten(1)[:, ::stride].clone())

    def fit(self, store, dtype, config) -> dict[str, float]:
        if not self.generations:
            return {}
        longest = max(len(us) for _, us in self.generations)
        if longest < 3:
            logger.warning("fx-fastcache: step_forecast scale not fitted: the calibration generations had fewer than "
                           "3 steps (%d); calibrate with full sampling loops", longest)
            return {}
        gens = self.generations
        if self.group is not None:
            # each rank recorded its own tokens; the run-time statistic is over all of them, so every rank
            # replays on all of them (averaging per-rank fits gave another scale than one process)
            parts: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(parts, [us for _, us in gens], group=self.group)
            gens = [(ts, [torch.cat([p[g][i] for p in parts], dim=1) for i in range(len(us))])
                    for g, (ts, us) in enumerate(gens)]
        scale, frac = fit_scale(gens, config.warmup_steps, config.max_skip_steps)
        if frac < CALIBRATION_TARGET:
            # the bisection hit its upper bound: a scale there skips every step it may, which on the
            # longer generations that follow replaces far more than the target (a 4-step calibration
            # of dit-mnist: 90 % replaced at 6 dB on 20 steps)
            logger.warning("fx-fastcache: step_forecast scale not fitted: the calibration generations (%d steps at most, "
                           "warmup_steps=%d, max_skip_steps=%d) can replace at most %.0f%% of their steps, below the "
                           "%.0f%% the default threshold is fitted to; calibrate with sampling loops as long as the "
                           "ones you will run", longest, config.warmup_steps, config.max_skip_steps, 100 * frac,
                           100 * CALIBRATION_TARGET)
            return {}
        store_put(store, SCALE_KEY, torch.tensor(scale))
        logger.info("fx-fastcache: step_forecast scale %.3f (calibration generations replace %.0f%% at the default "
                    "threshold)", scale, 100 * frac)
        return {"step_forecast.scale": scale}


class StepForecastDecider(Decider):
    def __init__(self, signal_shape, device, dtype, store=None, group=None) -> None:
        super().__init__()
        self.group = group
        self.register_buffer("u_c", torch.zeros(signal_shape, dtype=dtype, device=device))
        self.register_buffer("u_p", torch.zeros(signal_shape, dtype=dtype, device=device))
        self.register_buffer("t_c", torch.tensor(0.0, device=device))
        self.register_buffer("t_p", torch.tensor(0.0, device=device))
        self.register_buffer("n", torch.tensor(0.0, device=device))
        self.register_buffer("last_stat", torch.zeros(signal_shape[0], device=device))
        one = lambda: torch.tensor(1.0, device=device)  # noqa: E731
        self.register_buffer("scale", store.get(SCALE_KEY, (), one) if store is not None else one())
        self._persistent_state = ("scale",)

    def forward(self, step, new_gen, ok, threshold, t, u):
        n = self.computed_count(new_gen)
        valid = (n >= 2) & (self.t_c != self.t_p)
        slope = forecast_slope(t, self.t_c, self.t_p, valid).to(u.dtype)
        u_hat = self.u_c + slope * (self.u_c - self.u_p)
        d = norm_ratio(u - u_hat, u, self.group)  # over every rank's tokens
        self.last_stat.copy_(d)
        pred = ok & valid & (d <= threshold * self.scale).all()
        computed = ~pred
        shift(self.u_p, computed, self.u_c)
        assign(self.u_c, computed, u)
        shift(self.t_p, computed, self.t_c)
        assign(self.t_c, computed, t)
        self.count_computed(n, pred)
        return pred


class StepForecastPolicy(Policy):
    name = "step_forecast"
    scope = "step"
    signal = "probe"
    needs_calibration = True  # the statistic's per-model scale

    @classmethod
    def calibrator(cls, config) -> StepForecastCalibrator:
        return StepForecastCalibrator()

    def make_step_decider(self, signal_shape, device, dtype, store, group=None):
        global _warned_uncalibrated
        if not store.calibrated and not _warned_uncalibrated:
            _warned_uncalibrated = True
            logger.info("step_forecast is uncalibrated: cache_ratio_threshold=%g acts on the raw statistic, whose "
                        "scale is model dependent (0-60 %% replaced at 0.07 on the models measured); "
                        "`with fastcache.calibrate(model): ...` fits the scale so that the default threshold "
                        "replaces about %.0f %% of the steps", self.config.cache_ratio_threshold,
                        100 * CALIBRATION_TARGET)
        return StepForecastDecider(signal_shape, device, dtype, store, group)
