"""The speed/quality sweep: methods x thresholds on a trained model, measured side by side.

Why it is built this way:

* **Same inputs for every method.**  Every run generates the same evaluation images (classes
  ``i % 10``, seeds ``eval_seed + i``) with the reference Euler/CFG sampler of
  :mod:`fx_fastcache.trained`; fidelity is measured against the uncached images of the same
  seeds.  Calibration uses other seeds (``calib_seed + i``, checked disjoint), so nothing is
  fitted on the images it is judged on.
* **Only the policy differs.**  ``none``, FastCache (policy x fallback), First-Block-Cache and
  TeaCache all run through the same rewritten graph (:func:`fx_fastcache.optimize`), so the
  overheads are the same and the comparison is of decisions and fallbacks.  The external
  peers (diffusers' First-Block-Cache, cache-dit) run their own code on a copy of the model
  (:mod:`fx_fastcache.bench.peers`).
* **Timing is interleaved.**  The machine this runs on is shared; wall-clock per image is
  measured on a small timing batch as uncached, cached, uncached, cached ... in one process and
  the best of the repeats is kept, so a load spike hits both sides alike.  The ratio is
  reported next to the ideal ``1 / (1 - fraction of FLOPs replaced)``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import fx_fastcache as fastcache
from fx_fastcache.config import FastCacheConfig
from fx_fastcache.fallbacks import FALLBACKS
from fx_fastcache.families import block_modules, resolve_family
from fx_fastcache.policies import POLICIES
from fx_fastcache.policies.planned import SEARCH_OBJECTIVES
from fx_fastcache.runtime.drift import DAMPING_KEY
from fx_fastcache.runtime.noise_forecast import ENABLED_KEY
from fx_fastcache.trained import NULL_CLASS, load_trained, sample, shifted_sigmas

from . import peers
from .metrics import (
    class_accuracy,
    classifier_features,
    frechet_distance,
    load_digit_classifier,
    psnr,
    real_digit_features,
    ssim,
)

logger = logging.getLogger(__name__)

__all__ = ["Method", "parse_method", "parse_methods", "DEFAULT_METHODS", "DEFAULT_THRESHOLDS", "run_benchmark",
           "block_flops"]

PEERS = ("diffusers_fbc", "cache_dit", "diffusers_taylorseer", "diffusers_magcache")
#: Options a peer spec may carry (``diffusers_taylorseer:order=2:before=3``) and their defaults.
PEER_OPTIONS: dict[str, dict[str, float]] = {
    "diffusers_taylorseer": {"order": 1, "before": 3},
    "diffusers_magcache": {"max_skip": 3, "retention": 0.2},
    # taylorseer 0: DBCache alone, N: with its TaylorSeer calibrator of order N; fn / bn: Fn_compute_blocks /
    # Bn_compute_blocks; warmup: max_warmup_steps; max_skip: max_continuous_cached_steps (0: no cap)
    "cache_dit": {"taylorseer": 0, "fn": 1, "bn": 0, "warmup": 2, "max_skip": 0},
}
#: Peer options that are fractions in [0, 1] (the others are counts: integers >= 0).
FRACTION_OPTIONS = frozenset({"retention"})
#: Policies whose named method implies a fallback (the classic methods).
#: Peers' rules that run inside our framework, with the peer's own fallback (Policy.peer_fallback).
CLASSIC = {name: p.peer_fallback for name, p in POLICIES.items() if p.peer_fallback}


#: Options of a FastCache method spec (``planned/forecast:drift=1:search=1``) and what each takes: the one list
#: :func:`parse_method`'s error and :func:`methods_help` name.
FASTCACHE_OPTIONS: dict[str, tuple[str, str]] = {
    "warmup": ("N", ""),
    "max_skip": ("N", ""),
    "sens": ("1", ""),
    "protect": ("DB", "a PSNR floor, e.g. 34"),
    "drift": ("1", "drift correction"),
    "noise": ("1", "noise forecast"),
    "search": ("1|OBJECTIVE", f"search_plan; OBJECTIVE in {sorted(SEARCH_OBJECTIVES)}"),
    "search_images": ("N", "N >= 2"),
    "fit": ("ITERS", "fit_output_rule with ITERS Adam steps on the search images, the search's objective; e.g. 150"),
    "fit_lr": ("LR", "its learning rate, default 0.01"),
    "fit_holdout": ("N", "choose the fitted rule on N more calibration images, not the fit's"),
}


def _options(quote: str) -> list[str]:
    """``:key=VALUE (note)`` for each of :data:`FASTCACHE_OPTIONS`, the option in ``quote`` marks."""
    return [f"{quote}:{k}={v}{quote}" + (f" ({note})" if note else "") for k, (v, note) in FASTCACHE_OPTIONS.items()]


def methods_help() -> str:
    """Every method form and option :func:`parse_method` takes, in one line (the CLI's ``--methods`` help)."""
    ours = " ".join(_options(""))
    peers = "; ".join(name + "".join(f"[:{k}={'R' if k in FRACTION_OPTIONS else 'N'}]" for k in opts)
                      for name, opts in PEER_OPTIONS.items())
    return ("comma-separated: none, first_block_cache, teacache, diffusers_fbc, POLICY/FALLBACK (e.g. "
            f"step_forecast/forecast) with optional {ours}; the peers {peers} (thresholds: TaylorSeer's cache "
            "interval, MagCache's error budget, cache-dit's residual threshold)")


#: Threshold grids per policy / peer (chosen so that the fraction replaced spans ~30-80 %).
DEFAULT_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "step_forecast": (0.05, 0.08, 0.11, 0.14),
    "chi2": (0.3, 0.6, 1.0, 1.5),
    "first_block_cache": (0.1, 0.2, 0.3, 0.4),
    "teacache": (0.1, 0.2, 0.4, 0.8),
    "diffusers_fbc": (0.1, 0.2, 0.3, 0.4),
    "cache_dit": (0.16, 0.24, 0.32),
    # TaylorSeer has no threshold: the grid is its ``cache_interval``
    "diffusers_taylorseer": (2, 3, 4, 5),
    "diffusers_magcache": (0.03, 0.06, 0.12, 0.24),
    "schedule": (0.0,),
    # the planned policy sweeps its target fraction (``Policy.sweep_field``)
    "planned": (0.45, 0.55, 0.6, 0.65, 0.7),
}

