"""The one configuration object of fx-fastcache.

`FastCacheConfig` is frozen and validated on construction: a bad value raises `ValueError`
naming the field, the value and what is accepted.  Fields that only change *tensor values*
inside the rewritten graph (thresholds, warm-up, enable flags) can be changed between
generations with :func:`fx_fastcache.configure` without recompiling; fields that change the
graph's structure (``policy``, ``fallback``, token routing) trigger a re-capture.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

from .fallbacks import FALLBACKS
from .policies import POLICIES

#: Former field names → current ones (still accepted, with a ``DeprecationWarning``; files written
#: before the rename keep loading).
RENAMED = {"enable_spatial_approx": "enable_token_routing"}


def _renamed(d: dict[str, Any]) -> dict[str, Any]:
    old = [k for k in d if k in RENAMED]
    if not old:
        return d
    d = dict(d)
    for k in old:
        new = RENAMED[k]
        if new in d:
            raise ValueError(f"FastCacheConfig: both {k!r} (its former name) and {new!r} given; pass only {new!r}")
        warnings.warn(f"FastCacheConfig field {k!r} is now {new!r}", DeprecationWarning, stacklevel=3)
        d[new] = d.pop(k)
    return d


#: Numeric fields of :class:`FastCacheConfig`, stored as plain ``float`` / ``int`` whatever number type was given.
_FLOAT_FIELDS = ("cache_ratio_threshold", "ridge", "token_merge_lambda", "significance_level", "motion_threshold",
                 "target_fraction", "merge_ratio", "timestep_per_sigma")
_INT_FIELDS = ("warmup_steps", "max_skip_steps", "calibration_lags", "token_merge_k", "num_stages")

#: Values of ``FastCacheConfig.drift_correction`` (the sampler the correction is exact for).
DRIFT_CORRECTIONS = ("none", "flow_euler")

#: Values of ``FastCacheConfig.noise_forecast`` (the sampler it is made for).
NOISE_FORECASTS = ("none", "flow_euler")

#: Values of ``FastCacheConfig.output_rule``.
OUTPUT_RULES = ("none", "fitted")

#: Fields whose change only updates tensor buffers inside the captured graph.
RUNTIME_FIELDS = frozenset(
    {"cache_ratio_threshold", "significance_level", "enable_block_approx", "warmup_steps", "max_skip_steps",
     "target_fraction"}
)


@dataclass(frozen=True)
class FastCacheConfig:
    """Configuration of the FastCache rewrite.

    Attributes:
        cache_ratio_threshold: The seed paper's threshold: the relative change level of a
            block's (modulated) input below which the block may be approximated.  0 never
            approximates; 0.5 and above approximates almost every block after warm-up.
            Interpreted by the ``policy`` (see ``fx_fastcache/policies``).
        significance_level: α of the χ² test of the ``"chi2"`` policy.  Larger α = stricter
            (fewer skips).  Must be in (0, 1).
        motion_threshold: Token-level saliency threshold for motion-aware token routing
            (fraction of tokens treated as static).  In [0, 1).
        enable_block_approx: Master switch for block approximation; ``False`` computes every
            block in full (the rewritten graph is still used).
        enable_token_routing: Motion-aware token routing inside computed blocks.
        enable_token_merge: Spatial-temporal token merging.
        fallback: What replaces a skipped block: ``"residual_linear"`` (cached residual plus a
            ridge-fitted linear correction of the input change), ``"residual"`` (cached residual
            only), ``"forecast"`` (first-order forecast of the residual in the timestep, from its
            last two computations), ``"forecast_blend"`` (the same, except that after two
            computations at adjacent steps the slope is averaged with the one from the computation
            before them; one more residual of state; an option for models whose worst image breaks
            on early forecasts), ``"linear"`` (the paper's pure linear map ``W H + b``).
        policy: Who decides: ``"chi2"`` (per block, the seed's rule with a calibrated scale),
            ``"step_forecast"`` (once per step, before any block runs, from the deviation of
            block 0's modulated input from its linear forecast), ``"first_block_cache"``,
            ``"teacache"``, ``"schedule"`` (a precomputed steps × blocks table), ``"planned"``
            (the steps to compute chosen in calibration, for ``target_fraction``; with the
            ``"forecast"``, ``"forecast_blend"`` or ``"residual"`` fallback, whose rule the plan
            replays).
        warmup_steps: The first ``warmup_steps`` steps of every generation compute in full.
        max_skip_steps: A block is recomputed after this many consecutive skipped steps
            (``0`` = no limit).  Bounds drift of every fallback.
        target_fraction: For ``policy="planned"``: the fraction of steps the plan replaces
            (calibration chooses which).  In [0, 1).
        ridge: Ridge strength λ (relative to the mean diagonal of XᵀX) of calibration fits.
        calibration_lags: Step distances (1..n) between the reference and the current input
            used to fit the linear correction; should cover the typical skip length.
        token_merge_k: K nearest neighbours for the spatial density of token merging.
        token_merge_lambda: λ weighting temporal saliency in token importance.
        num_stages: Stages of the token-merging pyramid.
        merge_ratio: Fraction of tokens kept after merging (1.0, the default, merges nothing: with
            ``enable_token_merge=True`` it is refused).
        span: How blocks are guarded: ``"auto"`` (consecutive blocks that always share their
            decision form one span = one ``cond``, with the fallback state at the span boundary;
            see ``passes/group_spans.py``) or ``"block"`` (one guard and one state per block).
            Fitted fallbacks and token routing/merging always use ``"block"``.
        drift_correction: ``"none"`` or ``"flow_euler"``: at each computed step, also take back
            the latent drift left by the forecast steps before it, by interpolating the velocity
            between the two computed steps around them (:mod:`fx_fastcache.runtime.drift`).  Only
            for a flow-matching Euler sampler whose timestep is proportional to σ and whose
            velocity is the model's first output (SD3, Flux, ``FlowMatchEulerDiscreteScheduler``,
            the trained MNIST models); other samplers get wrong images.  Needs one decision per
            step (not ``chi2``).  Not exported to ONNX.
        noise_forecast: ``"none"`` or ``"flow_euler"``: a skipped step hands the sampler the velocity
            of the predicted noise ``ε = x + (1 − σ) v`` extrapolated linearly in σ through the last two
            computed steps, ``v = (ε̂ − x) / (1 − σ)``, instead of what the fallback made of the blocks
            (:mod:`fx_fastcache.runtime.noise_forecast`).  The same sampler assumption as
            ``drift_correction`` (with which it combines); needs one decision per step and the
            velocity as the model's first output, of the latents' shape.  Not exported to ONNX.
        timestep_per_sigma: The model's timestep at σ = 1, which ``noise_forecast`` divides by to get
            σ (1000 where the pipeline passes σ·1000, as SD3 and Wan; 1 where it passes σ, as Flux).
            ``0`` (the default): the family's value; a model whose family does not declare one must
            give it.
        output_rule: ``"none"`` or ``"fitted"``: with ``policy="planned"``, the output at every step may be a linear
            rule of the last three computed steps' outputs and the last computed latent, fitted end to end through the
            sampler by :func:`fx_fastcache.fit_output_rule` per fraction, and kept where it scores ``min_gain`` (1 dB)
            better than the library's rules on the calibration generations, or held-out ones (``validate``)
            (:mod:`fx_fastcache.runtime.output_rule`).  Until it is fitted the graph's output is unchanged.  Combines
            with ``noise_forecast`` and ``drift_correction`` (the fraction uses their output where the fit lost); the model's first output must have its latents' shape.
            Not exported to ONNX.
    """

    cache_ratio_threshold: float = 0.07
    significance_level: float = 0.05
    motion_threshold: float = 0.1
    enable_block_approx: bool = True
    enable_token_routing: bool = False
    enable_token_merge: bool = False
    fallback: str = "forecast"
    policy: str = "step_forecast"
    warmup_steps: int = 2
    max_skip_steps: int = 0
    target_fraction: float = 0.55
    ridge: float = 1e-2
    calibration_lags: int = 3
    token_merge_k: int = 4
    token_merge_lambda: float = 0.5
    num_stages: int = 1
    merge_ratio: float = 1.0
    span: str = "auto"
    drift_correction: str = "none"
    noise_forecast: str = "none"
    timestep_per_sigma: float = 0.0
    output_rule: str = "none"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            shown = repr(getattr(self, name))
            shown = shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} characters)"
            return ValueError(f"FastCacheConfig.{name}={shown} is invalid: {why}")

        # numbers of any type (numpy scalars, 10**400) as plain floats / ints, or the checks below name them
        for names, kind, convert in ((_FLOAT_FIELDS, numbers.Real, float), (_INT_FIELDS, numbers.Integral, int)):
            for name in names:
                v = getattr(self, name)
                if isinstance(v, kind) and not isinstance(v, bool):
                    try:
                        object.__setattr__(self, name, convert(v))
                        float(v)  # the clock holds integer fields as floats: 10**400 must fail here
                    except OverflowError:
                        raise bad(name, "expected a finite number") from None
        for name in ("span", "fallback", "policy", "drift_correction", "noise_forecast", "output_rule"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "expected a name (a string)")

        for name in ("cache_ratio_threshold", "ridge", "token_merge_lambda", "timestep_per_sigma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "expected a finite number >= 0")
        for name in ("significance_level",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise bad(name, "expected a probability strictly between 0 and 1 (e.g. 0.05)")
        v = self.motion_threshold
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise bad("motion_threshold", "expected a fraction in [0, 1)")
        v = self.target_fraction
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise bad("target_fraction", "expected a fraction in [0, 1) of steps to replace (e.g. 0.6)")
        v = self.merge_ratio
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise bad("merge_ratio", "expected a fraction in (0, 1]")
        for name in ("enable_block_approx", "enable_token_routing", "enable_token_merge"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "expected True or False")
        if self.enable_token_merge and self.merge_ratio >= 1.0:
            raise bad("enable_token_merge", f"merge_ratio={self.merge_ratio!r} keeps every token, so nothing would "
                                            f"be merged; set merge_ratio below 1 (the fraction of tokens kept, e.g. 0.5)")
        for name, lo in (("warmup_steps", 0), ("max_skip_steps", 0), ("calibration_lags", 1),
                         ("token_merge_k", 1), ("num_stages", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise bad(name, f"expected an integer >= {lo}")
        if self.span not in ("auto", "block"):
            raise bad("span", "choose 'auto' (guarded spans) or 'block' (one guard per block)")
        if self.fallback not in FALLBACKS:
            raise bad("fallback", f"choose one of {sorted(FALLBACKS)}")
        if self.policy not in POLICIES:
            raise bad("policy", f"choose one of {sorted(POLICIES)}")
        if self.drift_correction not in DRIFT_CORRECTIONS:
            raise bad("drift_correction", f"choose one of {DRIFT_CORRECTIONS}")
        if self.drift_correction != "none" and not POLICIES[self.policy].decides_per_step():
            raise bad("drift_correction", f"policy={self.policy!r} decides per block; the correction needs one "
                                          f"decision per step (step_forecast, planned, schedule, ...)")
        if self.noise_forecast not in NOISE_FORECASTS:
            raise bad("noise_forecast", f"choose one of {NOISE_FORECASTS}")
        if self.noise_forecast != "none" and not POLICIES[self.policy].decides_per_step():
            raise bad("noise_forecast", f"policy={self.policy!r} decides per block; the noise forecast replaces a "
                                        f"whole skipped step's output and needs one decision per step (step_forecast, "
                                        f"planned, schedule, ...)")
        if self.output_rule not in OUTPUT_RULES:
            raise bad("output_rule", f"choose one of {OUTPUT_RULES}")
        if self.output_rule != "none" and self.policy != "planned":
            raise bad("output_rule", f"policy={self.policy!r}: the fitted rule is fitted for a plan's computed steps; "
                                     f"use policy='planned' (with target_fraction), or output_rule='none'")
        why = POLICIES[self.policy].config_error(self)
        if why is not None:
            raise bad("policy", why)

    def replace(self, **changes: Any) -> "FastCacheConfig":
        """A copy with ``changes`` applied (validated). Unknown names raise ``ValueError``."""
        changes = _renamed(changes)
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown FastCacheConfig field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FastCacheConfig":
        d = _renamed(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FastCacheConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def resolve(cls, config: "FastCacheConfig | None", **overrides: Any) -> "FastCacheConfig":
        """``config`` (default: ``FastCacheConfig()``) with keyword ``overrides`` applied."""
        if config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(f"config must be a FastCacheConfig, got {type(config).__name__}")
        return config.replace(**overrides) if overrides else config

    def structural_key(self) -> tuple[Any, ...]:
        """The fields that shape the rewritten graph (a change forces re-capture)."""
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in RUNTIME_FIELDS)
