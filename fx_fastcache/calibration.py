"""Calibration: record block inputs/outputs during full-compute runs and fit the fallbacks.

Inside ``with fastcache.calibrate(model):`` every block computes in full and the eager graph
runs with a recorder attached to each guard.  The recorder never keeps whole runs in memory:
per block and stream it holds the last ``calibration_lags`` steps and accumulates the normal
equations (XᵀX, XᵀY in float64) of the fits, so memory is bounded by the model size.

Fits (closed form, ``torch.linalg.solve`` with ridge λ·mean(diag XᵀX)):

* ``residual_linear``: ΔR ≈ Δx Aᵀ + b over pairs of steps 1..lags apart (Δ = now − then),
  i.e. how a block's residual moves when its input moves;
* ``linear`` (paper's form): y ≈ x Wᵀ + b over all steps;
* ``chi2`` policy: per block, the typical step-to-step relative change of the probe (scale
  normalised to mean 1) and the effective χ² degrees of freedom ν = 2E[δ²]²/Var[δ²];
* ``teacache`` policy: a degree-4 polynomial from block 0's relative input change to the
  relative change of the last block's output.

The fitted tensors live in the model's :class:`CalibrationStore` and are saved with
safetensors together with a fingerprint of the model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import defaultdict, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .fallbacks import FALLBACKS

logger = logging.getLogger(__name__)

FORMAT = "fx-fastcache/calibration/1"
MAX_ROWS = 4096  # token rows per step used in the fits


class NormalEquations:
    def __init__(self, d_in: int, d_out: int) -> None:
        self.xtx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
        self.xty = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        self.xtx += x.T @ x
        self.xty += x.T @ y.double()
        self.rows += x.shape[0]

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.xtx.shape[0] - 1
        lam = ridge * float(self.xtx.diagonal()[:d].mean().clamp_min(1e-12))
        reg = torch.eye(d + 1, dtype=torch.float64) * lam
        reg[d, d] = 0.0
        theta = torch.linalg.solve(self.xtx + reg, self.xty)
        return theta[:d].T.contiguous(), theta[d].contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1, t.shape[-1]).to("cpu", torch.float32)
    stride = max(1, flat.shape[0] // MAX_ROWS)
    return flat[::stride]


class Recorder:
    """Called by every guard after its block ran (eager graph, calibration only)."""

    def __init__(self, fallback: str, lags: int) -> None:
        self.fallback = fallback
        self.lags = lags
        self.history: dict[tuple[str, int], deque] = defaultdict(lambda: deque(maxlen=lags))
        self.fits: dict[tuple[str, str], NormalEquations] = {}
        self.t_last: dict[str, float] = {}
        self.stats: dict[str, list[float]] = defaultdict(list)
        self.tea_in: list[float] = []
        self.tea_out: list[float] = []
        self._tea_prev_out: torch.Tensor | None = None
        self.steps = 0
        #: step_forecast: per calibration generation, (timesteps, block 0's probe per step)
        self.step_probes: list[tuple[list[float], list[torch.Tensor]]] = []

    def _eq(self, block: str, stream: str, d_in: int, d_out: int) -> NormalEquations:
        key = (block, stream)
        if key not in self.fits:
            self.fits[key] = NormalEquations(d_in, d_out)
        return self.fits[key]

    def record(self, guard, t: torch.Tensor, ins, outs, is_last: bool) -> None:
        block = guard.block_name
        t_now = float(t)
        new_gen = block not in self.t_last or t_now > self.t_last[block]
        self.t_last[block] = t_now
        streams = guard.fallback.streams
        if guard.index == 0:
            self.steps += 1
        for k, (x, y) in enumerate(zip(ins, outs)):
            hist = self.history[(block, k)]
            if new_gen:
                hist.clear()
            xr, yr = _rows(x), _rows(y)
            if self.fallback == "residual_linear":
                eq = self._eq(block, streams[k].name, xr.shape[1], yr.shape[1])
                for xp, yp in hist:
                    eq.add(xr - xp, (yr - xr) - (yp - xp))
            elif self.fallback == "linear":
                self._eq(block, streams[k].name, xr.shape[1], yr.shape[1]).add(xr, yr)
            hist.append((xr, yr))
        decider = guard.decider
        if decider is not None and hasattr(decider, "last_stat") and not new_gen:
            self.stats[block].extend(decider.last_stat.detach().float().cpu().tolist())
        if is_last:
            y = outs[-1].detach().float()
            if self._tea_prev_out is not None and not new_gen and self._tea_prev_out.shape == y.shape:
                rel = ((y - self._tea_prev_out).abs().mean() / self._tea_prev_out.abs().mean().clamp_min(1e-12))
                self.tea_out.append(float(rel))
            self._tea_prev_out = y

    def record_step_stat(self, value: float) -> None:
        self.tea_in.append(value)


def fit(opt, rec: Recorder) -> dict[str, float]:
    """Solve the accumulated fits into ``opt.store``; returns a summary for logging."""
    cfg = opt.fastcache_config
    store = opt.store
    summary: dict[str, float] = {}
    for (block, stream), eq in rec.fits.items():
        if eq.rows == 0:
            continue
        a, b = eq.solve(cfg.ridge)
        name = "A" if cfg.fallback == "residual_linear" else "W"
        key = f"{block}.{stream}.{cfg.fallback}"
        for suffix, val in ((name, a), ("b", b)):
            t = store.tensors.get(f"{key}.{suffix}")
            if t is None:
                store.tensors[f"{key}.{suffix}"] = val.to(opt.dtype)
            else:
                t.copy_(val.to(t.dtype))
        summary[f"{key}.rows"] = eq.rows
    if rec.stats:
        typical = {b: float(np.median(v)) for b, v in rec.stats.items() if v}
        mean_typical = float(np.mean(list(typical.values()))) if typical else 1.0
        for block, values in rec.stats.items():
            if not values:
                continue
            d2 = np.square(np.asarray(values, dtype=np.float64))
            var = float(d2.var())
            nu = 2.0 * float(d2.mean()) ** 2 / var if var > 0 else 1e6
            nu = float(np.clip(nu, 1.0, 1e6))
            for suffix, val in (("scale", typical[block] / max(mean_typical, 1e-12)), ("dof", nu)):
                t = store.tensors.get(f"{block}.chi2.{suffix}")
                if t is not None:
                    t.fill_(val)
                else:
                    store.tensors[f"{block}.chi2.{suffix}"] = torch.tensor(val)
    if rec.step_probes and max(len(us) for _, us in rec.step_probes) < 3:
        logger.warning("fx-fastcache: step_forecast scale not fitted: the calibration generations had fewer than 3 "
                       "steps (%d); calibrate with full sampling loops", max(len(us) for _, us in rec.step_probes))
    elif rec.step_probes:  # step_forecast: per-model scale of its statistic (see policies/step_forecast.py)
        from .policies.step_forecast import SCALE_KEY, fit_scale

        scale, frac = fit_scale(rec.step_probes, cfg.warmup_steps, cfg.max_skip_steps)
        t = store.tensors.get(SCALE_KEY)
        if t is not None:
            t.fill_(scale)
        else:
            store.tensors[SCALE_KEY] = torch.tensor(scale)
        summary["step_forecast.scale"] = scale
        logger.info("fx-fastcache: step_forecast scale %.3f (calibration generations replace %.0f%% at the default "
                    "threshold)", scale, 100 * frac)
    if len(rec.tea_in) >= 6 and len(rec.tea_out) >= 6:
        n = min(len(rec.tea_in), len(rec.tea_out))
        coeffs = np.polyfit(np.asarray(rec.tea_in[:n]), np.asarray(rec.tea_out[:n]), 4)
        t = store.tensors.get("teacache.coeffs")
        val = torch.tensor(coeffs, dtype=torch.float32)
        if t is not None:
            t.copy_(val)
        else:
            store.tensors["teacache.coeffs"] = val
    store.calibrated = True
    return summary


@contextlib.contextmanager
def calibrate(opt) -> Iterator[None]:
    """Full compute inside; records block I/O; fits fallback and policy parameters on exit."""
    from .module import FastCacheModule

    if not isinstance(opt, FastCacheModule):
        raise TypeError(f"calibrate() expects the module returned by fastcache.optimize(), got {type(opt).__name__}")
    rec = Recorder(opt.fastcache_config.fallback, opt.fastcache_config.calibration_lags)
    opt.reset()
    opt.set_force_compute(True)
    opt.set_recorder(_StepStatHook(rec, opt))
    ok = False
    try:
        yield
        ok = True
    finally:
        opt.set_recorder(None)
        opt.set_force_compute(False)
        opt.reset()
    if ok:
        if rec.steps == 0:
            raise RuntimeError("calibrate(): the model was not called inside the `with` block; run a few sampling loops")
        summary = fit(opt, rec)
        opt.store.meta["fingerprint"] = model_fingerprint(opt.model)
        opt.refresh_deciders()
        logger.info("fx-fastcache: calibrated on %d steps (%d fits)", rec.steps, len(summary))


class _StepStatHook:
    """Forwards guard records to the recorder and taps the step decider's statistic."""

    def __init__(self, rec: Recorder, opt) -> None:
        self.rec = rec
        self.opt = opt

    def record(self, guard, t, ins, outs) -> None:
        entry = next((e for e in self.opt.entries() if any(g is guard for g in e.guards)), None)
        is_last = entry is not None and guard is entry.guards[-1]
        if entry is not None:
            if guard.index == 0 and entry.step_decider is not None and hasattr(entry.step_decider, "last_stat"):
                new_gen = guard.block_name not in self.rec.t_last or float(t) > self.rec.t_last[guard.block_name]
                if not new_gen:
                    self.rec.record_step_stat(float(entry.step_decider.last_stat.max()))
                u_c = getattr(entry.step_decider, "u_c", None)  # step_forecast: its probe, for the scale fit
                if u_c is not None and hasattr(entry.step_decider, "scale"):
                    if new_gen or not self.rec.step_probes:
                        self.rec.step_probes.append(([], []))
                    u = u_c.detach().float().cpu()
                    stride = max(1, u[0].numel() // 262144)  # at most ~256k values per sample
                    self.rec.step_probes[-1][0].append(float(t))
                    self.rec.step_probes[-1][1].append(u.flatten(1)[:, ::stride].clone())
        self.rec.record(guard, t, ins, outs, is_last)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's class, parameter names/shapes/dtypes and parameter sums."""
    h = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            if p.is_floating_point() and p.numel():
                h.update(f"{float(p.double().sum()):.6e}:{float(p.double().abs().sum()):.6e}".encode())
    return h.hexdigest()[:32]


def save_calibration(opt, path: str | Path) -> None:
    from safetensors.torch import save_file

    if not opt.store.calibrated:
        raise RuntimeError("nothing to save: run `with fastcache.calibrate(model): ...` first")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in opt.store.tensors.items()}
    meta = {"format": FORMAT, "fingerprint": model_fingerprint(opt.model), "config": opt.fastcache_config.to_json(),
            "model_class": type(opt.model).__name__}
    save_file(tensors, str(path), metadata=meta)