DEFAULT_METHODS = (
    "none",
    "step_forecast/forecast",
    "planned/forecast",
    "step_forecast/residual",
    "step_forecast/residual_linear",
    "step_forecast/linear",
    "chi2/residual_linear",
    "chi2/forecast",
    "first_block_cache",
    "teacache",
    "diffusers_fbc",
    "diffusers_taylorseer",
    "diffusers_magcache",
)


#: Calibration images of a ``:search=1`` method's generations (from the calibration seed on), unless
#: ``:search_images=N`` says otherwise.
SEARCH_SEEDS = 16


@dataclass(frozen=True)
class Method:
    """One method of the sweep.

    ``kind`` is ``"none"``, ``"fastcache"`` (our graph with ``policy``/``fallback``) or a peer
    (``"diffusers_fbc"``, ``"cache_dit"``).
    """

    name: str
    kind: str
    policy: str | None = None
    fallback: str | None = None
    thresholds: tuple[float, ...] = ()
    warmup_steps: int = 2
    max_skip_steps: int = 0
    #: after calibration, weigh the planned steps by measured error growth (``fastcache.measure_sensitivity``)
    sensitivity: bool = False
    #: after calibration, always compute the steps whose skip alone takes one of :data:`PROTECT_SEEDS`
    #: calibration images below this PSNR (``fastcache.protect_steps``); ``None``: off
    protect: float | None = None
    #: ``drift_correction="flow_euler"`` (the benchmark's sampler is flow-matching Euler)
    drift: bool = False
    #: ``noise_forecast="flow_euler"`` (a skipped step forecasts the predicted noise)
    noise: bool = False
    #: after calibration (and protect / sensitivity), choose each fraction's plan on whole generations of
    #: ``search_images`` calibration images (``fastcache.search_plan``) with this objective; ``None``: off
    search: str | None = None
    search_images: int = SEARCH_SEEDS
    #: after the search, ``output_rule="fitted"`` and ``fastcache.fit_output_rule`` with this many Adam steps on
    #: ``search_images`` calibration images and the search's objective (the mean without a search); 0: off
    fit: int = 0
    fit_lr: float = 0.01
    #: the fit's choice (rule or library's rules) made on this many more calibration images after the fit's; 0: on
    #: the fit's own images
    fit_holdout: int = 0
    #: peer options (``PEER_OPTIONS``), as sorted ``(name, value)`` pairs
    options: tuple[tuple[str, float], ...] = ()

    def output_stages(self) -> dict[str, str]:
        """The config fields of the output stages this method turns on (the drift correction, the noise forecast)."""
        return {"drift_correction": "flow_euler" if self.drift else "none",
                "noise_forecast": "flow_euler" if self.noise else "none",
                "output_rule": "fitted" if self.fit else "none"}

    @property
    def needs_calibration(self) -> bool:
        if self.kind != "fastcache":
            return False
        return FALLBACKS[self.fallback].fitted or POLICIES[self.policy].needs_calibration


