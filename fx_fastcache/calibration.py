"""Calibration: record block inputs/outputs during full-compute runs; the fits belong to their owners.

Inside ``with fastcache.calibrate(model):`` every block computes in full and the eager graph
runs with a :class:`Recorder` attached to each guard.  The recorder is generic: for every guard
call it builds one :class:`Observation` (block, timestep, the graph's own new-generation flag,
stream inputs/outputs, the step decider's statistic) and hands it to the *calibrators* of the
configured fallback and policy.  Each fallback or policy that fits something owns a
:class:`Calibrator` (``Fallback.calibrator(config)`` / ``Policy.calibrator(config)``), its
store keys and its closed-form fit, in its own file; nothing here knows a policy or fallback
by name.  Calibrators keep bounded memory (normal equations, short histories), never whole runs.

The fitted tensors live in the model's :class:`~fx_fastcache.runtime.store.CalibrationStore` and
are saved with safetensors together with a fingerprint of the model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .families import compute_dtype
from .runtime.distributed import all_reduce_sum
from .runtime.store import CalibrationStore

logger = logging.getLogger(__name__)

__all__ = ["Calibrator", "Observation", "Recorder", "NormalEquations", "StreamFits", "store_put", "token_rows",
           "model_fingerprint",
           "write_calibration_file", "read_calibration_file", "FORMAT"]

FORMAT = "fx-fastcache/calibration/1"
MAX_ROWS = 4096  # token rows per step used in the fits


@dataclass
class Observation:
    """One guard call during calibration (every block computes).

    ``new_gen``: this call started a new generation (the clock's flag, so the rule is the graph's);
    ``step_stat``: the step decider's statistic of this step (block 0 of a continuing generation
    only, else ``None``); ``is_last``: the last guarded block of the graph.
    """

    guard: Any  # BlockGuard
    step_decider: Any  # the graph's step decider (None for per-block policies)
    t: float
    new_gen: bool
    ins: tuple
    outs: tuple
    is_last: bool
    step_stat: float | None

    @property
    def block(self) -> str:
        return self.guard.block_name


class Calibrator:
    """What one fallback or policy learns from calibration runs (one instance per calibration).

    Under context parallelism every rank sees its own tokens: the :class:`Recorder` sets ``group``
    (and the ``device`` collectives run on), and a calibrator sums what it accumulates over it so
    that every rank fits the same tensors.
    """

    group: Any = None
    device: torch.device = torch.device("cpu")

    def observe(self, obs: Observation) -> None:
        raise NotImplementedError

    def fit(self, store: CalibrationStore, dtype: torch.dtype, config: Any) -> dict[str, float]:
        """Write the fitted tensors into ``store`` (in place where they exist); returns a summary."""
        raise NotImplementedError


def store_put(store: CalibrationStore, key: str, value: torch.Tensor) -> None:
    """Set ``store[key]``: in place if present (graphs hold the same tensor as a buffer), else new."""
    cur = store.tensors.get(key)
    if cur is None:
        store.tensors[key] = value
    else:
        cur.copy_(value.to(cur.device, cur.dtype))


class NormalEquations:
    """``XᵀX`` and ``XᵀY`` (float64, with a bias column) of a ridge least-squares fit."""

    def __init__(self, d_in: int, d_out: int) -> None:
        self.xtx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
        self.xty = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        self.xtx += x.T @ x
        self.xty += x.T @ y.double()
        self.rows += x.shape[0]

    def sum_over(self, group: Any, device: torch.device) -> None:
        """Context parallelism: sum ``XᵀX``, ``XᵀY`` and the row count over the ranks (the fit of all tokens)."""
        flat = torch.cat([self.xtx.flatten(), self.xty.flatten(), torch.tensor([float(self.rows)], dtype=torch.float64)])
        flat = all_reduce_sum(flat.to(device), group).cpu()  # NCCL reduces device tensors only
        n1, n2 = self.xtx.numel(), self.xty.numel()
        self.xtx = flat[:n1].reshape(self.xtx.shape)
        self.xty = flat[n1:n1 + n2].reshape(self.xty.shape)
        self.rows = int(flat[-1])

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, b)`` with ``y ≈ x Wᵀ + b``, ridge ``λ = ridge · mean(diag XᵀX)`` (bias unregularised)."""
        d = self.xtx.shape[0] - 1
        lam = ridge * float(self.xtx.diagonal()[:d].mean().clamp_min(1e-12))
        reg = torch.eye(d + 1, dtype=torch.float64) * lam
        reg[d, d] = 0.0
        theta = torch.linalg.solve(self.xtx + reg, self.xty)
        return theta[:d].T.contiguous(), theta[d].contiguous()


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """At most ``MAX_ROWS`` evenly strided token rows of ``t`` as float32 on the CPU."""
    flat = t.detach().reshape(-1, t.shape[-1]).to("cpu", torch.float32)
    stride = max(1, flat.shape[0] // MAX_ROWS)
    return flat[::stride]


class StreamFits(Calibrator):
    """Per-block, per-stream ridge fits on token rows: the base of the fitted fallbacks' calibrators.

    A subclass says which ``(x, y)`` row pairs a step contributes (:meth:`samples`, given the
    block's last ``lags`` steps of this generation) and under which store keys the solution
    ``(W, b)`` goes (:meth:`keys`).
    """

    def __init__(self, lags: int) -> None:
        self.lags = lags
        self.history: dict[tuple[str, int], deque] = defaultdict(lambda: deque(maxlen=self.lags))
        self.fits: dict[tuple[str, str], NormalEquations] = {}

    def samples(self, xr: torch.Tensor, yr: torch.Tensor, history: deque) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def keys(self, block: str, stream: str) -> tuple[str, str]:
        raise NotImplementedError

    def observe(self, obs: Observation) -> None:
        streams = obs.guard.fallback.streams
        for k, (x, y) in enumerate(zip(obs.ins, obs.outs)):
            hist = self.history[(obs.block, k)]
            if obs.new_gen:
                hist.clear()
            xr, yr = token_rows(x), token_rows(y)
            for xs, ys in self.samples(xr, yr, hist):
                key = (obs.block, streams[k].name)
                if key not in self.fits:
                    self.fits[key] = NormalEquations(xs.shape[1], ys.shape[1])
                self.fits[key].add(xs, ys)
            hist.append((xr, yr))

    def fit(self, store: CalibrationStore, dtype: torch.dtype, config: Any) -> dict[str, float]:
        if self.group is not None:
            for key in sorted(self.fits):  # the same order on every rank
                self.fits[key].sum_over(self.group, self.device)
        summary: dict[str, float] = {}
        for (block, stream), eq in self.fits.items():
            if eq.rows == 0:
                continue
            w_key, b_key = self.keys(block, stream)
            w, b = eq.solve(config.ridge)
            store_put(store, w_key, w.to(dtype))
            store_put(store, b_key, b.to(dtype))
            summary[f"{w_key}.rows"] = eq.rows
        return summary


class Recorder:
    """Called by every guard after its block ran (eager graph, calibration only).

    ``entries`` returns the captured graphs (to find a guard's graph: its last block and its step
    decider); ``calibrators`` receive every observation.
    """

    def __init__(self, calibrators: list[Calibrator], entries: Any, group: Any = None,
                 device: torch.device | None = None) -> None:
        self.calibrators = calibrators
        self.entries = entries
        self.steps = 0
        for c in calibrators:
            c.group = group
            c.device = device if device is not None else torch.device("cpu")

    def record(self, guard, new_gen, t, ins, outs) -> None:
        entry = next((e for e in self.entries() if any(g is guard for g in e.guards)), None)
        is_last = entry is not None and guard is entry.guards[-1]
        new_gen = bool(new_gen)
        stat = None
        if guard.index == 0:
            self.steps += 1
            decider = entry.step_decider if entry is not None else None
            if not new_gen and decider is not None and hasattr(decider, "last_stat"):
                stat = float(decider.last_stat.max())
        obs = Observation(guard, entry.step_decider if entry is not None else None, float(t), new_gen, tuple(ins),
                          tuple(outs), is_last, stat)
        for c in self.calibrators:
            c.observe(obs)

    def fit(self, store: CalibrationStore, dtype: torch.dtype, config: Any) -> dict[str, float]:
        summary: dict[str, float] = {}
        for c in self.calibrators:
            summary.update(c.fit(store, dtype, config))
        store.calibrated = True
        return summary


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """A tensor subclass's plain tensors (torchao's quantized weights: int8 data and scales), recursively."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__") or \
            type(t).__name__ == "DTensor":  # (a DTensor sums globally; its local shard differs per rank)
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for n in names for inner in _inner_tensors(getattr(t, n))]


def model_fingerprint(model: torch.nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """A hash of the model's class, parameter names/shapes/dtypes and parameter sums (a quantized
    weight's, a tensor subclass, through its plain tensors: summing it raised NotImplementedError).

    ``as_dtype``: the fingerprint of the model cast to that dtype (``model.to(as_dtype)`` casts every
    floating tensor; a cast rounds each weight the same way every time), without casting it."""
    h = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            cast = as_dtype is not None and p.is_floating_point() and type(p) in (torch.Tensor, torch.nn.Parameter)
            h.update(f"{name}:{tuple(p.shape)}:{as_dtype if cast else p.dtype}".encode())
            inner = [p.to(as_dtype)] if cast else _inner_tensors(p)
            for q in inner:
                if (q.is_floating_point() or q is not p) and q.numel() and q.dtype != torch.bool:
                    h.update(f"{float(q.double().sum()):.6e}:{float(q.double().abs().sum()):.6e}".encode())
    return h.hexdigest()[:32]


def write_calibration_file(store: CalibrationStore, path: str | Path, model: torch.nn.Module, config: Any) -> None:
    if not store.calibrated:
        raise RuntimeError("nothing to save: run `with fastcache.calibrate(model): ...` first")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in store.tensors.items()}
    meta = {"format": FORMAT, "fingerprint": model_fingerprint(model), "config": config.to_json(),
            "model_class": type(model).__name__, "dtype": str(compute_dtype(model))}
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"calibration file {str(path)!r} is a folder; give a file path, e.g. "
                                f"{str(path / 'calibration.safetensors')!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"calibration file {str(path)!r}: its folder {str(path.parent)!r} does not exist; "
                                f"create it first")
    try:
        save_file(tensors, str(path), metadata=meta)
    except (OSError, SafetensorError) as e:  # safetensors' errors name a temporary file, not this one
        raise OSError(f"could not write calibration file {str(path)!r}: {e}") from e


def read_calibration_file(path: str | Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(saved config dict, tensors)`` of a calibration file fitted on ``model``; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{str(path)!r} is not a readable safetensors calibration file ({e}); write it with "
                         f"fastcache.save_calibration") from None
    with f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not an fx-fastcache calibration file (format {meta.get('format')!r})")
        fp = model_fingerprint(model)
        if meta.get("fingerprint") != fp:
            saved_dtype, dtype = meta.get("dtype"), str(compute_dtype(model))
            if saved_dtype not in (None, dtype):  # the fingerprint holds the dtype
                raise ValueError(f"calibration file {str(path)!r} was fitted on a {meta.get('model_class')} in "
                                 f"{saved_dtype}; this model is in {dtype}, so its fingerprint differs. Load the file "
                                 f"before casting (load_calibration on the {saved_dtype} model, then "
                                 f"opt.to({dtype})), or calibrate in {dtype}")
            raise ValueError(f"calibration file {str(path)!r} was fitted on another model ({meta.get('model_class')}, "
                             f"fingerprint {meta.get('fingerprint')}); this model ({type(model).__name__}) has "
                             f"fingerprint {fp}. Calibrate this model instead.")
        try:
            saved_cfg = json.loads(meta.get("config", "{}"))
        except json.JSONDecodeError:
            raise ValueError(f"calibration file {str(path)!r} has a corrupt config entry in its metadata") from None
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return saved_cfg, tensors
