"""Precomputed skip schedules: record which blocks took the fallback at which step, and replay it.

Why: the statistical policies decide inside the graph from tensor values, which is what makes
them adaptive but also what ONNX/TensorRT cannot carry (no mutable state).  A schedule is the
decisions of calibration runs frozen into a ``steps × blocks`` boolean table (True = the block
is approximated at that step).  Replaying it (``policy="schedule"``) makes runs deterministic
and lets the exported graph take the current step's row as an input.

Recording reads each guard's ``skipped`` counter after every call of the optimized model (a
host read per call: fine while recording, never done in the hot path).  Several recorded
generations are merged by majority vote.  Step 0 always computes every block (the fallbacks
have nothing cached yet), and a replay forces ``warmup_steps=0`` and ``max_skip_steps=0`` so
that the table alone decides.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

FORMAT = "fx-fastcache/schedule/1"


@dataclass
class Schedule:
    """A ``steps × blocks`` skip table with what it was recorded on.

    Attributes:
        table: ``table[step][block]`` True = approximate that block at that step.
        blocks: block names (``transformer_blocks.3``) in execution order.
        fingerprint: :func:`fx_fastcache.calibration.model_fingerprint` of the model.
        config: the :class:`FastCacheConfig` fields the schedule was recorded with.
        model: the model name it was recorded on (informative).
        meta: free-form information (runs, sampler, steps ...).
    """

    table: list[list[bool]]
    blocks: list[str]
    fingerprint: str
    config: dict[str, Any]
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.table = [[bool(v) for v in row] for row in self.table]
        if not self.table:
            raise ValueError("schedule table is empty: record at least one step")
        for i, row in enumerate(self.table):
            if len(row) != len(self.blocks):
                raise ValueError(f"schedule row {i} has {len(row)} entries but there are {len(self.blocks)} blocks")
        skipped0 = [b for b, v in zip(self.blocks, self.table[0]) if v]
        if skipped0:
            raise ValueError(f"schedule skips {skipped0} at step 0, before they ever computed (nothing cached to "
                             f"fall back on); step 0 must compute every block")

    @property
    def steps(self) -> int:
        return len(self.table)

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.table, dtype=torch.bool)

    def row(self, step: int) -> torch.Tensor:
        """The skip mask of ``step``; all False (compute everything) past the table's end."""
        if 0 <= step < self.steps:
            return torch.tensor(self.table[step], dtype=torch.bool)
        return torch.zeros(len(self.blocks), dtype=torch.bool)

    @property
    def skip_ratio(self) -> float:
        n = self.steps * len(self.blocks)
        return sum(map(sum, self.table)) / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint, "steps": self.steps,
                "blocks": self.blocks, "config": self.config, "table": self.table, "meta": self.meta}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "schedule") -> "Schedule":
        if d.get("format") != FORMAT:
            raise ValueError(f"{source} is not an fx-fastcache schedule (format {d.get('format')!r}, "
                             f"expected {FORMAT!r}); write one with `fx-fastcache schedule`")
        missing = [k for k in ("table", "blocks", "fingerprint", "config", "steps") if k not in d]
        if missing:
            raise ValueError(f"{source} lacks the field(s) {missing}")
        s = cls(table=d["table"], blocks=list(d["blocks"]), fingerprint=str(d["fingerprint"]), config=dict(d["config"]),
                model=str(d.get("model", "")), meta=dict(d.get("meta", {})))
        if s.steps != int(d["steps"]):
            raise ValueError(f"{source}: 'steps' is {d['steps']} but the table has {s.steps} rows")
        return s

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"schedule file {str(p)!r} does not exist; record one with "
                                    f"`fx-fastcache schedule --model NAME --out {p}`")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"schedule file {str(p)!r} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=f"schedule file {str(p)!r}")


def _block_names(opt) -> list[str]:
    from fx_fastcache.families import block_modules

    return [name for name, _, _ in block_modules(opt.model, opt.spec)]


def check_compatible(schedule: Schedule, model: nn.Module, block_names: list[str]) -> None:
    """Raise ``ValueError`` if ``schedule`` was recorded on another model or block layout."""
    from fx_fastcache.calibration import model_fingerprint

    if schedule.blocks != block_names:
        raise ValueError(f"schedule has blocks {schedule.blocks[:3]}... ({len(schedule.blocks)}) but "
                         f"{type(model).__name__} has {block_names[:3]}... ({len(block_names)}); "
                         f"record a schedule for this model")
    fp = model_fingerprint(model)
    if schedule.fingerprint != fp:
        raise ValueError(f"schedule was recorded on another model (fingerprint {schedule.fingerprint}, "
                         f"model {schedule.model!r}); this {type(model).__name__} has fingerprint {fp}. "
                         f"Record a schedule for this model with `fx-fastcache schedule`")


def replay_config(schedule: Schedule):
    """The config a replay uses: the recorded one with ``policy="schedule"`` and no warm-up or skip cap."""
    from fx_fastcache.config import FastCacheConfig

    return FastCacheConfig.from_dict(schedule.config).replace(policy="schedule", warmup_steps=0, max_skip_steps=0)