def parse_method(spec: str, thresholds: Sequence[float] | None = None) -> Method:
    """Parse a method spec.

    Forms: ``none``; ``diffusers_fbc``; ``cache_dit``; ``first_block_cache``; ``teacache``;
    ``POLICY/FALLBACK`` (e.g. ``step_forecast/forecast``); any of the FastCache forms may end
    with ``:warmup=W`` and/or ``:max_skip=M`` (e.g. ``step_forecast/forecast:warmup=3:max_skip=3``),
    ``:sens=1``, ``:protect=DB``, ``:drift=1`` (``drift_correction="flow_euler"``), ``:noise=1``
    (``noise_forecast="flow_euler"``), ``:fit=ITERS`` (``output_rule="fitted"`` and ``fastcache.fit_output_rule``
    on the search images, after the search if any), ``:search=1``
    (``fastcache.search_plan`` for every threshold; ``:search=worst_quarter`` for that objective) and
    ``:search_images=N`` (its calibration images, default 16).
    ``diffusers_taylorseer[:order=N][:before=N]`` (its thresholds are ``cache_interval`` values)
    and ``diffusers_magcache[:max_skip=K][:retention=R]`` (thresholds: MagCache's error budget);
    ``cache_dit[:taylorseer=N][:fn=N][:bn=N][:warmup=N][:max_skip=K]`` (DBCache with cache-dit's TaylorSeer
    calibrator of order N; its Fn / Bn compute blocks, warm-up steps and cap on consecutive cached steps).
    """

    parts = spec.strip().split(":")
    head, opts = parts[0], parts[1:]
    warmup: int | None = None
    max_skip = 0
    sensitivity = False
    protect = None
    drift = False
    noise = False
    search: str | None = None
    search_images = SEARCH_SEEDS
    fit, fit_lr, fit_holdout = 0, None, None
    for o in opts if head not in PEERS else ():
        key, _, val = o.partition("=")
        if key == "sens" and val in ("0", "1"):
            sensitivity = val == "1"
            continue
        if key == "drift" and val in ("0", "1"):
            drift = val == "1"
            continue
        if key == "noise" and val in ("0", "1"):
            noise = val == "1"
            continue
        if key == "search" and val in ("0", "1", *SEARCH_OBJECTIVES):
            search = {"0": None, "1": "mean"}.get(val, val)
            continue
        if key == "fit" and val.isdigit():
            fit = int(val)
            continue
        if key == "fit_lr" and val.replace(".", "", 1).isdigit() and float(val) > 0:
            fit_lr = float(val)
            continue
        if key == "fit_holdout" and val.isdigit() and int(val) >= 1:
            fit_holdout = int(val)
            continue
        if key == "search_images" and val.isdigit() and int(val) >= 2:
            search_images = int(val)
            continue
        if key == "protect" and val.replace(".", "", 1).isdigit() and 0 < float(val) < 100:
            protect = float(val)
            continue
        if key not in ("warmup", "max_skip") or not val.isdigit():
            raise ValueError(f"method {spec!r}: option {o!r} is not understood; use "
                             + ", ".join(_options("'")))
        if key == "warmup":
            warmup = int(val)
        else:
            max_skip = int(val)
    if fit_lr is not None and not fit:
        raise ValueError(f"method {spec!r}: ':fit_lr=LR' sets the learning rate of fit_output_rule, which this method "
                         f"does not run; add ':fit=ITERS'")
    if fit_holdout is not None and not fit:
        raise ValueError(f"method {spec!r}: ':fit_holdout=N' sets the images fit_output_rule chooses on, which this "
                         f"method does not run; add ':fit=ITERS'")
    if search is None and not fit and head not in PEERS and _option_given(opts, "search_images"):
        raise ValueError(f"method {spec!r}: ':search_images=N' sets the images of search_plan, which this method does "
                         f"not run; add ':search=1' or ':search=worst_quarter'")
    thr = tuple(float(t) for t in thresholds) if thresholds else None
    if head == "none":
        if opts:
            raise ValueError(f"method {spec!r}: the uncached baseline takes no options")
        return Method("none", "none")
    if head in PEERS:
        allowed = PEER_OPTIONS.get(head, {})
        vals = dict(allowed)
        for o in opts:
            key, _, val = o.partition("=")
            try:
                num = float(val)
            except ValueError:
                num = None
            if key in allowed and num is not None and not (
                    0 <= num <= 1 if key in FRACTION_OPTIONS else num >= 0 and num.is_integer()):  # no nan, inf
                kind = "a fraction in [0, 1]" if key in FRACTION_OPTIONS else "an integer >= 0"
                raise ValueError(f"method {spec!r}: option {key!r} takes {kind}, got {val!r}")
            if key not in allowed or num is None:
                if not allowed:
                    raise ValueError(f"method {spec!r}: options apply only to FastCache methods and "
                                     f"{', '.join(PEER_OPTIONS)}")
                raise ValueError(f"method {spec!r}: option {o!r} is not understood; {head} takes "
                                 + ", ".join(f"':{k}=N'" for k in allowed))
            vals[key] = num
        given = [f"{k}={vals[k]:g}" for k in allowed if _option_given(opts, k)]
        name = head + (f"({','.join(given)})" if given else "")
        return Method(name, head, thresholds=thr or DEFAULT_THRESHOLDS[head], options=tuple(sorted(vals.items())))
    if head in CLASSIC:
        policy, fallback = head, CLASSIC[head]
        default_warmup = 0  # as the original methods: only the first step is forced
    else:
        policy, _, fallback = head.partition("/")
        default_warmup = 2
        if policy not in POLICIES or fallback not in FALLBACKS:
            raise ValueError(
                f"method {spec!r} is unknown; use none, {', '.join(PEERS)}, {', '.join(CLASSIC)} or POLICY/FALLBACK "
                f"with POLICY in {sorted(POLICIES)} and FALLBACK in {sorted(FALLBACKS)}")
    w = default_warmup if warmup is None else warmup
    name = head if head in CLASSIC else f"fastcache[{policy}/{fallback}]"
    if warmup is not None or max_skip:
        name += f"(w{w},m{max_skip})"
    if sensitivity:
        name += "(sensitivity)"
    if protect is not None:
        name += f"(protect {protect:g} dB)"
    if drift:
        name += "(drift)"
    if noise:
        name += "(noise)"
    if search:
        name += "(searched" + ("" if search == "mean" else f" {search}") + (
            "" if search_images == SEARCH_SEEDS else f", {search_images} images") + ")"
    if fit:
        name += f"(fitted rule {fit}" + ("" if fit_lr is None else f", lr {fit_lr:g}") + (
            "" if fit_holdout is None else f", chosen on {fit_holdout} more") + ")"
    method = Method(name, "fastcache", policy, fallback, thr or DEFAULT_THRESHOLDS.get(policy, (0.1,)), w, max_skip,
                    sensitivity=sensitivity, protect=protect, drift=drift, noise=noise,
                    search=search, search_images=search_images, fit=fit, fit_lr=fit_lr or 0.01,
                    fit_holdout=fit_holdout or 0)
    _check_configs(spec, method)
    return method