def load_calibration(opt, path: str | Path) -> None:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not an fx-fastcache calibration file (format {meta.get('format')!r})")
        fp = model_fingerprint(opt.model)
        if meta.get("fingerprint") != fp:
            raise ValueError(f"calibration file {str(path)!r} was fitted on another model ({meta.get('model_class')}, "
                             f"fingerprint {meta.get('fingerprint')}); this model ({type(opt.model).__name__}) has "
                             f"fingerprint {fp}. Calibrate this model instead.")
        saved_cfg = json.loads(meta.get("config", "{}"))
        if saved_cfg.get("fallback") not in (None, opt.fastcache_config.fallback) and FALLBACKS[opt.fastcache_config.fallback].fitted:
            logger.warning("calibration file was fitted for fallback %r; this model uses %r",
                           saved_cfg.get("fallback"), opt.fastcache_config.fallback)
        for key in f.keys():
            val = f.get_tensor(key)
            cur = opt.store.tensors.get(key)
            if cur is None:
                opt.store.tensors[key] = val.to(opt.device, opt.dtype if val.is_floating_point() else val.dtype)
            else:
                if cur.shape != val.shape:
                    raise ValueError(f"calibration tensor {key!r} has shape {tuple(val.shape)}, model needs "
                                     f"{tuple(cur.shape)}")
                cur.copy_(val.to(cur.device, cur.dtype))
    opt.store.calibrated = True
    opt.store.meta["fingerprint"] = fp
    opt.refresh_deciders()