def optimize_with_schedule(model: nn.Module, schedule: Schedule, backend: str = "eager", **overrides: Any):
    """``optimize(model)`` whose decisions come from ``schedule`` (checked against the model)."""
    import fx_fastcache as fastcache
    from fx_fastcache.families import block_modules, resolve_family

    spec = resolve_family(model)
    check_compatible(schedule, model, [n for n, _, _ in block_modules(model, spec)])
    opt = fastcache.optimize(model, backend=backend, config=replay_config(schedule).replace(**overrides))
    fastcache.set_schedule(opt, schedule.tensor())
    return opt


def apply_schedule(opt, schedule: Schedule) -> None:
    """Install ``schedule`` on an optimized model (switching it to ``policy="schedule"``)."""
    import fx_fastcache as fastcache

    check_compatible(schedule, opt.model, _block_names(opt))
    cfg = replay_config(schedule)
    changes = {k: v for k, v in cfg.to_dict().items() if getattr(opt.fastcache_config, k) != v}
    if changes:
        fastcache.configure(opt, **changes)
    fastcache.set_schedule(opt, schedule.tensor())


class _StepRecorder:
    """Forward hook on the optimized model: after each call, which blocks were approximated."""

    def __init__(self, opt, n_blocks: int) -> None:
        self.opt = opt
        self.n_blocks = n_blocks
        self.prev: dict[int, list[float]] = {}
        self.runs: list[dict[int, list[bool]]] = []

    def __call__(self, module, args, kwargs, output) -> None:
        entry = self.opt._entries[self.opt._last_key]
        step = int(entry.clock.step)
        now = [float(g.skipped) for g in entry.guards for _ in g.blocks]  # a guarded span: per block
        prev = self.prev.get(id(entry), [0.0] * len(now))
        self.prev[id(entry)] = now
        row = [b > a for a, b in zip(prev, now)]
        if not self.runs or (step == 0 and self.runs[-1]):
            self.runs.append({})
        self.runs[-1][step] = row


def record_schedule(opt, run: Callable[[], Any], generations: int = 1, model_name: str = "",
                    min_votes: float = 0.5, meta: dict[str, Any] | None = None) -> Schedule:
    """Record a schedule from ``generations`` calls of ``run()`` (each one sampling loop of ``opt``).

    ``opt`` is an optimized model (eager is fine) with its statistical policy; every call of
    ``run`` must run one whole generation.  A block is skipped at a step in the schedule when
    at least ``min_votes`` of the recorded generations skipped it there.
    """
    from fx_fastcache.api import _check
    from fx_fastcache.calibration import model_fingerprint

    opt = _check(opt)
    if opt.fastcache_config.policy == "schedule":
        raise ValueError("record_schedule needs a deciding policy (e.g. policy='step_forecast'); this model replays "
                         "a schedule already")
    names = _block_names(opt)
    rec = _StepRecorder(opt, len(names))
    handle = opt.register_forward_hook(rec, with_kwargs=True)
    try:
        for _ in range(generations):
            opt.reset()
            rec.prev.clear()
            rec.runs.append({})
            run()
    finally:
        handle.remove()
    runs = [r for r in rec.runs if r]
    if not runs:
        raise RuntimeError("run() made no call of the optimized model; nothing was recorded")
    steps = max(max(r) for r in runs) + 1
    table = []
    for s in range(steps):
        votes = [r[s] for r in runs if s in r]
        row = [sum(v[j] for v in votes) >= min_votes * len(votes) and len(votes) > 0 for j in range(len(names))]
        table.append(row if s > 0 else [False] * len(names))
    sched = Schedule(table=table, blocks=names, fingerprint=model_fingerprint(opt.model), config=opt.fastcache_config.to_dict(),
                     model=model_name, meta={"generations": len(runs), **(meta or {})})
    logger.info("recorded schedule: %d steps x %d blocks, %.1f%% skipped", sched.steps, len(names),
                100 * sched.skip_ratio)
    return sched


def record_for_model(resolved, steps: int = 20, generations: int = 2, batch: int = 4, config=None,
                     calibration: str | Path | None = None, **overrides: Any) -> Schedule:
    """Record a schedule for a :class:`fx_fastcache.cli.common.ResolvedModel`.

    Trained models sample with their own Euler sampler (``fx_fastcache.trained.sample``, CFG
    batch of ``2 * batch``); tiny random models run their inputs over ``steps`` timesteps
    from 1000 down to 0.
    """
    import fx_fastcache as fastcache

    opt = fastcache.optimize(resolved.model, backend="eager", config=config, **overrides)
    if calibration is not None:
        fastcache.load_calibration(opt, calibration)
    gen = {"i": 0}
    if resolved.trained is not None:
        from fx_fastcache.trained import sample

        def run() -> None:
            k = gen["i"]
            gen["i"] += 1
            classes = [(k * batch + j) % 10 for j in range(batch)]
            sample(resolved.trained, classes, seeds=[1000 * k + j for j in range(batch)], steps=steps, model=opt)

        meta = {"sampler": "fx_fastcache.trained.sample (Euler, cfg=2.0)", "batch": 2 * batch, "steps": steps}
    else:
        ts = torch.linspace(1000.0, 0.0, steps + 1)[:-1].tolist()

        def run() -> None:
            for t in ts:
                opt(**resolved.make_inputs(t, batch))

        meta = {"sampler": "timesteps linspace(1000, 0)", "batch": batch, "steps": steps, "timesteps": ts}
    return record_schedule(opt, run, generations=generations, model_name=resolved.name, meta=meta)