def _check_configs(spec: str, m: Method) -> None:
    """Refuse a FastCache method whose configs cannot exist before any image is generated (they failed
    at that method's turn in the sweep, after the uncached baseline and the other methods)."""
    if m.protect is not None and m.policy != "planned":
        raise ValueError(f"method {spec!r}: ':protect' re-plans the steps of a planned method; use "
                         f"planned/{m.fallback}:protect=DB")
    sweep = POLICIES[m.policy].sweep_field
    for value in m.thresholds:
        try:
            FastCacheConfig(policy=m.policy, fallback=m.fallback, warmup_steps=m.warmup_steps,
                            max_skip_steps=m.max_skip_steps, **m.output_stages(), **{sweep: value})
        except ValueError as e:
            raise ValueError(f"method {spec!r} at threshold {value:g}: {e}") from None


def _option_given(opts: Sequence[str], key: str) -> bool:
    return any(o.partition("=")[0] == key for o in opts)


def parse_methods(specs: Sequence[str], thresholds: Sequence[float] | None = None) -> list[Method]:
    out = [parse_method(s, thresholds) for s in specs if s.strip()]
    if not out:
        raise ValueError("no methods given")
    return out


def block_flops(tm, batch: int) -> tuple[float, list[float]]:
    """FLOPs of one model call on ``batch`` rows (``FlopCounterMode``) and of each block."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, tm.in_channels, tm.sample_size, tm.sample_size, dtype=tm.dtype, device=tm.device)
    y = torch.full((batch,), NULL_CLASS, dtype=torch.long, device=tm.device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        tm.model(**tm.call_kwargs(x, torch.tensor(0.5), y))
    counts = fc.get_flop_counts()
    root = type(tm.model).__name__
    names = [name for name, _, _ in block_modules(tm.model, resolve_family(tm.model))]  # Flux: both lists
    per_block = [float(sum(counts.get(f"{root}.{name}", {}).values())) for name in names]
    return float(fc.get_total_flops()), per_block


@dataclass
class _Setup:
    tm: Any
    classes: list[int]
    seeds: list[int]
    t_classes: list[int]
    t_seeds: list[int]
    c_classes: list[int]
    c_seeds: list[int]
    steps: int
    cfg: float
    ref: torch.Tensor
    t_ref: list[float] = field(default_factory=list)
    #: the sampler's noise levels (:func:`~fx_fastcache.trained.shifted_sigmas`)
    sigmas: torch.Tensor | None = None


#: Calibration images of a ``:protect=DB`` method's single-skip runs (from the calibration seed on):
#: more than the 4 of ``calibrate``, since the images it must catch are about one in 16.
PROTECT_SEEDS = 32


def calibration_seeds(s: _Setup, count: int, option: str) -> list[int]:
    """``count`` seeds from the calibration seed on, for ``option``'s generations; never an evaluation seed."""
    seeds = [s.c_seeds[0] + i for i in range(count)]
    overlap = sorted(set(seeds) & set(s.seeds))
    if overlap:
        raise ValueError(f"'{option}' runs {count} calibration seeds from {seeds[0]}, which overlap the "
                         f"evaluation seeds {overlap[:3]}...; choose a calibration seed at least {count} "
                         f"below or above the evaluation seeds")
    return seeds


def protect_seeds(s: _Setup) -> list[int]:
    """The seeds of ``fastcache.protect_steps`` in the benchmark; never an evaluation seed."""
    return calibration_seeds(s, PROTECT_SEEDS, ":protect=")


def _sample(s: _Setup, model, classes, seeds, progress: bool = False) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    img = sample(s.tm, classes, seeds, steps=s.steps, cfg=s.cfg, model=model, progress=progress, sigmas=s.sigmas)
    return img, time.perf_counter() - t0


def _quality(s: _Setup, img: torch.Tensor) -> dict[str, float]:
    p, q = psnr(img, s.ref), ssim(img, s.ref)
    net = load_digit_classifier()
    return {
        "psnr_mean": float(p.mean()), "psnr_worst": float(p.min()),
        "ssim_mean": float(q.mean()), "ssim_worst": float(q.min()),
        "class_accuracy": class_accuracy(img, s.classes, net),
        "frechet": (frechet_distance(classifier_features(img, net), real_digit_features()) if len(img) >= 2
                    else None),
        "worst_index": int(p.argmin()),
    }


def _flops_saved(skipped: Sequence[float], calls: float, total: float, per_block: Sequence[float]) -> float:
    if not calls:
        return 0.0
    return float(sum(k * f for k, f in zip(skipped, per_block)) / (calls * total))


def _batch_kwargs(tm, n_images: int) -> dict[str, Any]:
    """Keyword inputs of one CFG call for ``n_images`` images (batch ``2 n``), for capturing."""
    x = torch.zeros(2 * n_images, tm.in_channels, tm.sample_size, tm.sample_size, dtype=tm.dtype, device=tm.device)
    y = torch.zeros(2 * n_images, dtype=torch.long, device=tm.device)
    return tm.call_kwargs(x, torch.tensor(1.0), y)


class _FastCacheRunner:
    def __init__(self, s: _Setup, m: Method, backend: str) -> None:
        self.fc = fastcache
        self.m = m
        self.opt = fastcache.optimize(s.tm.model, backend=backend, policy=m.policy, fallback=m.fallback,
                                      warmup_steps=m.warmup_steps, max_skip_steps=m.max_skip_steps,
                                      **m.output_stages())
        self.calib_s = 0.0
        self.protected: list[int] | None = None  # the steps protect_steps made always compute
        self.protect_seeds: list[int] | None = None  # its first and last calibration seed
        self.searched: dict[float, list[int]] | None = None  # search_plan's computed steps per fraction
        self.fitted: dict[float, dict] | None = None  # fit_output_rule's scores per fraction
        self.fit_holdout_seeds: list[int] | None = None  # the first and last seed its choice was made on, if held out
        if m.needs_calibration:
            t0 = time.perf_counter()
            with fastcache.calibrate(self.opt):
                _sample(s, self.opt, s.c_classes, s.c_seeds)
            if m.sensitivity:  # one more generation per step, on the calibration seeds
                fastcache.measure_sensitivity(self.opt, lambda: _sample(s, self.opt, s.c_classes, s.c_seeds)[0])
            if m.protect is not None:  # one generation per step on PROTECT_SEEDS calibration seeds
                seeds = protect_seeds(s)
                self.protect_seeds = [seeds[0], seeds[-1]]
                self.protected = fastcache.protect_steps(self.opt, self._generate(s, seeds), floor_db=m.protect,
                                                         data_range=2.0)
            if m.search:  # one generation per plan tried, on m.search_images calibration seeds
                seeds = calibration_seeds(s, m.search_images, ":search=1")
                self.searched = fastcache.search_plan(self.opt, self._generate(s, seeds), fractions=m.thresholds,
                                                      data_range=2.0, objective=m.search)
            if m.fit:  # m.fit + 1 generations with gradients and two through the graph per fraction
                every = calibration_seeds(s, m.search_images + m.fit_holdout, ":fit=")
                seeds, held = every[:m.search_images], every[m.search_images:]
                self.fit_holdout_seeds = [held[0], held[-1]] if held else None
                classes = [i % 10 for i in range(len(seeds))]
                self.fitted = fastcache.fit_output_rule(
                    self.opt, lambda: sample.__wrapped__(s.tm, classes, seeds, steps=s.steps, cfg=s.cfg, model=self.opt,
                                                         sigmas=s.sigmas),
                    fractions=m.thresholds, iters=m.fit, lr=m.fit_lr, data_range=2.0, objective=m.search or "mean",
                    validate=self._generate(s, held) if held else None)
            self.calib_s = time.perf_counter() - t0
        # capture outside every timed run; after calibrating, or a fitted fallback warns it is uncalibrated
        for n in {len(s.classes), len(s.t_classes)} - {0}:
            self.opt.capture(**_batch_kwargs(s.tm, n))

    def _generate(self, s: _Setup, seeds: list[int]):
        """``generate()`` for ``protect_steps`` / ``search_plan``: the images of ``seeds`` (classes 0-9 in turn)."""
        classes = [i % 10 for i in range(len(seeds))]
        return lambda: _sample(s, self.opt, classes, seeds)[0]

    def prepare(self, threshold: float) -> Any:
        self.fc.configure(self.opt, **{POLICIES[self.m.policy].sweep_field: float(threshold)})
        self.fc.reset(self.opt)
        return self.opt

    def damping(self) -> float | None:
        """The drift correction's installed damping (``search_plan`` fits it per fraction), if any."""
        t = self.opt.store.tensors.get(DAMPING_KEY)
        return None if t is None else float(t)

    def noise_on(self) -> bool | None:
        """Whether the noise forecast applies (``search_plan`` chooses per fraction), if the model has one."""
        t = self.opt.store.tensors.get(ENABLED_KEY)
        return None if t is None else bool(t > 0)

    def stats(self) -> tuple[float, list[float], float]:
        st = self.fc.get_cache_statistics(self.opt)
        calls = st["calls"]
        return st["block_approx_ratio"], [b["approximated"] for b in st["per_block"]], calls


class _PeerRunner:
    def __init__(self, s: _Setup, m: Method) -> None:
        self.s, self.m = s, m
        self.run = None
        self.calib_s = 0.0
        self.opts = dict(m.options)
        self.mag_ratios: list[float] | None = None
        if m.kind == "diffusers_magcache":  # its own calibrate=True run, on the calibration seeds
            t0 = time.perf_counter()
            self.mag_ratios = peers.diffusers_mag_ratios(
                s.tm.model, lambda fn: _sample(s, fn, s.c_classes, s.c_seeds), s.steps)
            self.calib_s = time.perf_counter() - t0

    def prepare(self, threshold: float) -> Any:
        k, o = self.m.kind, self.opts
        if k == "diffusers_fbc":
            self.run = peers.diffusers_first_block_cache(self.s.tm.model, threshold)
        elif k == "diffusers_taylorseer":
            self.run = peers.diffusers_taylorseer(self.s.tm.model, threshold, o["order"], o["before"])
        elif k == "diffusers_magcache":
            self.run = peers.diffusers_mag_cache(self.s.tm.model, threshold, self.mag_ratios, self.s.steps,
                                                 int(o["max_skip"]), float(o["retention"]))
        else:
            self.run = peers.cache_dit_dbcache(self.s.tm.model, threshold, self.s.steps, warmup_steps=int(o["warmup"]),
                                               taylorseer_order=int(o["taylorseer"]), fn=int(o["fn"]), bn=int(o["bn"]),
                                               max_skip=int(o["max_skip"]))
        return self.run.model

    def stats(self) -> tuple[float, list[float], float]:
        r = self.run
        return r.replaced_fraction, [float(k) for k in r.per_block_skipped()], float(r.calls[0])


def run_benchmark(
    model: str = "dit-mnist",
    methods: Sequence[str | Method] = DEFAULT_METHODS,
    thresholds: Sequence[float] | None = None,
    n_images: int = 16,
    steps: int = 20,
    cfg: float = 2.0,
    eval_seed: int = 1000,
    calib_images: int = 4,
    calib_seed: int = 0,
    backend: str = "eager",
    timing_images: int = 4,
    timing_repeats: int = 1,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    reference_cache: str | None = None,
    shift: float = 1.0,
) -> dict[str, Any]:
    """Run the sweep and return ``{"setup": ..., "runs": [...]}`` (JSON-serialisable).

    Args:
        model: ``"dit-mnist"``, ``"pixart-mnist"`` or a diffusers model folder.
        methods: method specs (see :func:`parse_method`) or :class:`Method` objects.
        thresholds: one threshold grid for every non-``none`` method (default: per method).
        n_images: evaluation images (classes ``i % 10``, seeds ``eval_seed + i``).
        steps, cfg: sampler settings (Euler steps, classifier-free guidance scale).
        shift: the sampler's schedule shift (:func:`fx_fastcache.trained.shifted_sigmas`; 1 = uniform, 3 =
            SD3's): every generation runs on it, the uncached reference, calibration, ``search_plan``
            and the peers' calibration (MagCache's ratios) included.
        calib_images, calib_seed: calibration generations use seeds ``calib_seed + i``,
            which must not overlap the evaluation seeds.
        backend: ``"eager"`` or ``"inductor"`` for the FastCache graphs.
        timing_images: images of the interleaved timing batch (0 = skip timing).
        timing_repeats: uncached/cached timing pairs per run (the fastest of each is kept).
        on_run: called with each run's record as soon as it is done.
        progress: tqdm bar over the steps of each generation.
        reference_cache: a ``.pt`` file for the uncached evaluation images: loaded when it was
            written for the same model, seeds, classes, steps and cfg, else generated and written
            (sweeps split over several processes then generate the reference once).
    """

    for name, v, lo in (("n_images", n_images, 1), ("steps", steps, 1), ("calib_images", calib_images, 1),
                        ("timing_images", timing_images, 0), ("timing_repeats", timing_repeats, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}={v!r} is invalid: expected an integer >= {lo}")
    sigmas = shifted_sigmas(steps, shift)  # refuses a bad shift
    seeds = [eval_seed + i for i in range(n_images)]
    c_seeds = [calib_seed + i for i in range(calib_images)]
    overlap = sorted(set(seeds) & set(c_seeds))
    if overlap:
        raise ValueError(f"calibration seeds {c_seeds[0]}..{c_seeds[-1]} overlap the evaluation seeds "
                         f"{seeds[0]}..{seeds[-1]} (e.g. {overlap[:3]}); choose calib_seed/eval_seed further apart")
    ms = [m if isinstance(m, Method) else parse_method(m, thresholds) for m in methods]
    tm = load_trained(model)
    classes = [i % 10 for i in range(n_images)]
    t_n = min(timing_images, n_images)
    s = _Setup(tm, classes, seeds, classes[:t_n], seeds[:t_n], [(3 * i + 7) % 10 for i in range(calib_images)],
               c_seeds, steps, cfg, ref=torch.empty(0), sigmas=sigmas)
    total_flops, per_block_flops = block_flops(tm, 2)
    logger.info("bench %s: %d images, %d steps, cfg %.1f, shift %g, %d methods", model, n_images, steps, cfg, shift,
                len(ms))
    key = {"model": str(model), "seeds": seeds, "classes": classes, "steps": steps, "cfg": cfg}
    if shift != 1:  # (a uniform reference cache written before the option keeps its key)
        key["shift"] = float(shift)
    cached = None
    if reference_cache:
        from pathlib import Path

        if Path(reference_cache).is_file():
            cached = torch.load(reference_cache)
            if cached.get("key") != key:
                logger.warning("reference cache %s was written for %s, not %s: regenerating", reference_cache,
                               cached.get("key"), key)
                cached = None
    if cached is not None:
        s.ref, ref_s = cached["images"], cached["generation_s"]
    else:
        s.ref, ref_s = _sample(s, None, classes, seeds, progress)
        if reference_cache:
            torch.save({"key": key, "images": s.ref, "generation_s": ref_s}, reference_cache)
    ref_q = _quality(s, s.ref)
    setup = {
        "model": model, "kind": tm.kind, "n_images": n_images, "steps": steps, "cfg": cfg, "shift": float(shift),
        "eval_seeds": [seeds[0], seeds[-1]], "calib_seeds": [c_seeds[0], c_seeds[-1]], "backend": backend,
        "timing_images": t_n, "timing_repeats": timing_repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "flops_per_call_2rows": total_flops, "flops_per_block_2rows": per_block_flops,
        "blocks": len(per_block_flops), "uncached_generation_s": ref_s,
        "uncached_class_accuracy": ref_q["class_accuracy"], "uncached_frechet": ref_q["frechet"],
    }
    runs: list[dict[str, Any]] = []
    for m in ms:
        if m.kind == "none":
            rec = {"method": "none", "kind": "none", "threshold": None, "replaced_fraction": 0.0,
                   "flops_saved": 0.0, **ref_q, "generation_s": ref_s}
            if t_n:
                _, t_u = _sample(s, None, s.t_classes, s.t_seeds)
                rec.update(time_per_image_s=t_u / t_n, time_per_image_uncached_s=t_u / t_n, speedup=1.0,
                           ideal_speedup=1.0, speedup_vs_ideal=1.0)
            runs.append(rec)
            if on_run:
                on_run(rec)
            continue
        runner = _FastCacheRunner(s, m, backend) if m.kind == "fastcache" else _PeerRunner(s, m)
        for thr in m.thresholds:
            fn = runner.prepare(thr)
            try:
                img, gen_s = _sample(s, fn, classes, seeds, progress)
            except Exception as e:  # a peer failing with its own code on this model is a result, not our bug
                if m.kind == "fastcache":
                    raise
                why = f"{type(e).__name__}: {e}"
                logger.warning("bench %s: peer %s (threshold %g) fails on this model: %s", model, m.name, thr, why)
                setup.setdefault("peer_failures", []).append({"method": m.name, "threshold": float(thr),
                                                              "error": why})
                break
            frac, skipped, calls = runner.stats()
            rec = {"method": m.name, "kind": m.kind, "policy": m.policy, "fallback": m.fallback,
                   "threshold": float(thr), "warmup_steps": m.warmup_steps if m.kind == "fastcache" else None,
                   "max_skip_steps": m.max_skip_steps if m.kind == "fastcache" else None,
                   "sensitivity": m.sensitivity,
                   "protect_db": m.protect,
                   "protect_seeds": getattr(runner, "protect_seeds", None),
                   "protected_steps": getattr(runner, "protected", None),
                   "drift_correction": m.drift,
                   "noise_forecast": m.noise,
                   "noise_forecast_on": runner.noise_on() if m.kind == "fastcache" else None,
                   "drift_damping": runner.damping() if m.kind == "fastcache" else None,
                   "searched_plan": (runner.searched or {}).get(float(thr)) if m.kind == "fastcache" else None,
                   "search_objective": m.search, "search_images": m.search_images if m.search or m.fit else None,
                   "output_rule_fit": m.fit or None, "output_rule_lr": m.fit_lr if m.fit else None,
                   "output_rule_holdout_seeds": getattr(runner, "fit_holdout_seeds", None),
                   "output_rule": (runner.fitted or {}).get(float(thr)) if m.kind == "fastcache" else None,
                   "replaced_fraction": frac,
                   "flops_saved": _flops_saved(skipped, calls, total_flops, per_block_flops),
                   "per_block_replaced": [k / calls if calls else 0.0 for k in skipped],
                   "generation_s": gen_s, "calibration_s": runner.calib_s, **_quality(s, img)}
            if m.kind != "fastcache":  # peers: bytes of their hooks' cached tensors (max over the generation)
                rec.update(options=dict(m.options), state_bytes=runner.run.state_bytes, state_batch_rows=2 * len(classes))
                if m.kind == "diffusers_magcache":
                    rec["mag_ratios"] = runner.mag_ratios
            if t_n:
                t_u, t_c, t_frac, t_saved = [], [], 0.0, 0.0
                for _ in range(timing_repeats):
                    t_u.append(_sample(s, None, s.t_classes, s.t_seeds)[1])
                    fn = runner.prepare(thr)
                    t_c.append(_sample(s, fn, s.t_classes, s.t_seeds)[1])
                    t_frac, sk, calls = runner.stats()
                    t_saved = _flops_saved(sk, calls, total_flops, per_block_flops)
                tu, tc = min(t_u) / t_n, min(t_c) / t_n
                ideal = 1.0 / max(1e-9, 1.0 - t_saved)
                rec.update(time_per_image_s=tc, time_per_image_uncached_s=tu, speedup=tu / tc,
                           timing_replaced_fraction=t_frac, timing_flops_saved=t_saved, ideal_speedup=ideal,
                           speedup_vs_ideal=(tu / tc) / ideal)
            runs.append(rec)
            logger.info("%s thr=%.3g: %.0f%% replaced, PSNR %.1f (%.1f)", m.name, thr, 100 * frac,
                        rec["psnr_mean"], rec["psnr_worst"])
            if on_run:
                on_run(rec)
    return {"setup": setup, "runs": runs}

